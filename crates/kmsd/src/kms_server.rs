//! The KMS listeners: a thin tokio shell around the sans-IO [`kms_wire::server`] state machine.
//! One task per connection; bind, then any number of requests on the connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use kms_core::{ActivationOutcome, ActivationRequest};
use kms_wire::kms::{self, BaseResponse, ResponseRandom};
use kms_wire::server::{ActivationCall, ServerAction, ServerConfig, ServerConnection, HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::edge::{EdgeLimiter, EdgeLimits, NewClientCheck, Refusal, RefusalReporter};
use crate::engine::Engine;
use crate::telemetry;

/// HRESULT answered to a new client over its source's new-client rate:
/// HRESULT_FROM_WIN32(RPC_S_SERVER_TOO_BUSY), "The RPC server is too busy to complete this
/// operation". The error stub is an ordinary failed activation (protocol sheet 2.7): the
/// client records the HRESULT and tries again after its activation interval (120 minutes by
/// default), like after any failed attempt; the code says "busy", not "bad request"
/// (0x8007000D) or "this host cannot be used" (0xC004F042). See docs/security.md.
pub const HR_SERVER_BUSY: u32 = 0x8007_06BB;

/// How often the per-source table forgets idle sources.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// At most one log line and event per refusal reason in this period.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Limits and negotiation settings of the KMS listeners.
#[derive(Debug, Clone)]
pub struct KmsServerConfig {
    pub rpc: ServerConfig,
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_pdus_per_connection: u64,
    /// Longest life of one connection, whatever it sends.
    pub max_connection_lifetime: Duration,
    /// Per-source limits (connections, new CMIDs).
    pub edge: EdgeLimits,
    /// Local allow-list of client networks (empty = all); the replicated policy's list
    /// applies on top of it.
    pub allow_networks: Vec<IpNet>,
}

/// Shared by all connection tasks.
pub struct KmsService {
    pub config: KmsServerConfig,
    pub engine: Engine,
    connections: Arc<Semaphore>,
    edge: Arc<EdgeLimiter>,
    reporter: RefusalReporter,
}

impl KmsService {
    pub fn new(config: KmsServerConfig, engine: Engine) -> Arc<Self> {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        let edge = EdgeLimiter::new(config.edge.clone());
        Arc::new(Self {
            config,
            engine,
            connections,
            edge,
            reporter: RefusalReporter::new(REPORT_EVERY),
        })
    }

    /// Forgets idle sources of the per-source table every 30 s until `shutdown`.
    pub async fn sweep_sources(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            self.edge.sweep(Instant::now());
            metrics::gauge!("kms_edge_sources_tracked").set(self.edge.tracked() as f64);
        }
    }

    fn edge_refused(&self, reason: Refusal, peer: SocketAddr) {
        let report = self.reporter.refused(&self.edge, reason, Instant::now());
        telemetry::edge_refused(reason, report, peer, self.edge.limits());
    }

    /// Accepts connections on `listener` until `shutdown` flips to true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let local = listener.local_addr().ok();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.changed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE; back off instead of spinning.
                    tracing::warn!(error = %e, listener = ?local, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                metrics::counter!("kms_connections_rejected_total", "reason" => "max_connections")
                    .increment(1);
                tracing::warn!(%peer, "connection limit reached; closing");
                continue;
            };
            if !self.client_allowed(peer.ip()).await {
                metrics::counter!("kms_connections_rejected_total", "reason" => "not_allowed")
                    .increment(1);
                tracing::info!(%peer, "client network not allowed; closing");
                continue;
            }
            // Over its source's connection cap: closed without a byte, like an unreachable
            // host, so a real client moves on to the next host of the SRV list.
            let slot = match self.edge.connect(peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    self.edge_refused(reason, peer);
                    continue;
                }
            };
            let service = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                metrics::gauge!("kms_open_connections").increment(1.0);
                service.handle_connection(stream, peer, shutdown).await;
                metrics::gauge!("kms_open_connections").decrement(1.0);
            });
        }
    }

    async fn client_allowed(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        if !self.config.allow_networks.is_empty()
            && !self.config.allow_networks.iter().any(|n| n.contains(&ip))
        {
            return false;
        }
        let state = self.engine.state().read().await;
        let nets = &state.policy().client_networks;
        nets.is_empty() || nets.iter().any(|n| n.contains(&ip))
    }

    async fn handle_connection(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let local_port = stream.local_addr().map(|a| a.port()).unwrap_or(1688);
        let mut conn = ServerConnection::new(self.config.rpc, local_port, rand::random());
        let mut header = [0u8; HEADER_LEN];
        let mut pdu = Vec::with_capacity(512);
        let mut pdus: u64 = 0;
        let end_of_life = tokio::time::sleep(self.config.max_connection_lifetime);
        tokio::pin!(end_of_life);
        loop {
            // The idle timeout covers waiting for a PDU and receiving all of it, so a client
            // dripping one byte at a time cannot hold a connection forever; the lifetime
            // bounds a connection that keeps sending.
            let read = tokio::select! {
                r = tokio::time::timeout(self.config.idle_timeout, read_pdu(&mut stream, &mut header, &mut pdu, self.config.rpc.max_pdu_len)) => r,
                () = &mut end_of_life => {
                    telemetry::rpc_fault("lifetime");
                    tracing::info!(%peer, "connection lifetime reached; closing");
                    return;
                }
                _ = shutdown.changed() => return,
            };
            match read {
                Err(_) => {
                    tracing::debug!(%peer, "idle timeout; closing");
                    return;
                }
                Ok(Err(ReadError::Eof)) => return,
                Ok(Err(ReadError::Io(e))) => {
                    tracing::debug!(%peer, error = %e, "read failed");
                    return;
                }
                Ok(Err(ReadError::Frame(e))) => {
                    telemetry::rpc_fault("bad_frame");
                    tracing::info!(%peer, error = %e, "malformed PDU; closing");
                    return;
                }
                Ok(Ok(())) => {}
            }
            // Every PDU counts, BIND and ALTER_CONTEXT included: a connection cannot
            // re-negotiate forever.
            pdus += 1;
            if pdus > self.config.max_pdus_per_connection {
                telemetry::rpc_fault("too_many_pdus");
                tracing::info!(%peer, "PDU limit per connection reached; closing");
                return;
            }
            let reply = match conn.handle_pdu(&pdu) {
                ServerAction::Send(bytes) => {
                    if bytes.get(2) == Some(&3) {
                        telemetry::rpc_fault("fault_pdu");
                    }
                    bytes
                }
                ServerAction::Close(e) => {
                    telemetry::rpc_fault("closed");
                    tracing::info!(%peer, error = %e, "protocol violation; closing");
                    return;
                }
                ServerAction::Activate(call) => match self.activate(&call, peer).await {
                    Some(result) => conn.respond(&call, result.as_deref().map_err(|h| *h)),
                    // Not durable: close so the client retries (another host) instead of
                    // receiving an answer we might lose.
                    None => return,
                },
            };
            if let Err(e) = stream.write_all(&reply).await {
                tracing::debug!(%peer, error = %e, "write failed");
                return;
            }
        }
    }

    /// Runs one activation. `None` means the request could not be committed.
    async fn activate(
        &self,
        call: &ActivationCall,
        peer: SocketAddr,
    ) -> Option<Result<Vec<u8>, u32>> {
        let started = Instant::now();
        let decoded = match kms::decode_request(&call.kms_message) {
            Ok(d) => d,
            Err(e) => {
                // Malformed requests never reach the replicated state.
                let hresult = e.hresult();
                telemetry::invalid_request(&e.to_string());
                tracing::info!(
                    event_id = 12290u32,
                    client = %peer,
                    result = %format!("0x{hresult:08X}"),
                    error = %e,
                    "activation request rejected before decoding"
                );
                return Some(Err(hresult));
            }
        };
        let base = &decoded.base;
        if let Err(reason) = self.admit_client(base, peer.ip()).await {
            self.edge_refused(reason, peer);
            return Some(Err(HR_SERVER_BUSY));
        }
        let request = ActivationRequest {
            application_id: base.application_id,
            sku_id: base.sku_id,
            kms_counted_id: base.kms_counted_id,
            client_machine_id: base.client_machine_id,
            previous_client_machine_id: base.previous_client_machine_id,
            required_client_count: base.required_client_count,
            license_status: base.license_status,
            binding_expiration: base.binding_expiration,
            is_client_vm: base.is_client_vm,
            request_time: base.request_time,
            workstation_name: base.workstation_name.clone(),
            protocol_major: base.version.major,
            protocol_minor: base.version.minor,
            client_address: Some(SocketAddr::new(canonical_ip(peer.ip()), peer.port())),
        };
        let outcome = match self.engine.activate(request).await {
            Ok(o) => o,
            Err(e) => {
                telemetry::rpc_fault("not_committed");
                tracing::error!(client = %peer, error = %e, "activation not committed; closing connection");
                return None;
            }
        };
        let result = match &outcome {
            ActivationOutcome::Granted(grant) => {
                let response = BaseResponse {
                    version: base.version,
                    epid: grant.epid.clone(),
                    client_machine_id: base.client_machine_id,
                    request_time: base.request_time,
                    current_count: grant.current_count,
                    activation_interval: grant.activation_interval,
                    renewal_interval: grant.renewal_interval,
                };
                let random = ResponseRandom {
                    salt: rand::random(),
                    iv: rand::random(),
                };
                Ok(kms::encode_response(
                    &decoded, &response, grant.hwid, &random,
                ))
            }
            ActivationOutcome::Refused(refusal) => Err(refusal.hresult),
        };
        telemetry::activation(base, &outcome, peer, started.elapsed());
        Some(result)
    }
}

impl KmsService {
    /// The per-source new-client check: a registered CMID always passes, a new one needs a
    /// token of its source's bucket (see [`crate::edge`]).
    async fn admit_client(&self, base: &kms::BaseRequest, ip: IpAddr) -> Result<(), Refusal> {
        let now = Instant::now();
        match self.edge.new_client(ip, now) {
            NewClientCheck::Allowed => Ok(()),
            NewClientCheck::LookUp => {
                let list = kms_core::counting::application_list(
                    &base.application_id,
                    &base.kms_counted_id,
                )
                .id;
                let known = self
                    .engine
                    .state()
                    .read()
                    .await
                    .registry()
                    .contains(&list, &base.client_machine_id);
                self.edge.new_client_after_lookup(ip, known, now)
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) are shown and matched as IPv4.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

enum ReadError {
    Eof,
    Io(std::io::Error),
    Frame(kms_wire::rpc::FrameError),
}

async fn read_pdu(
    stream: &mut TcpStream,
    header: &mut [u8; HEADER_LEN],
    pdu: &mut Vec<u8>,
    max: usize,
) -> Result<(), ReadError> {
    if let Err(e) = stream.read_exact(header).await {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ReadError::Eof
        } else {
            ReadError::Io(e)
        });
    }
    let len = kms_wire::server::pdu_length(header, max).map_err(ReadError::Frame)?;
    pdu.clear();
    pdu.extend_from_slice(header);
    pdu.resize(len, 0);
    if let Some(body) = pdu.get_mut(HEADER_LEN..) {
        stream.read_exact(body).await.map_err(ReadError::Io)?;
    }
    Ok(())
}

/// Binds the KMS listeners. IPv6 sockets are v6-only so `0.0.0.0` and `[::]` can share a port.
/// With the built-in default list, an address the host cannot bind (e.g. no IPv6) is skipped
/// with a warning as long as one listener remains.
pub fn bind_listeners(
    addrs: &[SocketAddr],
    tolerate_unavailable: bool,
) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for addr in addrs {
        match bind_one(*addr) {
            Ok(l) => listeners.push(l),
            Err(e) if tolerate_unavailable => {
                tracing::warn!(%addr, error = %e, "KMS listen address unavailable; skipped");
            }
            Err(e) => return Err(anyhow::anyhow!("cannot listen on {addr}: {e}")),
        }
    }
    if listeners.is_empty() {
        anyhow::bail!("no KMS listen address could be bound");
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}
