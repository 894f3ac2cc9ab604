//! Client side of the Raft transport: tonic channels to peers, optional mutual TLS, the
//! cluster id on every call.

use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

pub use crate::auth::{SharedClusterId, CLUSTER_ID_HEADER};
use crate::error::TransportError;
use crate::forward::{ForwardCall, ForwardReply, FORWARD_VERSION};
use crate::grpc::{Enrolled, Enrollment, LEADER_HEADER};
use crate::proto::raft_client::RaftClient;
use crate::proto::{EnrollRequest, ForwardRequest, JoinRequest, RaftPayload};
pub use crate::tls::{Tls, TlsFiles};
use crate::types::{KmsNode, NodeId, TypeConfig};

/// How to reach peers.
#[derive(Clone)]
pub struct Transport {
    pub tls: Option<Tls>,
    pub cluster_id: SharedClusterId,
    pub connect_timeout: Duration,
    /// One HTTP/2 channel per peer, reused by every forwarded call (a new connection per call
    /// would cost a TCP and HTTP/2 handshake on the activation path).
    pub channels: Arc<std::sync::Mutex<std::collections::HashMap<String, Channel>>>,
}

impl Transport {
    /// A lazily connecting channel to `addr` (`host:port`).
    pub fn channel(&self, addr: &str) -> Result<Channel, TransportError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| TransportError::Address(format!("{addr}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            // Dead-peer detection in seconds (issue 14): a partition that loses a segment
            // leaves every later byte of the connection, pings included, behind TCP's
            // backed-off retransmission (13 s after a 15 s cut). A ping unanswered for
            // KEEP_ALIVE_TIMEOUT closes the connection, and the next call opens a new one.
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // An idle connection whose peer vanished (no HTTP/2 traffic to detect it).
            .tcp_keepalive(Some(Duration::from_secs(5)))
            .tcp_keepalive_interval(Some(Duration::from_secs(1)))
            .tcp_keepalive_retries(Some(3));
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.client.clone())
                .map_err(|e| TransportError::Tls(format!("{addr}: {e}")))?;
        }
        Ok(endpoint.connect_lazy())
    }

    /// Wraps a message with the cluster id header.
    pub fn request<T>(&self, message: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(id) = self.cluster_id.read().ok().and_then(|g| *g) {
            if let Ok(value) = id.to_string().parse() {
                request.metadata_mut().insert(CLUSTER_ID_HEADER, value);
            }
        }
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        request
    }

    /// The cached channel to `addr`, created on first use.
    fn shared_channel(&self, addr: &str) -> Result<Channel, TransportError> {
        let mut cache = self
            .channels
            .lock()
            .map_err(|_| TransportError::Unreachable("channel cache lock poisoned".into()))?;
        if let Some(c) = cache.get(addr) {
            return Ok(c.clone());
        }
        let c = self.channel(addr)?;
        cache.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Forgets the cached channel to `addr` (the next call connects anew).
    fn drop_channel(&self, addr: &str) {
        if let Ok(mut cache) = self.channels.lock() {
            if cache.remove(addr).is_some() {
                tracing::info!(
                    peer = addr,
                    "dropped the channel to a peer after a failed call"
                );
            }
        }
    }

    /// Forwards a call to the node at `raft_addr` (normally the leader).
    pub async fn forward(
        &self,
        raft_addr: &str,
        call: &ForwardCall,
        timeout: Duration,
    ) -> Result<ForwardReply, TransportError> {
        let channel = self.shared_channel(raft_addr)?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let bytes = encode(call)?;
        let request = ForwardRequest {
            call: bytes,
            version: FORWARD_VERSION,
        };
        let response = tokio::time::timeout(
            timeout,
            client.forward(self.request(request, Some(timeout))),
        )
        .await;
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => {
                if is_transport_failure(status.code()) {
                    self.drop_channel(raft_addr);
                }
                return Err(status_error(raft_addr, status));
            }
            Err(_) => {
                // The connection may be stuck behind lost segments: the next call makes a
                // new one instead of queueing behind this.
                self.drop_channel(raft_addr);
                return Err(TransportError::Unreachable(format!(
                    "forward to {raft_addr} timed out"
                )));
            }
        };
        decode(&response.into_inner().reply)
    }

    /// Asks the member at `raft_addr` for a node certificate, with a join token. The member
    /// is verified against `ca_der` (the CA the token pinned); this node presents nothing.
    pub async fn enroll(
        &self,
        raft_addr: &str,
        ca_der: &[u8],
        enrollment: Enrollment,
        timeout: Duration,
    ) -> Result<Enrolled, TransportError> {
        let channel = self.enrollment_channel(raft_addr, ca_der, timeout).await?;
        let request = EnrollRequest {
            token_id: enrollment.token_id,
            token_secret: enrollment.token_secret,
            node_id: enrollment.node_id,
            csr: enrollment.csr_der,
            challenge: Vec::new(),
        };
        let response = self
            .enroll_call(channel, raft_addr, request, timeout)
            .await?;
        Ok(Enrolled {
            cert_der: response.certificate,
            ca_der: response.ca_certificate,
        })
    }

    /// Asks the member at `raft_addr`, verified against the candidate CA `ca_der`, to prove it
    /// knows the secret of token `token_id`: returns the proof and the CA it answered with.
    pub async fn challenge(
        &self,
        raft_addr: &str,
        ca_der: &[u8],
        token_id: &str,
        challenge: &[u8],
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<u8>), TransportError> {
        let channel = self.enrollment_channel(raft_addr, ca_der, timeout).await?;
        let request = EnrollRequest {
            token_id: token_id.to_owned(),
            challenge: challenge.to_vec(),
            ..Default::default()
        };
        let response = self
            .enroll_call(channel, raft_addr, request, timeout)
            .await?;
        Ok((response.proof, response.ca_certificate))
    }

    /// Asks the leader for a new certificate of this node, presenting the current one.
    pub async fn rotate(
        &self,
        raft_addr: &str,
        enrollment: Enrollment,
        timeout: Duration,
    ) -> Result<Enrolled, TransportError> {
        let request = EnrollRequest {
            node_id: enrollment.node_id,
            csr: enrollment.csr_der,
            ..Default::default()
        };
        let channel = self.shared_channel(raft_addr)?;
        let response = self
            .enroll_call(channel, raft_addr, request, timeout)
            .await?;
        Ok(Enrolled {
            cert_der: response.certificate,
            ca_der: response.ca_certificate,
        })
    }

    /// A connection for a node without a certificate: it verifies the member against
    /// `ca_der` and presents nothing.
    async fn enrollment_channel(
        &self,
        raft_addr: &str,
        ca_der: &[u8],
        timeout: Duration,
    ) -> Result<Channel, TransportError> {
        let endpoint = Endpoint::from_shared(format!("https://{raft_addr}"))
            .map_err(|e| TransportError::Address(format!("{raft_addr}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tls_config(Tls::enrollment_client(ca_der))
            .map_err(|e| TransportError::Tls(format!("{raft_addr}: {e}")))?;
        tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| TransportError::Unreachable(format!("{raft_addr}: connect timed out")))?
            .map_err(|e| TransportError::Unreachable(format!("{raft_addr}: {e}")))
    }

    /// One `Enroll` call (enrollment, challenge or rotation) within `timeout`.
    async fn enroll_call(
        &self,
        channel: Channel,
        raft_addr: &str,
        request: EnrollRequest,
        timeout: Duration,
    ) -> Result<crate::proto::EnrollResponse, TransportError> {
        tokio::time::timeout(
            timeout,
            RaftClient::new(channel).enroll(self.request(request, Some(timeout))),
        )
        .await
        .map_err(|_| TransportError::Unreachable(format!("enroll at {raft_addr} timed out")))?
        .map(tonic::Response::into_inner)
        .map_err(|s| status_error(raft_addr, s))
    }

    /// Asks the member at `raft_addr` (the leader) to add this enrolled node.
    pub async fn join(
        &self,
        raft_addr: &str,
        node: &KmsNode,
        timeout: Duration,
    ) -> Result<NodeId, TransportError> {
        let channel = self.shared_channel(raft_addr)?;
        let mut client = RaftClient::new(channel);
        let request = JoinRequest {
            node: encode(node)?,
        };
        let response =
            tokio::time::timeout(timeout, client.join(self.request(request, Some(timeout))))
                .await
                .map_err(|_| TransportError::Unreachable(format!("join at {raft_addr} timed out")))?
                .map_err(|s| status_error(raft_addr, s))?;
        Ok(response.into_inner().leader_id)
    }
}

/// A gRPC status from `addr` as a transport error ("not the leader" names the leader).
fn status_error(addr: &str, status: tonic::Status) -> TransportError {
    match status.code() {
        tonic::Code::FailedPrecondition
            if status.metadata().get(LEADER_HEADER).is_some()
                || status.message() == "not the leader" =>
        {
            let leader = status
                .metadata()
                .get(LEADER_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            TransportError::Redirect(leader)
        }
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
            TransportError::Refused(format!("{addr}: {}", status.message()))
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            TransportError::Unreachable(format!("{addr}: {}", status.message()))
        }
        _ => TransportError::Remote(format!("{addr}: {}", status.message())),
    }
}

/// How often an HTTP/2 connection to a peer is pinged when nothing arrives on it.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a ping may go unanswered before the connection is closed (then a new one is made).
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Consecutive timed-out RPCs to a peer after which its channel is replaced by a new one.
pub const TIMEOUTS_BEFORE_RECONNECT: u32 = 2;

/// Largest gRPC message (snapshot chunks are smaller; see `snapshot_max_chunk_size`).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, TransportError> {
    postcard::to_allocvec(value).map_err(|e| TransportError::Decode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, TransportError> {
    postcard::from_bytes(bytes).map_err(|e| TransportError::Decode(e.to_string()))
}

/// Creates one [`PeerClient`] per target.
#[derive(Clone)]
pub struct NetworkFactory {
    pub transport: Transport,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &KmsNode) -> Self::Network {
        PeerClient {
            target,
            addr: node.raft_addr.clone(),
            failures: 0,
            transport: self.transport.clone(),
            client: self.transport.channel(&node.raft_addr).map(|c| {
                RaftClient::new(c)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE)
            }),
        }
    }
}

/// Raft RPCs to one peer.
pub struct PeerClient {
    target: NodeId,
    /// The peer's Raft address, to open a new channel.
    addr: String,
    /// Consecutive calls that failed in transport (timeout, unavailable).
    failures: u32,
    transport: Transport,
    client: Result<RaftClient<Channel>, TransportError>,
}

type Rpc<T, E> = Result<T, RPCError<NodeId, KmsNode, RaftError<NodeId, E>>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        kind: RpcKind,
        req: &Req,
        option: &RPCOption,
    ) -> Rpc<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let unreachable =
            |m: String| RPCError::Unreachable(Unreachable::new(&TransportError::Unreachable(m)));
        let client = self
            .client
            .as_mut()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e.clone())))?;
        let payload = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let ttl = option.hard_ttl();
        let request = self.transport.request(RaftPayload { payload }, Some(ttl));
        let result = match kind {
            RpcKind::Vote => client.vote(request).await,
            RpcKind::AppendEntries => client.append_entries(request).await,
            RpcKind::InstallSnapshot => client.install_snapshot(request).await,
        };
        match &result {
            Ok(_) => self.failures = 0,
            Err(status) if is_transport_failure(status.code()) => {
                self.failures += 1;
                if self.failures >= TIMEOUTS_BEFORE_RECONNECT {
                    // Replace the channel: its connection may be dead without TCP knowing.
                    tracing::info!(
                        peer = self.target,
                        failures = self.failures,
                        "new channel to a peer after consecutive failed calls"
                    );
                    self.failures = 0;
                    self.client = self.transport.channel(&self.addr).map(|c| {
                        RaftClient::new(c)
                            .max_decoding_message_size(MAX_MESSAGE)
                            .max_encoding_message_size(MAX_MESSAGE)
                    });
                }
            }
            Err(_) => {}
        }
        let response = result.map_err(|status| match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                unreachable(format!(
                    "{kind:?} to node {}: {}",
                    self.target,
                    status.message()
                ))
            }
            _ => RPCError::Network(NetworkError::new(&TransportError::Remote(format!(
                "{kind:?} to node {}: {status}",
                self.target
            )))),
        })?;
        let decoded: Result<Resp, RaftError<NodeId, E>> = decode(&response.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// A status that says the call may not have reached the peer (not an answer from it).
fn is_transport_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
    )
}

#[derive(Debug, Clone, Copy)]
enum RpcKind {
    Vote,
    AppendEntries,
    InstallSnapshot,
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(RpcKind::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(RpcKind::Vote, &rpc, &option).await
    }
}
