//! An async KMS client: TCP + the sans-IO [`kms_wire::client`] and [`kms_wire::kms`] codecs.
//! It checks every answer the way `vlmcs` does.

use std::net::SocketAddr;
use std::time::Duration;

use kms_wire::client::{BindOptions, CallResult, ClientConnection, ClientError};
use kms_wire::kms::{self, BaseRequest, DecodedResponse, ResponseError};
use kms_wire::server::HEADER_LEN;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest PDU the client accepts from a server.
const MAX_PDU: usize = 8192;

/// Why a request did not produce a verified answer.
#[derive(Debug, thiserror::Error)]
pub enum KmsClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the server closed the connection")]
    Closed,
    #[error("RPC: {0}")]
    Rpc(#[from] ClientError),
    #[error("malformed PDU from the server: {0}")]
    Frame(#[from] kms_wire::rpc::FrameError),
    #[error("response rejected: {0}")]
    Response(#[from] ResponseError),
}

/// The verified outcome of one request.
#[derive(Debug, Clone)]
pub enum Answer {
    /// A response that passed every check.
    Activated(DecodedResponse),
    /// The host answered with an error HRESULT.
    Refused(u32),
}

/// One connection to a KMS host.
pub struct KmsClient {
    stream: TcpStream,
    rpc: ClientConnection,
    timeout: Duration,
    peer: SocketAddr,
}

impl KmsClient {
    /// Connects and performs the RPC bind (and the ALTER_CONTEXT when the server asks for it).
    pub async fn connect(
        addr: &str,
        options: BindOptions,
        timeout: Duration,
    ) -> Result<Self, KmsClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| KmsClientError::Timeout(timeout))?
            .map_err(|source| KmsClientError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        Self::bind_on(stream, options, timeout).await
    }

    /// Like [`KmsClient::connect`] from the local address `source` (e.g. another loopback
    /// address, to test per-source limits).
    pub async fn connect_from(
        addr: SocketAddr,
        source: std::net::IpAddr,
        options: BindOptions,
        timeout: Duration,
    ) -> Result<Self, KmsClientError> {
        let connect_error = |source| KmsClientError::Connect {
            addr: addr.to_string(),
            source,
        };
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(connect_error)?;
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(connect_error)?;
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| KmsClientError::Timeout(timeout))?
            .map_err(connect_error)?;
        Self::bind_on(stream, options, timeout).await
    }

    async fn bind_on(
        stream: TcpStream,
        options: BindOptions,
        timeout: Duration,
    ) -> Result<Self, KmsClientError> {
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        let mut client = Self {
            stream,
            rpc: ClientConnection::new(options),
            timeout,
            peer,
        };
        let mut next = Some(client.rpc.bind());
        while let Some(pdu) = next.take() {
            let reply = client.round_trip(&pdu).await?;
            next = client.rpc.handle_bind_reply(&reply)?;
        }
        Ok(client)
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Non-fatal deviations seen on this connection (vlmcs-style warnings).
    pub fn warnings(&self) -> &[String] {
        self.rpc.warnings()
    }

    /// Sends one activation request and verifies the answer. `iv` is the client IV (v5/v6).
    pub async fn activate(
        &mut self,
        request: &BaseRequest,
        iv: [u8; 16],
    ) -> Result<Answer, KmsClientError> {
        let (message, session) = kms::encode_request(request, iv);
        let pdu = self.rpc.request(&message)?;
        let reply = self.round_trip(&pdu).await?;
        match self.rpc.handle_response(&reply)? {
            CallResult::Success(bytes) => {
                Ok(Answer::Activated(kms::decode_response(&session, &bytes)?))
            }
            CallResult::Error(hresult) => Ok(Answer::Refused(hresult)),
        }
    }

    async fn round_trip(&mut self, pdu: &[u8]) -> Result<Vec<u8>, KmsClientError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            self.stream.write_all(pdu).await?;
            read_pdu(&mut self.stream).await
        })
        .await
        .map_err(|_| KmsClientError::Timeout(timeout))?
    }
}

async fn read_pdu(stream: &mut TcpStream) -> Result<Vec<u8>, KmsClientError> {
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = stream.read_exact(&mut header).await {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            KmsClientError::Closed
        } else {
            KmsClientError::Io(e)
        });
    }
    let len = kms_wire::server::pdu_length(&header, MAX_PDU)?;
    let mut pdu = header.to_vec();
    pdu.resize(len, 0);
    if let Some(body) = pdu.get_mut(HEADER_LEN..) {
        stream.read_exact(body).await?;
    }
    Ok(pdu)
}
