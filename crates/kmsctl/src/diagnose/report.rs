//! The result of `kmsctl diagnose`: an ordered list of checks, each with a status, a stable
//! problem code for scripts, a sentence in plain words and what to do about it.

use serde::Serialize;
use serde_json::Value;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Works.
    Ok,
    /// Works, but something deserves attention (clients may still activate).
    Warn,
    /// Breaks activation for the clients that take this path.
    Fail,
    /// Not checked (an earlier step failed, or it needs `--admin-url`).
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "[ OK ]",
            Status::Warn => "[WARN]",
            Status::Fail => "[FAIL]",
            Status::Skip => "[SKIP]",
        }
    }
}

/// Stable codes of the problems diagnose recognises (`problem` in the JSON output).
pub mod problem {
    pub const NO_SRV_RECORDS: &str = "no_srv_records";
    pub const DNS_TIMEOUT: &str = "dns_timeout";
    pub const DNS_FAILED: &str = "dns_failed";
    pub const NO_ADDRESS: &str = "no_address";
    pub const CONNECTION_REFUSED: &str = "connection_refused";
    pub const CONNECT_TIMEOUT: &str = "connect_timeout";
    pub const CONNECT_FAILED: &str = "connect_failed";
    pub const BIND_FAILED: &str = "rpc_bind_failed";
    pub const PRODUCT_REFUSED: &str = "product_refused";
    pub const CLOCK_SKEW: &str = "clock_skew";
    pub const PROTOCOL_REFUSED: &str = "protocol_refused";
    pub const ACTIVATION_REFUSED: &str = "activation_refused";
    pub const BAD_RESPONSE: &str = "bad_response";
    pub const COUNT_BELOW_N: &str = "count_below_n";
    pub const ADMIN_UNREACHABLE: &str = "admin_unreachable";
    pub const ADMIN_TOKEN: &str = "admin_token_refused";
    pub const NO_QUORUM: &str = "no_quorum";
    pub const DNS_PUBLISH_FAILED: &str = "dns_publish_failed";
    pub const DNS_NOT_PUBLISHED: &str = "dns_not_published";
    pub const POLICY_EXCLUDES_PRODUCT: &str = "policy_excludes_product";
    pub const RECENT_REFUSALS: &str = "recent_refusals";
}

/// One step of the path a client takes.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `srv`, `resolve`, `connect`, `rpc_bind`, `activate`, `count`, `clock`, `policy`,
    /// `host_status`, `host_dns`, `host_events`.
    pub step: &'static str,
    /// What was checked: a DNS name, `host:port`, an address, a protocol version.
    pub subject: String,
    pub status: Status,
    /// Stable code of the problem (see [`problem`]); none when the check passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<&'static str>,
    /// What was found, in plain words.
    pub message: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    /// Details for scripts (records, addresses, counts, times).
    #[serde(skip_serializing_if = "Value::is_null")]
    pub data: Value,
}

impl Check {
    pub fn ok(step: &'static str, subject: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            step,
            subject: subject.into(),
            status: Status::Ok,
            problem: None,
            message: message.into(),
            advice: None,
            data: Value::Null,
        }
    }

    pub fn fail(
        step: &'static str,
        subject: impl Into<String>,
        problem: &'static str,
        message: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        Self {
            step,
            subject: subject.into(),
            status: Status::Fail,
            problem: Some(problem),
            message: message.into(),
            advice: Some(advice.into()),
            data: Value::Null,
        }
    }

    pub fn warn(
        step: &'static str,
        subject: impl Into<String>,
        problem: &'static str,
        message: impl Into<String>,
        advice: impl Into<String>,
    ) -> Self {
        Self {
            status: Status::Warn,
            ..Self::fail(step, subject, problem, message, advice)
        }
    }

    pub fn skip(
        step: &'static str,
        subject: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status: Status::Skip,
            ..Self::ok(step, subject, message)
        }
    }

    pub fn with_data(mut self, data: Value) -> Self {
        self.data = data;
        self
    }
}

/// Everything diagnose found, in the order a client walks the path.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `_vlmcs._tcp.<domain>` or `HOST:PORT`.
    pub target: String,
    /// The product the test activations claimed to be.
    pub product: String,
    /// Its application's N (the count a client of it needs).
    pub required_count: u32,
    /// True when no check failed (warnings allowed).
    pub ok: bool,
    /// Problem codes of failed and warned checks, in order, without repeats.
    pub problems: Vec<&'static str>,
    pub checks: Vec<Check>,
}

impl Report {
    pub fn new(target: String, product: String, required_count: u32) -> Self {
        Self {
            target,
            product,
            required_count,
            ok: true,
            problems: Vec::new(),
            checks: Vec::new(),
        }
    }

    pub fn push(&mut self, check: Check) {
        if check.status == Status::Fail {
            self.ok = false;
        }
        if let Some(p) = check.problem {
            if !self.problems.contains(&p) {
                self.problems.push(p);
            }
        }
        self.checks.push(check);
    }

    /// Checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &Check> {
        self.checks.iter().filter(|c| c.status == Status::Fail)
    }

    /// The report as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "kmsctl diagnose {} (product {}, N {})\n\n",
            self.target, self.product, self.required_count
        );
        for c in &self.checks {
            out.push_str(&format!(
                "{} {:<11} {}: {}\n",
                c.status.label(),
                c.step,
                c.subject,
                c.message
            ));
            if let Some(advice) = &c.advice {
                out.push_str(&format!("       -> {advice}\n"));
            }
        }
        out.push('\n');
        let failed: Vec<&Check> = self.failures().collect();
        if failed.is_empty() {
            let warnings = self
                .checks
                .iter()
                .filter(|c| c.status == Status::Warn)
                .count();
            out.push_str(&format!(
                "Result: no problem found on the path of a KMS client{}.\n",
                if warnings > 0 {
                    format!(" ({warnings} warning(s) above)")
                } else {
                    String::new()
                }
            ));
        } else {
            out.push_str(&format!(
                "Result: {} problem(s): {}\n",
                self.problems.len(),
                self.problems.join(", ")
            ));
            if let Some(first) = failed.first() {
                out.push_str(&format!(
                    "First failure: {} {}: {}\n",
                    first.step, first.subject, first.message
                ));
            }
        }
        out
    }
}
