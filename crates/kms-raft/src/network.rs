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
            .http2_keep_alive_interval(Duration::from_secs(10));
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
        .await
        .map_err(|_| TransportError::Unreachable(format!("forward to {raft_addr} timed out")))?
        .map_err(|s| status_error(raft_addr, s))?;
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
        let endpoint = Endpoint::from_shared(format!("https://{raft_addr}"))
            .map_err(|e| TransportError::Address(format!("{raft_addr}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tls_config(Tls::enrollment_client(ca_der))
            .map_err(|e| TransportError::Tls(format!("{raft_addr}: {e}")))?;
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| TransportError::Unreachable(format!("{raft_addr}: connect timed out")))?
            .map_err(|e| TransportError::Unreachable(format!("{raft_addr}: {e}")))?;
        let mut client = RaftClient::new(channel);
        let request = EnrollRequest {
            token_id: enrollment.token_id,
            token_secret: enrollment.token_secret,
            node_id: enrollment.node_id,
            csr: enrollment.csr_der,
            challenge: Vec::new(),
        };
        let response =
            tokio::time::timeout(timeout, client.enroll(self.request(request, Some(timeout))))
                .await
                .map_err(|_| {
                    TransportError::Unreachable(format!("enroll at {raft_addr} timed out"))
                })?
                .map_err(|s| status_error(raft_addr, s))?
                .into_inner();
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
        let endpoint = Endpoint::from_shared(format!("https://{raft_addr}"))
            .map_err(|e| TransportError::Address(format!("{raft_addr}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .tls_config(Tls::enrollment_client(ca_der))
            .map_err(|e| TransportError::Tls(format!("{raft_addr}: {e}")))?;
        let channel = tokio::time::timeout(timeout, endpoint.connect())
            .await
            .map_err(|_| TransportError::Unreachable(format!("{raft_addr}: connect timed out")))?
            .map_err(|e| TransportError::Unreachable(format!("{raft_addr}: {e}")))?;
        let request = EnrollRequest {
            token_id: token_id.to_owned(),
            challenge: challenge.to_vec(),
            ..Default::default()
        };
        let response = tokio::time::timeout(
            timeout,
            RaftClient::new(channel).enroll(self.request(request, Some(timeout))),
        )
        .await
        .map_err(|_| TransportError::Unreachable(format!("challenge at {raft_addr} timed out")))?
        .map_err(|s| status_error(raft_addr, s))?
        .into_inner();
        Ok((response.proof, response.ca_certificate))
    }

    /// Asks the leader for a new certificate of this node, presenting the current one.
    pub async fn rotate(
        &self,
        raft_addr: &str,
        enrollment: Enrollment,
        timeout: Duration,
    ) -> Result<Enrolled, TransportError> {
        let mut client = RaftClient::new(self.shared_channel(raft_addr)?);
        let request = EnrollRequest {
            token_id: String::new(),
            token_secret: String::new(),
            node_id: enrollment.node_id,
            csr: enrollment.csr_der,
            challenge: Vec::new(),
        };
        let response =
            tokio::time::timeout(timeout, client.enroll(self.request(request, Some(timeout))))
                .await
                .map_err(|_| {
                    TransportError::Unreachable(format!("enroll at {raft_addr} timed out"))
                })?
                .map_err(|s| status_error(raft_addr, s))?
                .into_inner();
        Ok(Enrolled {
            cert_der: response.certificate,
            ca_der: response.ca_certificate,
        })
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
