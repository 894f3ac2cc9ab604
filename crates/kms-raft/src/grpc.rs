//! Server side of the Raft transport.

use std::net::SocketAddr;
use std::sync::Weak;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::cluster::ClusterInner;
use crate::forward::{ForwardCall, ForwardError, ForwardErrorKind, ForwardReply};
use crate::network::{decode, encode, SharedClusterId, Tls, CLUSTER_ID_HEADER, MAX_MESSAGE};
use crate::proto::raft_server::{Raft as RaftRpc, RaftServer};
use crate::proto::{ForwardRequest, ForwardResponse, RaftPayload};
use crate::types::Raft;

pub struct RaftService {
    raft: Raft,
    cluster_id: SharedClusterId,
    cluster: Weak<ClusterInner>,
}

impl RaftService {
    /// Peers of another cluster are refused. A node that has no identity yet (a fresh node
    /// waiting to join) accepts the first cluster that contacts it.
    fn check_cluster<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let ours = self.cluster_id.read().ok().and_then(|g| *g);
        let theirs = request
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<Uuid>().ok());
        match (ours, theirs) {
            (Some(a), Some(b)) if a != b => {
                metrics::counter!("kms_raft_rejected_peers_total").increment(1);
                tracing::warn!(ours = %a, theirs = %b, "refused a peer of another cluster");
                Err(Status::permission_denied(format!(
                    "this node belongs to cluster {a}, the caller to {b}"
                )))
            }
            _ => Ok(()),
        }
    }
}

fn bad_request(e: String) -> Status {
    Status::invalid_argument(format!("undecodable payload: {e}"))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    encode(value)
        .map(|payload| Response::new(RaftPayload { payload }))
        .map_err(Status::internal)
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let rpc = decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(&self.raft.vote(rpc).await)
    }

    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let rpc = decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(&self.raft.append_entries(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        self.check_cluster(&request)?;
        let rpc = decode(&request.into_inner().payload).map_err(bad_request)?;
        reply(&self.raft.install_snapshot(rpc).await)
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        self.check_cluster(&request)?;
        let call: ForwardCall = decode(&request.into_inner().call).map_err(bad_request)?;
        let result = match self.cluster.upgrade() {
            Some(cluster) => cluster.handle_forward(call).await,
            None => ForwardReply::Error(ForwardError {
                kind: ForwardErrorKind::Unavailable,
                message: "node is shutting down".into(),
            }),
        };
        let reply = encode(&result).map_err(Status::internal)?;
        Ok(Response::new(ForwardResponse { reply }))
    }
}

/// Serves the Raft transport on `addr` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    raft: Raft,
    cluster_id: SharedClusterId,
    cluster: Weak<ClusterInner>,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let service = RaftServer::new(RaftService {
        raft,
        cluster_id,
        cluster,
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls.server)
            .map_err(|e| format!("raft TLS: {e}"))?;
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
        .map_err(|e| format!("raft transport: {e}"))
}

/// Binds the Raft listener early so start-up fails clearly when the port is taken.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on raft address {addr}: {e}"))
}
