//! The replicated host policy: which products are activated, intervals, checks.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Bounds a genuine host accepts for both intervals, in minutes (15 minutes to 30 days).
pub const INTERVAL_RANGE: std::ops::RangeInclusive<u32> = 15..=43_200;
pub const DEFAULT_ACTIVATION_INTERVAL: u32 = 120;
pub const DEFAULT_RENEWAL_INTERVAL: u32 = 10_080;
pub const DEFAULT_RETENTION_DAYS: u32 = 180;
/// Skew a genuine host tolerates when the check is on (4 hours).
pub const DEFAULT_MAX_CLOCK_SKEW_MINUTES: u32 = 240;

/// Which KMS ids the host activates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProductPolicy {
    /// Any KMS id, known to the catalog or not (a new product works before the catalog names it).
    #[default]
    Open,
    /// Only the KMS ids the installed host key of the request's application activates
    /// (down-level included), like a genuine host; others, and retail, preview or mismatched
    /// requests, are refused with 0xC004F042.
    Strict,
}

/// Replicated policy. Changed only by `Command::SetPolicy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Minutes a failed client waits before retrying (VLActivationInterval).
    pub activation_interval: u32,
    /// Minutes between renewals of an activated client (VLRenewalInterval).
    pub renewal_interval: u32,
    pub product_policy: ProductPolicy,
    /// Legacy (before host keys per application): CSVLK ids the organisation licensed. Kept
    /// so old log entries and snapshots decode; `apply` turns a non-empty list into host keys
    /// (the newest licensed key per application, see `Command::SetHostKeys`) and clears it.
    /// Decisions never read it.
    pub licensed_csvlks: Vec<Uuid>,
    /// Refuse clients whose clock differs by more than this many minutes (0xC004F06C);
    /// `None` disables the check. Default 240 (4 hours), like a genuine host.
    pub max_clock_skew_minutes: Option<u32>,
    /// Client networks allowed to connect; empty = everyone.
    pub client_networks: Vec<IpNet>,
    /// Days a client stays in the registry after it was last seen.
    pub registry_retention_days: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            activation_interval: DEFAULT_ACTIVATION_INTERVAL,
            renewal_interval: DEFAULT_RENEWAL_INTERVAL,
            product_policy: ProductPolicy::Open,
            licensed_csvlks: Vec::new(),
            max_clock_skew_minutes: Some(DEFAULT_MAX_CLOCK_SKEW_MINUTES),
            client_networks: Vec::new(),
            registry_retention_days: DEFAULT_RETENTION_DAYS,
        }
    }
}

/// A policy value out of range; `field` names the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct PolicyError {
    pub field: &'static str,
    pub message: String,
}

impl Policy {
    /// Checks every field against its allowed range (pure: `apply` calls it too).
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (field, value) in [
            ("activation_interval", self.activation_interval),
            ("renewal_interval", self.renewal_interval),
        ] {
            if !INTERVAL_RANGE.contains(&value) {
                return Err(PolicyError {
                    field,
                    message: format!(
                        "{value} minutes is outside {}..={}",
                        INTERVAL_RANGE.start(),
                        INTERVAL_RANGE.end()
                    ),
                });
            }
        }
        if let Some(skew) = self.max_clock_skew_minutes {
            if skew == 0 || skew > 43_200 {
                return Err(PolicyError {
                    field: "max_clock_skew_minutes",
                    message: format!("{skew} minutes is outside 1..=43200"),
                });
            }
        }
        if self.registry_retention_days < 30 || self.registry_retention_days > 3650 {
            return Err(PolicyError {
                field: "registry_retention_days",
                message: format!(
                    "{} days is outside 30..=3650 (a client must outlive its 30-day CMID)",
                    self.registry_retention_days
                ),
            });
        }
        Ok(())
    }
}
