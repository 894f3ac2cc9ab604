//! Typed publish errors, with the DNS rcode when the server answered.

use std::fmt;
use std::time::Duration;

use hickory_proto::op::ResponseCode;

/// A DNS response code, shown by its mnemonic (`REFUSED`, `NOTAUTH`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rcode(pub u16);

impl Rcode {
    pub const NOERROR: Rcode = Rcode(0);
    pub const FORMERR: Rcode = Rcode(1);
    pub const SERVFAIL: Rcode = Rcode(2);
    pub const NXDOMAIN: Rcode = Rcode(3);
    pub const NOTIMP: Rcode = Rcode(4);
    pub const REFUSED: Rcode = Rcode(5);
    pub const YXDOMAIN: Rcode = Rcode(6);
    pub const YXRRSET: Rcode = Rcode(7);
    pub const NXRRSET: Rcode = Rcode(8);
    pub const NOTAUTH: Rcode = Rcode(9);
    pub const NOTZONE: Rcode = Rcode(10);

    /// The mnemonic used by `dig`/`nsupdate` and in events and metric labels.
    pub fn mnemonic(self) -> String {
        let name = match self.0 {
            0 => "NOERROR",
            1 => "FORMERR",
            2 => "SERVFAIL",
            3 => "NXDOMAIN",
            4 => "NOTIMP",
            5 => "REFUSED",
            6 => "YXDOMAIN",
            7 => "YXRRSET",
            8 => "NXRRSET",
            9 => "NOTAUTH",
            10 => "NOTZONE",
            16 => "BADSIG",
            17 => "BADKEY",
            18 => "BADTIME",
            other => return format!("RCODE{other}"),
        };
        name.to_owned()
    }
}

impl From<ResponseCode> for Rcode {
    fn from(code: ResponseCode) -> Self {
        Rcode(u16::from(code))
    }
}

impl fmt::Display for Rcode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.mnemonic())
    }
}

/// What was being done when the server said no.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Reading the current records.
    Query,
    /// Sending the RFC 2136 update.
    Update,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Query => "query",
            Stage::Update => "update",
        })
    }
}

/// Why publishing to one zone failed. Every variant is a normal, reportable outcome: nothing
/// here panics or blocks beyond the configured timeouts.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// `server` names a host that could not be resolved to an address.
    #[error("cannot resolve DNS server {server}: {reason}")]
    ServerAddress { server: String, reason: String },
    /// No answer within the bound (server down, packets dropped, server hung).
    #[error("DNS server {server} did not answer within {after:?}")]
    Timeout { server: String, after: Duration },
    /// Connection refused, network unreachable, connection reset.
    #[error("cannot reach DNS server {server}: {reason}")]
    Unreachable { server: String, reason: String },
    /// The server answered with an error rcode (REFUSED, NOTAUTH, SERVFAIL, NOTZONE, ...).
    /// `signed` is false when the answer carried no verifiable TSIG (for example the unsigned
    /// NOTAUTH a server sends back for a bad key): such answers are reported, never trusted.
    #[error("DNS server {server} answered {rcode} to the {stage}{}", if *signed { "" } else { " (answer not signed)" })]
    Rejected {
        server: String,
        stage: Stage,
        rcode: Rcode,
        signed: bool,
    },
    /// The prerequisites kept failing: somebody else changed the RRset between our read and
    /// our update on every attempt.
    #[error(
        "DNS server {server}: records changed concurrently on {attempts} attempts (last {rcode})"
    )]
    Conflict {
        server: String,
        attempts: u32,
        rcode: Rcode,
    },
    /// A malformed, truncated or unverifiable answer.
    #[error("bad answer from DNS server {server}: {reason}")]
    Protocol { server: String, reason: String },
    /// A name (zone, target) that cannot be used.
    #[error("invalid DNS name: {0}")]
    InvalidName(String),
}

impl PublishError {
    /// The DNS rcode, when the server answered with one.
    pub fn rcode(&self) -> Option<Rcode> {
        match self {
            PublishError::Rejected { rcode, .. } | PublishError::Conflict { rcode, .. } => {
                Some(*rcode)
            }
            _ => None,
        }
    }

    /// A short upper-case label for events and metrics: the rcode mnemonic, or `TIMEOUT`,
    /// `UNREACHABLE`, `SERVER_ADDRESS`, `PROTOCOL`, `INVALID_NAME`.
    pub fn label(&self) -> String {
        match self {
            PublishError::Rejected { rcode, .. } | PublishError::Conflict { rcode, .. } => {
                rcode.mnemonic()
            }
            PublishError::Timeout { .. } => "TIMEOUT".into(),
            PublishError::Unreachable { .. } => "UNREACHABLE".into(),
            PublishError::ServerAddress { .. } => "SERVER_ADDRESS".into(),
            PublishError::Protocol { .. } => "PROTOCOL".into(),
            PublishError::InvalidName(_) => "INVALID_NAME".into(),
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, PublishError::Timeout { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rcode_names_and_labels() {
        assert_eq!(Rcode::from(ResponseCode::Refused).to_string(), "REFUSED");
        assert_eq!(Rcode::from(ResponseCode::NotAuth), Rcode::NOTAUTH);
        assert_eq!(Rcode(23).to_string(), "RCODE23");
        let e = PublishError::Rejected {
            server: "s".into(),
            stage: Stage::Update,
            rcode: Rcode::NOTAUTH,
            signed: false,
        };
        assert_eq!(e.label(), "NOTAUTH");
        assert_eq!(e.rcode(), Some(Rcode::NOTAUTH));
        assert!(e
            .to_string()
            .contains("NOTAUTH to the update (answer not signed)"));
        let t = PublishError::Timeout {
            server: "s".into(),
            after: Duration::from_secs(1),
        };
        assert_eq!((t.label().as_str(), t.rcode()), ("TIMEOUT", None));
    }
}
