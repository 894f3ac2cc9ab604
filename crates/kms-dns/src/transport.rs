//! One bounded conversation with a DNS server over hickory's client (TCP or UDP), optionally
//! TSIG-signing updates with hickory's `TSigner`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use hickory_client::client::Client;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{Message, MessageFinalizer, MessageVerifier, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::tcp::TcpClientStream;
use hickory_proto::udp::UdpClientStream;
use hickory_proto::xfer::{DnsHandle, DnsRequest, DnsRequestOptions, DnsResponse};
use hickory_proto::{ProtoError, ProtoErrorKind};
use tokio::task::JoinHandle;

use crate::config::TsigKey;
use crate::error::PublishError;

/// How to talk to the DNS server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    /// One TCP connection per publish round (no truncation, works everywhere; the default).
    #[default]
    Tcp,
    /// UDP datagrams (what `nsupdate` uses by default).
    Udp,
}

/// TSIG fudge (allowed clock difference), the value BIND and nsupdate use.
const TSIG_FUDGE: u16 = 300;

/// Signs with hickory's [`TSigner`]. Difference: when the answer's signature does not verify
/// but the answer carries an error rcode (a server answers a bad key or bad signature with an
/// *unsigned* NOTAUTH), the answer is still handed back so that the caller can report the rcode;
/// `unverified` records that. Such an answer can only ever be counted as a failure.
struct ReportingSigner {
    inner: TSigner,
    unverified: Arc<AtomicBool>,
}

impl MessageFinalizer for ReportingSigner {
    fn finalize_message(
        &self,
        message: &Message,
        current_time: u32,
    ) -> Result<(Vec<Record>, Option<MessageVerifier>), ProtoError> {
        let (records, verifier) = self.inner.finalize_message(message, current_time)?;
        let flag = self.unverified.clone();
        let verifier = verifier.map(|mut verify| {
            let wrapped: MessageVerifier = Box::new(move |bytes: &[u8]| match verify(bytes) {
                Ok(response) => {
                    flag.store(false, Ordering::SeqCst);
                    Ok(response)
                }
                Err(error) => match DnsResponse::from_buffer(bytes.to_vec()) {
                    Ok(response) if response.response_code() != ResponseCode::NoError => {
                        flag.store(true, Ordering::SeqCst);
                        Ok(response)
                    }
                    _ => Err(error),
                },
            });
            wrapped
        });
        Ok((records, verifier))
    }
}

/// Builds the hickory signer for a key.
fn signer(key: &TsigKey) -> Result<TSigner, PublishError> {
    let name = Name::from_ascii(key.name())
        .map_err(|e| PublishError::InvalidName(format!("TSIG key name {}: {e}", key.name())))?;
    TSigner::new(
        key.secret().to_vec(),
        key.algorithm().clone(),
        name,
        TSIG_FUDGE,
    )
    .map_err(|e| PublishError::InvalidName(format!("TSIG key {}: {e}", key.name())))
}

/// An answer plus whether its TSIG verified (always true for unsigned sessions).
pub(crate) struct Answer {
    pub response: DnsResponse,
    pub signed: bool,
}

/// A connection (TCP) or socket setup (UDP) to one server; dropped = closed.
pub(crate) struct Session {
    client: Client,
    background: JoinHandle<()>,
    label: String,
    timeout: Duration,
    unverified: Arc<AtomicBool>,
    has_key: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.background.abort();
    }
}

impl Session {
    /// Opens a session; `label` names the server in errors. Every step is bounded by
    /// `timeout`.
    pub async fn open(
        addr: SocketAddr,
        label: &str,
        transport: Transport,
        timeout: Duration,
        key: Option<&TsigKey>,
    ) -> Result<Self, PublishError> {
        let unverified = Arc::new(AtomicBool::new(false));
        let finalizer: Option<Arc<dyn MessageFinalizer>> = match key {
            Some(key) => Some(Arc::new(ReportingSigner {
                inner: signer(key)?,
                unverified: unverified.clone(),
            })),
            None => None,
        };
        let provider = TokioRuntimeProvider::new();
        let connect = async {
            match transport {
                Transport::Tcp => {
                    let (stream, handle) =
                        TcpClientStream::new(addr, None, Some(timeout), provider);
                    let (client, bg) =
                        Client::with_timeout(stream, handle, timeout, finalizer).await?;
                    Ok::<_, ProtoError>((
                        client,
                        tokio::spawn(async move {
                            let _ = bg.await;
                        }),
                    ))
                }
                Transport::Udp => {
                    let stream = UdpClientStream::builder(addr, provider)
                        .with_timeout(Some(timeout))
                        .with_signer(finalizer)
                        .build();
                    let (client, bg) = Client::connect(stream).await?;
                    Ok((
                        client,
                        tokio::spawn(async move {
                            let _ = bg.await;
                        }),
                    ))
                }
            }
        };
        let (client, background) = match tokio::time::timeout(timeout, connect).await {
            Err(_) => {
                return Err(PublishError::Timeout {
                    server: label.to_owned(),
                    after: timeout,
                })
            }
            Ok(Err(e)) => return Err(proto_error(label, timeout, e)),
            Ok(Ok(pair)) => pair,
        };
        Ok(Self {
            client,
            background,
            label: label.to_owned(),
            timeout,
            unverified,
            has_key: key.is_some(),
        })
    }

    /// Sends one message and waits (bounded) for its answer. The rcode is not interpreted here.
    pub async fn exchange(&self, message: Message) -> Result<Answer, PublishError> {
        let mut options = DnsRequestOptions::default();
        options.use_edns = message.extensions().is_some();
        let request = DnsRequest::new(message, options);
        let mut responses = self.client.send(request);
        let first = tokio::time::timeout(self.timeout, responses.next()).await;
        let response = match first {
            Err(_) => {
                return Err(PublishError::Timeout {
                    server: self.label.clone(),
                    after: self.timeout,
                })
            }
            // hickory ends the response stream without an item when its own timer fires
            // (a closed connection is reported as an error item instead).
            Ok(None) => {
                return Err(PublishError::Timeout {
                    server: self.label.clone(),
                    after: self.timeout,
                })
            }
            Ok(Some(Err(e))) => return Err(proto_error(&self.label, self.timeout, e)),
            Ok(Some(Ok(response))) => response,
        };
        // The flag is only meaningful for signed (update) messages; queries are not signed.
        let signed = !(self.has_key && self.unverified.swap(false, Ordering::SeqCst));
        Ok(Answer { response, signed })
    }

    pub fn label(&self) -> &str {
        &self.label
    }
}

/// Maps hickory's transport errors onto the typed error.
pub(crate) fn proto_error(label: &str, timeout: Duration, error: ProtoError) -> PublishError {
    let server = label.to_owned();
    match error.kind() {
        ProtoErrorKind::Timeout => PublishError::Timeout {
            server,
            after: timeout,
        },
        ProtoErrorKind::Io(_)
        | ProtoErrorKind::NoConnections
        | ProtoErrorKind::Busy
        | ProtoErrorKind::Canceled(_) => PublishError::Unreachable {
            server,
            reason: error.to_string(),
        },
        _ => {
            let reason = error.to_string();
            if reason.contains("closed") {
                PublishError::Unreachable { server, reason }
            } else {
                PublishError::Protocol { server, reason }
            }
        }
    }
}
