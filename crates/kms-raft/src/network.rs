//! Client side of the Raft transport: tonic channels to peers, optional mutual TLS, the
//! cluster id on every call.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
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
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};
use uuid::Uuid;

use crate::forward::{ForwardCall, ForwardReply};
use crate::proto::raft_client::RaftClient;
use crate::proto::{ForwardRequest, RaftPayload};
use crate::types::{KmsNode, NodeId, TypeConfig};

/// Metadata header carrying the sender's cluster id.
pub const CLUSTER_ID_HEADER: &str = "x-kms-cluster-id";

/// PEM files for mutual TLS between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA that signed every node's certificate; peers must present one it signed.
    pub ca: PathBuf,
    /// Name expected in peer certificates (SAN), the same for all nodes.
    pub server_name: String,
}

/// Loaded TLS material.
#[derive(Clone)]
pub struct Tls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

impl Tls {
    pub fn load(files: &TlsFiles) -> Result<Self, String> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let cert = read(&files.cert)?;
        let key = read(&files.key)?;
        let ca = read(&files.ca)?;
        let identity = Identity::from_pem(&cert, &key);
        let ca = Certificate::from_pem(ca);
        Ok(Self {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new()
                .ca_certificate(ca)
                .identity(identity)
                .domain_name(files.server_name.clone()),
        })
    }
}

/// The cluster id this node knows (None until it has an identity).
pub type SharedClusterId = Arc<RwLock<Option<Uuid>>>;

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
    pub fn channel(&self, addr: &str) -> Result<Channel, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("bad peer address {addr}: {e}"))?
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
                .map_err(|e| format!("TLS for {addr}: {e}"))?;
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
    fn shared_channel(&self, addr: &str) -> Result<Channel, String> {
        let mut cache = self
            .channels
            .lock()
            .map_err(|_| "channel cache lock poisoned".to_owned())?;
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
    ) -> Result<ForwardReply, String> {
        let channel = self.shared_channel(raft_addr)?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let bytes = postcard::to_allocvec(call).map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(
            timeout,
            client.forward(self.request(ForwardRequest { call: bytes }, Some(timeout))),
        )
        .await;
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => {
                if is_transport_failure(status.code()) {
                    self.drop_channel(raft_addr);
                }
                return Err(format!("forward to {raft_addr}: {}", status.message()));
            }
            Err(_) => {
                // The connection may be stuck behind lost segments: the next call makes a
                // new one instead of queueing behind this.
                self.drop_channel(raft_addr);
                return Err(format!("forward to {raft_addr} timed out"));
            }
        };
        postcard::from_bytes(&response.into_inner().reply).map_err(|e| e.to_string())
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

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_allocvec(value).map_err(|e| e.to_string())
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| e.to_string())
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
    client: Result<RaftClient<Channel>, String>,
}

#[derive(Debug)]
struct TransportError(String);

impl std::fmt::Display for TransportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransportError {}

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
        let unreachable = |m: String| RPCError::Unreachable(Unreachable::new(&TransportError(m)));
        let client = self.client.as_mut().map_err(|e| unreachable(e.clone()))?;
        let payload =
            encode(req).map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e))))?;
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
            _ => RPCError::Network(NetworkError::new(&TransportError(format!(
                "{kind:?} to node {}: {status}",
                self.target
            )))),
        })?;
        let decoded: Result<Resp, RaftError<NodeId, E>> = decode(&response.into_inner().payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&TransportError(e))))?;
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
