//! Server side of the Raft transport: authenticates every call (see [`crate::auth`]), checks
//! that Raft messages come from members under their own id, guards snapshot streams, and hands
//! the rest to a [`PeerHandler`].

use std::net::SocketAddr;
use std::sync::{Mutex, Weak};

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::auth::{Caller, PeerAuth};
use crate::error::{ClusterError, TransportError};
use crate::forward::{ForwardCall, ForwardReply, FORWARD_VERSION};
use crate::network::{decode, encode, Tls, MAX_MESSAGE};
use crate::proto::raft_server::{Raft as RaftRpc, RaftServer};
use crate::proto::{
    EnrollRequest, EnrollResponse, ForwardRequest, ForwardResponse, JoinRequest, JoinResponse,
    RaftPayload,
};
use crate::types::{KmsNode, NodeId, Raft, TypeConfig};

/// Metadata header naming the leader's Raft address when a call needs the leader.
pub const LEADER_HEADER: &str = "x-kms-leader";

/// A certificate request that came with a join token.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub token_id: String,
    pub token_secret: String,
    pub node_id: NodeId,
    pub csr_der: Vec<u8>,
}

/// What an enrolled node receives.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

/// What the transport needs from the cluster (the service depends on this, not on the
/// cluster's internals).
pub trait PeerHandler: Send + Sync + 'static {
    fn forward(&self, call: ForwardCall) -> impl std::future::Future<Output = ForwardReply> + Send;
    /// `caller` is the member node whose certificate made the call (rotation), if any.
    fn enroll(
        &self,
        enrollment: Enrollment,
        caller: Option<NodeId>,
    ) -> impl std::future::Future<Output = Result<Enrolled, ClusterError>> + Send;
    fn join(
        &self,
        node_id: NodeId,
        node: KmsNode,
    ) -> impl std::future::Future<Output = Result<NodeId, ClusterError>> + Send;
    /// Proves knowledge of a token's secret (see [`crate::pki::token_proof`]); returns the
    /// proof and the CA certificate.
    fn prove(
        &self,
        token_id: &str,
        challenge: &[u8],
    ) -> impl std::future::Future<Output = Result<(Vec<u8>, Vec<u8>), ClusterError>> + Send;
}

/// In-order, size-capped snapshot streams: a chunk must continue the stream it belongs to
/// (offset 0 starts one), and a stream may not exceed `max_bytes`.
struct SnapshotGuard {
    max_bytes: u64,
    current: Mutex<Option<(String, u64)>>,
}

impl SnapshotGuard {
    fn admit(&self, snapshot_id: &str, offset: u64, len: usize, done: bool) -> Result<(), String> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| "snapshot guard lock".to_owned())?;
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| "chunk offset overflows".to_owned())?;
        if end > self.max_bytes {
            *current = None;
            return Err(format!(
                "snapshot larger than the limit of {} bytes (raft.max_snapshot_mb)",
                self.max_bytes
            ));
        }
        let expected = match current.as_ref() {
            _ if offset == 0 => 0,
            Some((id, next)) if id == snapshot_id => *next,
            _ => {
                return Err(format!(
                    "chunk at offset {offset} of snapshot {snapshot_id} without its beginning"
                ))
            }
        };
        if offset != expected {
            *current = None;
            return Err(format!(
                "chunk at offset {offset} of snapshot {snapshot_id}, expected {expected}"
            ));
        }
        *current = (!done).then(|| (snapshot_id.to_owned(), end));
        Ok(())
    }
}

pub struct RaftService<H: PeerHandler> {
    raft: Raft,
    auth: PeerAuth,
    handler: Weak<H>,
    snapshots: SnapshotGuard,
}

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable payload: {e}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value)
        .map(|payload| Response::new(RaftPayload { payload }))
        .map_err(|e| Status::internal(e.to_string()))
}

/// A cluster error as a gRPC status; "not the leader" carries the leader's Raft address.
fn status(e: ClusterError) -> Status {
    match e {
        ClusterError::NotLeader { leader } => {
            let mut s = Status::failed_precondition("not the leader");
            if let Some(addr) = leader.and_then(|(_, n)| n.raft_addr.parse().ok()) {
                s.metadata_mut().insert(LEADER_HEADER, addr);
            }
            s
        }
        ClusterError::Refused(m) => Status::permission_denied(m),
        ClusterError::Invalid(m) => Status::invalid_argument(m),
        ClusterError::Conflict(m) => Status::already_exists(m),
        ClusterError::Unavailable(m) => Status::unavailable(m),
        other => Status::internal(other.to_string()),
    }
}

impl<H: PeerHandler> RaftService<H> {
    fn handler(&self) -> Result<std::sync::Arc<H>, Status> {
        self.handler
            .upgrade()
            .ok_or_else(|| Status::unavailable("node is shutting down"))
    }

    /// A Raft message must come from a member, under the id its certificate names.
    fn check_sender(&self, caller: Caller, claimed: Option<NodeId>) -> Result<(), Status> {
        let Some(claimed) = claimed else {
            return Err(bad_request("message names no sender"));
        };
        if let Some(id) = caller.node_id {
            if id != claimed {
                metrics::counter!("kms_raft_rejected_peers_total", "reason" => "impersonation")
                    .increment(1);
                tracing::warn!(
                    certificate = id,
                    claimed,
                    "refused a Raft message sent under another node's id"
                );
                return Err(Status::permission_denied(
                    "peer refused: the message's sender is not the certificate's node",
                ));
            }
        }
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let membership = metrics.membership_config.membership();
        if membership.nodes().next().is_some() && membership.get_node(&claimed).is_none() {
            metrics::counter!("kms_raft_rejected_peers_total", "reason" => "not a member")
                .increment(1);
            tracing::warn!(
                claimed,
                "refused a Raft message from a node this node's membership does not hold \
                 (a removed node; or this node missed membership changes while it was down: \
                 then remove it and let it join again)"
            );
            return Err(Status::permission_denied("peer refused: not a member"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<H: PeerHandler> RaftRpc for RaftService<H> {
    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let caller = self.auth.member(&request)?;
        let rpc: VoteRequest<NodeId> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        self.check_sender(caller, rpc.vote.leader_id().voted_for())?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let caller = self.auth.member(&request)?;
        let rpc: AppendEntriesRequest<TypeConfig> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        self.check_sender(caller, rpc.vote.leader_id().voted_for())?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let caller = self.auth.member(&request)?;
        let rpc: InstallSnapshotRequest<TypeConfig> =
            decode(&request.into_inner().payload).map_err(bad_request)?;
        self.check_sender(caller, rpc.vote.leader_id().voted_for())?;
        if let Err(e) =
            self.snapshots
                .admit(&rpc.meta.snapshot_id, rpc.offset, rpc.data.len(), rpc.done)
        {
            metrics::counter!("kms_raft_rejected_snapshot_chunks_total").increment(1);
            tracing::warn!(error = %e, "snapshot chunk refused; the stream is dropped");
            return Err(Status::invalid_argument(e));
        }
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let caller = self.auth.member(&request)?;
        let message = request.into_inner();
        if message.version != FORWARD_VERSION {
            return Err(Status::failed_precondition(format!(
                "forward version {} is not spoken here (this node speaks {FORWARD_VERSION}); \
                 upgrade every node to the same release",
                message.version
            )));
        }
        let call: ForwardCall = decode(&message.call).map_err(bad_request)?;
        if let Some(id) = caller.node_id {
            self.check_sender(caller, Some(id))?;
        }
        let result = self.handler()?.forward(call).await;
        let reply = encode(&result).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ForwardResponse { reply }))
    }

    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        if self.auth.mode != crate::auth::PeerMode::ClusterPki {
            return Err(Status::unimplemented(
                "this cluster does not run the built-in PKI; join through the admin API",
            ));
        }
        let peer = request.remote_addr();
        // A member renewing its own certificate presents its current one.
        let caller = if request.peer_certs().is_some() {
            self.auth.member(&request).ok().and_then(|c| c.node_id)
        } else {
            None
        };
        let message = request.into_inner();
        if message.csr.len() > 16 * 1024
            || message.token_id.len() > 64
            || message.challenge.len() > 64
        {
            return Err(Status::invalid_argument("enrollment request too large"));
        }
        if !message.challenge.is_empty() {
            if message.challenge.len() < 16 {
                return Err(Status::invalid_argument("challenge shorter than 16 bytes"));
            }
            let (proof, ca) = self
                .handler()?
                .prove(&message.token_id, &message.challenge)
                .await
                .map_err(status)?;
            return Ok(Response::new(EnrollResponse {
                certificate: Vec::new(),
                ca_certificate: ca,
                proof,
            }));
        }
        let enrollment = Enrollment {
            token_id: message.token_id,
            token_secret: message.token_secret,
            node_id: message.node_id,
            csr_der: message.csr,
        };
        let token_id = enrollment.token_id.clone();
        let node_id = enrollment.node_id;
        match self.handler()?.enroll(enrollment, caller).await {
            Ok(enrolled) => {
                tracing::info!(node_id, token = %token_id, ?peer, "node enrolled with a join token");
                Ok(Response::new(EnrollResponse {
                    certificate: enrolled.cert_der,
                    ca_certificate: enrolled.ca_der,
                    proof: Vec::new(),
                }))
            }
            Err(e) => {
                if matches!(e, ClusterError::Refused(_)) {
                    metrics::counter!("kms_raft_rejected_enrollments_total").increment(1);
                    tracing::warn!(node_id, token = %token_id, ?peer, error = %e, "enrollment refused");
                }
                Err(status(e))
            }
        }
    }

    async fn join(&self, request: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let caller = self.auth.member(&request)?;
        let Some(node_id) = caller.node_id else {
            return Err(Status::permission_denied(
                "peer refused: joining needs a node certificate of this cluster",
            ));
        };
        let node: KmsNode = decode(&request.into_inner().node).map_err(bad_request)?;
        let leader_id = self.handler()?.join(node_id, node).await.map_err(status)?;
        Ok(Response::new(JoinResponse { leader_id }))
    }
}

/// Serves the Raft transport until `shutdown` resolves.
pub async fn serve<H: PeerHandler>(
    listener: tokio::net::TcpListener,
    raft: Raft,
    auth: PeerAuth,
    handler: Weak<H>,
    tls: Option<Tls>,
    max_snapshot_bytes: u64,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), TransportError> {
    let service = RaftServer::new(RaftService {
        raft,
        auth,
        handler,
        snapshots: SnapshotGuard {
            max_bytes: max_snapshot_bytes,
            current: Mutex::new(None),
        },
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Dead peers are noticed in seconds, not after TCP's backed-off retransmissions.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(3)));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.server)
            .map_err(|e| TransportError::Tls(e.to_string()))?;
    }
    // tonic applies TCP_NODELAY only to listeners it binds itself; without it, small gRPC
    // answers wait for delayed ACKs (tens of milliseconds per forwarded batch).
    let incoming = tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |stream| {
            stream.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        },
    );
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| TransportError::Unreachable(format!("raft transport: {e}")))
}

/// Binds the Raft listener early so start-up fails clearly when the port is taken.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, TransportError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| TransportError::Address(format!("cannot listen on raft address {addr}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_chunks_must_arrive_in_order_and_within_the_cap() {
        let g = SnapshotGuard {
            max_bytes: 1000,
            current: Mutex::new(None),
        };
        assert!(g.admit("s1", 1u64 << 62, 10, false).is_err(), "far offset");
        assert!(g.admit("s1", 256, 10, false).is_err(), "no beginning");
        assert!(g.admit("s1", 0, 400, false).is_ok());
        assert!(g.admit("s1", 500, 10, false).is_err(), "gap");
        // The stream was dropped: it must start again.
        assert!(g.admit("s1", 400, 10, false).is_err());
        assert!(g.admit("s1", 0, 400, false).is_ok());
        assert!(g.admit("s1", 400, 400, false).is_ok());
        assert!(g.admit("s1", 800, 300, true).is_err(), "over the cap");
        assert!(g.admit("s2", 0, 500, false).is_ok());
        assert!(
            g.admit("s1", 500, 10, false).is_err(),
            "another snapshot's chunk"
        );
        assert!(g.admit("s2", 500, 500, true).is_ok());
        assert!(g.admit("s2", 1000, 0, true).is_err(), "stream finished");
        assert!(g.admit("s3", u64::MAX, 10, true).is_err(), "overflow");
    }
}
