//! Request statistics, like the counters `slmgr /dlv` shows on a KMS host.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Requests per client license status (protocol sheet section 3, `LicenseStatus`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseStatusCounts {
    /// 0: unlicensed.
    pub unlicensed: u64,
    /// 1: licensed (renewals).
    pub licensed: u64,
    /// 2: initial (out-of-box) grace.
    pub initial_grace: u64,
    /// 3: out-of-tolerance grace.
    pub out_of_tolerance_grace: u64,
    /// 4: non-genuine grace.
    pub non_genuine_grace: u64,
    /// 5: notification.
    pub notification: u64,
    /// 6: extended grace.
    pub extended_grace: u64,
    /// Any other value.
    pub other: u64,
}

impl LicenseStatusCounts {
    /// Counts one request with wire license status `status`.
    pub fn record(&mut self, status: u32) {
        let slot = match status {
            0 => &mut self.unlicensed,
            1 => &mut self.licensed,
            2 => &mut self.initial_grace,
            3 => &mut self.out_of_tolerance_grace,
            4 => &mut self.non_genuine_grace,
            5 => &mut self.notification,
            6 => &mut self.extended_grace,
            _ => &mut self.other,
        };
        *slot = slot.saturating_add(1);
    }
}

/// Host-wide request counters. Part of the replicated state, so identical on every node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statistics {
    /// Every activation request applied, granted or refused.
    pub total_requests: u64,
    /// Requests answered with an error (refused).
    pub failed_requests: u64,
    pub by_license_status: LicenseStatusCounts,
    /// Requests per application list id. Requests whose list is neither known to the catalog
    /// nor already counted are summed under the nil UUID, so junk ids cannot grow this map.
    pub by_application: BTreeMap<Uuid, u64>,
    /// Refusals per HRESULT.
    pub refusals: BTreeMap<u32, u64>,
}

impl Statistics {
    /// Records one request; `refusal` is the HRESULT when it was refused.
    pub fn record(&mut self, application_list: Uuid, license_status: u32, refusal: Option<u32>) {
        self.total_requests = self.total_requests.saturating_add(1);
        self.by_license_status.record(license_status);
        let per_app = self.by_application.entry(application_list).or_default();
        *per_app = per_app.saturating_add(1);
        if let Some(hresult) = refusal {
            self.failed_requests = self.failed_requests.saturating_add(1);
            let per_code = self.refusals.entry(hresult).or_default();
            *per_code = per_code.saturating_add(1);
        }
    }

    /// Granted requests (total minus refused).
    pub fn granted_requests(&self) -> u64 {
        self.total_requests.saturating_sub(self.failed_requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_status_buckets() {
        let mut c = LicenseStatusCounts::default();
        for s in [0, 1, 1, 2, 2, 2, 3, 4, 5, 6, 7, 99, u32::MAX] {
            c.record(s);
        }
        assert_eq!(
            c,
            LicenseStatusCounts {
                unlicensed: 1,
                licensed: 2,
                initial_grace: 3,
                out_of_tolerance_grace: 1,
                non_genuine_grace: 1,
                notification: 1,
                extended_grace: 1,
                other: 3,
            }
        );
    }

    #[test]
    fn record_counts_totals_failures_and_codes() {
        let win = Uuid::from_u128(1);
        let office = Uuid::from_u128(2);
        let mut s = Statistics::default();
        s.record(win, 2, None);
        s.record(win, 1, Some(0xC004_F042));
        s.record(office, 2, Some(0xC004_F042));
        s.record(office, 0, Some(0x8007_000D));
        assert_eq!(s.total_requests, 4);
        assert_eq!(s.failed_requests, 3);
        assert_eq!(s.granted_requests(), 1);
        assert_eq!(s.by_application.get(&win), Some(&2));
        assert_eq!(s.by_application.get(&office), Some(&2));
        assert_eq!(s.refusals.get(&0xC004_F042), Some(&2));
        assert_eq!(s.refusals.get(&0x8007_000D), Some(&1));
        assert_eq!(s.by_license_status.initial_grace, 2);
    }
}
