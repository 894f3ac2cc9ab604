//! The host identity: one ePID per CSVLK and one HWID, generated once (by the proposing node,
//! from its random seed and clock) and then replicated unchanged.

use std::collections::BTreeMap;

use kms_catalog::{catalog, Csvlk, WinBuild};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::UnixMillis;

/// The KMS host's identity as clients see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// Identifies this cluster (peers of another cluster id are rejected).
    pub cluster_id: Uuid,
    /// Hardware id sent in v6 responses.
    pub hwid: [u8; 8],
    /// Windows build the host pretends to run (shared by all ePIDs, like one real host).
    pub host_build: u32,
    /// Language id in the ePIDs.
    pub lcid: u32,
    /// ePID per CSVLK id (catalog `Csvlk::id`).
    pub epids: BTreeMap<Uuid, String>,
}

/// Real Windows LCIDs with a weight: a host is most often installed in US English, then in
/// other widespread languages. A short list keeps every value a genuine one.
const LCIDS: &[(u32, u32)] = &[
    (1033, 40), // en-US
    (2057, 6),  // en-GB
    (1031, 6),  // de-DE
    (1036, 5),  // fr-FR
    (3082, 4),  // es-ES
    (1040, 3),  // it-IT
    (1041, 4),  // ja-JP
    (2052, 4),  // zh-CN
    (1046, 3),  // pt-BR
    (1049, 3),  // ru-RU
    (1043, 2),  // nl-NL
    (1045, 2),  // pl-PL
    (1042, 2),  // ko-KR
    (1053, 1),  // sv-SE
    (1028, 1),  // zh-TW
];

/// Largest ePID length: its UTF-16 form plus NUL must fit the 128-byte field of the response.
const MAX_EPID_CHARS: usize = 128 / 2 - 1;

impl HostIdentity {
    /// Generates a plausible identity from `seed` at time `now`. Deterministic in its inputs.
    ///
    /// Every CSVLK with a group id and a key range gets an ePID. Each CSVLK draws from its own
    /// ChaCha20 stream (selected by its id), so its ePID does not depend on which other CSVLKs
    /// the catalog contains or on any iteration order.
    pub fn generate(now: UnixMillis, seed: [u8; 32]) -> Self {
        let cat = catalog();
        let now_secs = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        let mut rng = ChaCha20Rng::from_seed(seed);

        let mut hwid = [0u8; 8];
        rng.fill(&mut hwid);
        let mut cluster_bytes = [0u8; 16];
        rng.fill(&mut cluster_bytes);
        let cluster_id = uuid::Builder::from_random_bytes(cluster_bytes).into_uuid();
        let lcid = pick_lcid(&mut rng);

        let build = host_build(now_secs);
        let (host_build, platform_id, build_date) = build.map_or((17763, 3612, 0), |b| {
            (b.build, b.platform_id, b.release_date)
        });

        let mut epids = BTreeMap::new();
        for csvlk in cat.csvlks() {
            let (Some(group), Some((min, max))) = (csvlk.group_id, csvlk.key_range()) else {
                continue;
            };
            let mut r = ChaCha20Rng::from_seed(seed);
            r.set_stream(stream_of(&csvlk.id));
            let key_id = r.gen_range(min..=max);
            let earliest = csvlk.release_date.max(build_date);
            // A clock before the release dates cannot give a later date: use the release date.
            let date = if now_secs > earliest {
                r.gen_range(earliest..=now_secs)
            } else {
                earliest
            };
            let (year, day_of_year) = year_and_day_of_year(date);
            let epid = format!(
                "{platform_id:05}-{group:05}-{:03}-{:06}-03-{lcid}-{host_build}.0000-{day_of_year:03}{year:04}",
                key_id / 1_000_000,
                key_id % 1_000_000,
            );
            epids.insert(csvlk.id, epid);
        }

        Self {
            cluster_id,
            hwid,
            host_build,
            lcid,
            epids,
        }
    }

    /// A new ePID for `key` (proposer side: random key id and date from `seed`), built on
    /// this identity's host build and language. `None` when the key has no group id or range.
    pub fn make_epid(
        &self,
        key: &kms_catalog::HostKeyData,
        now: UnixMillis,
        seed: [u8; 32],
    ) -> Option<String> {
        self.make_epid_on(key, self.host_build, now, seed)
    }

    /// [`HostIdentity::make_epid`] on another host build (host keys changing the build).
    pub fn make_epid_on(
        &self,
        key: &kms_catalog::HostKeyData,
        host_build: u32,
        now: UnixMillis,
        seed: [u8; 32],
    ) -> Option<String> {
        let group = key.group_id?;
        if !key.can_make_epid() {
            return None;
        }
        let build = catalog().win_build(host_build);
        let (platform_id, build_date) =
            build.map_or((3612, 0), |b| (b.platform_id, b.release_date));
        let now_secs = i64::try_from(now / 1000).unwrap_or(i64::MAX);
        let mut r = ChaCha20Rng::from_seed(seed);
        r.set_stream(stream_of(&key.id));
        let key_id = r.gen_range(key.min_key_id..=key.max_key_id);
        let earliest = key.release_date.max(build_date);
        let date = if now_secs > earliest {
            r.gen_range(earliest..=now_secs)
        } else {
            earliest
        };
        let (year, day_of_year) = year_and_day_of_year(date);
        Some(format!(
            "{platform_id:05}-{group:05}-{:03}-{:06}-03-{}-{}.0000-{day_of_year:03}{year:04}",
            key_id / 1_000_000,
            key_id % 1_000_000,
            self.lcid,
            host_build,
        ))
    }

    /// The HWID as 16 uppercase hex digits in byte order (as vlmcs prints it).
    pub fn hwid_hex(&self) -> String {
        self.hwid.iter().map(|b| format!("{b:02X}")).collect()
    }
}

/// The host build an ePID claims (`...-BUILD.0000-...`).
pub fn epid_build(epid: &str) -> Option<u32> {
    epid.split('-')
        .nth(6)
        .and_then(|b| b.strip_suffix(".0000"))
        .and_then(|b| b.parse().ok())
}

/// The host build a host with `keys` installed can claim: `current` when every key may be
/// installed on it, else the newest server ePID build none of them excludes (Microsoft's
/// "CSVLK can be hosted on"; `max_host_build`). Proposer side (reads the compiled-in builds).
pub fn host_build_for(keys: &[&kms_catalog::HostKeyData], current: u32) -> u32 {
    let limit = keys
        .iter()
        .map(|k| k.max_host_build)
        .filter(|b| *b > 0)
        .min();
    match limit {
        None => current,
        Some(l) if current <= l => current,
        Some(l) => catalog()
            .win_builds()
            .iter()
            .filter(|b| b.use_for_epid && b.may_be_server && b.build <= l)
            .map(|b| b.build)
            .max()
            .unwrap_or(current),
    }
}

/// Whether `epid` fits `key`: same group id and a key id inside the key's range.
pub fn epid_matches(epid: &str, key: &kms_catalog::HostKeyData) -> bool {
    let parts: Vec<&str> = epid.split('-').collect();
    let (Some(group), Some(hi), Some(lo)) = (parts.get(1), parts.get(2), parts.get(3)) else {
        return false;
    };
    let num = |s: &str| s.parse::<u32>().ok();
    let (Some(group), Some(hi), Some(lo)) = (num(group), num(hi), num(lo)) else {
        return false;
    };
    let key_id = hi.saturating_mul(1_000_000).saturating_add(lo);
    key.group_id == Some(group) && (key.min_key_id..=key.max_key_id).contains(&key_id)
}

/// Parses a HWID given as 16 hex digits in byte order (an optional `0x` prefix is accepted).
pub fn parse_hwid(s: &str) -> Result<[u8; 8], String> {
    let t = s.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    if t.len() != 16 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("HWID {s:?} is not 16 hex digits"));
    }
    let mut out = [0u8; 8];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = t
            .get(2 * i..2 * i + 2)
            .ok_or_else(|| format!("HWID {s:?} is not 16 hex digits"))?;
        *byte = u8::from_str_radix(pair, 16).map_err(|e| format!("HWID {s:?}: {e}"))?;
    }
    Ok(out)
}

/// Checks an operator-supplied ePID:
/// `PPPPP-GGGGG-KKK-KKKKKK-03-LCID-BUILD.0000-DDDYYYY` (LCID 4-5 digits, build 4-5 digits,
/// day of year 001-366), ASCII, and short enough for the response's 128-byte UTF-16 field.
pub fn validate_epid(epid: &str) -> Result<(), String> {
    if !epid.is_ascii() {
        return Err("ePID must be ASCII".into());
    }
    if epid.len() > MAX_EPID_CHARS {
        return Err(format!(
            "ePID is {} characters; at most {MAX_EPID_CHARS} fit the response",
            epid.len()
        ));
    }
    let digits = |s: &str, lo: usize, hi: usize| {
        (lo..=hi).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
    };
    let parts: Vec<&str> = epid.split('-').collect();
    let [platform, group, key_hi, key_lo, channel, lcid, build, date] = parts.as_slice() else {
        return Err(format!(
            "ePID {epid:?} must have 8 dash-separated groups (PPPPP-GGGGG-KKK-KKKKKK-03-LCID-BUILD.0000-DDDYYYY)"
        ));
    };
    let checks: [(bool, &str); 7] = [
        (digits(platform, 5, 5), "platform id must be 5 digits"),
        (digits(group, 5, 5), "group id must be 5 digits"),
        (
            digits(key_hi, 3, 3) && digits(key_lo, 6, 6),
            "key id must be 3 + 6 digits",
        ),
        (*channel == "03", "license channel must be 03 (volume)"),
        (
            digits(lcid, 4, 5) && !lcid.starts_with('0'),
            "LCID must be 4 or 5 decimal digits",
        ),
        (
            build
                .strip_suffix(".0000")
                .is_some_and(|b| digits(b, 4, 5) && !b.starts_with('0')),
            "build must be 4 or 5 digits followed by .0000",
        ),
        (
            digits(date, 7, 7)
                && date
                    .get(..3)
                    .and_then(|d| d.parse::<u16>().ok())
                    .is_some_and(|d| (1..=366).contains(&d)),
            "date must be DDDYYYY with day of year 001-366",
        ),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, msg)) => Err(format!("ePID {epid:?}: {msg}")),
        None => Ok(()),
    }
}

fn pick_lcid(rng: &mut ChaCha20Rng) -> u32 {
    let total: u32 = LCIDS.iter().map(|(_, w)| w).sum();
    let mut roll = rng.gen_range(0..total);
    for &(lcid, weight) in LCIDS {
        if roll < weight {
            return lcid;
        }
        roll -= weight;
    }
    1033
}

/// The newest build a KMS host for every product could run: an ePID build that may be a
/// server, released by `now_secs`, and forbidden by no ePID-capable CSVLK. If nothing
/// qualifies, drops the CSVLK condition first, then the release date.
fn host_build(now_secs: i64) -> Option<&'static WinBuild> {
    let cat = catalog();
    let candidates: Vec<(usize, &'static WinBuild)> = cat
        .win_builds()
        .iter()
        .enumerate()
        .filter(|(_, b)| b.use_for_epid && b.may_be_server)
        .collect();
    let allowed_by_all = |i: usize| {
        cat.csvlks()
            .iter()
            .filter(|c: &&Csvlk| c.can_make_epid())
            .all(|c| c.allows_win_build(i))
    };
    let newest = |ok: &dyn Fn(usize, &WinBuild) -> bool| {
        candidates
            .iter()
            .filter(|(i, b)| ok(*i, b))
            .max_by_key(|(_, b)| b.build)
            .map(|(_, b)| *b)
    };
    newest(&|i, b| b.release_date <= now_secs && allowed_by_all(i))
        .or_else(|| newest(&|_, b| b.release_date <= now_secs))
        .or_else(|| newest(&|i, _| allowed_by_all(i)))
        .or_else(|| newest(&|_, _| true))
}

/// ChaCha stream for one CSVLK (stream 0 serves the identity-wide values).
fn stream_of(id: &Uuid) -> u64 {
    let (hi, lo) = id.as_u64_pair();
    (hi ^ lo).max(1)
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Whether `y` is a Gregorian leap year.
fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// Year and 1-based day of year of a Unix time (UTC).
fn year_and_day_of_year(unix_secs: i64) -> (i64, i64) {
    let days = unix_secs.div_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let before = usize::try_from(m - 1)
        .ok()
        .and_then(|i| CUMULATIVE.get(i))
        .copied()
        .unwrap_or(0);
    let leap_day = i64::from(m > 2 && is_leap(y));
    (y, before + leap_day + d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kms_catalog::well_known;
    use uuid::uuid;

    /// 2025-06-15T12:00:00Z.
    const NOW: UnixMillis = 1_749_988_800_000;

    fn ident(seed_byte: u8) -> HostIdentity {
        HostIdentity::generate(NOW, [seed_byte; 32])
    }

    /// Splits and checks one ePID independently of the generator; returns
    /// (platform, group, key id, lcid, build, day of year, year).
    fn parse_epid(epid: &str) -> (u32, u32, u32, u32, u32, u32, i64) {
        let p: Vec<&str> = epid.split('-').collect();
        assert_eq!(p.len(), 8, "{epid}");
        let all_digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
        assert!(all_digits(p[0], 5), "{epid}");
        assert!(all_digits(p[1], 5), "{epid}");
        assert!(all_digits(p[2], 3), "{epid}");
        assert!(all_digits(p[3], 6), "{epid}");
        assert_eq!(p[4], "03", "{epid}");
        assert!(p[5].len() == 4 || p[5].len() == 5, "{epid}");
        let (build, zeros) = p[6].split_once('.').unwrap();
        assert_eq!(zeros, "0000", "{epid}");
        assert!(all_digits(p[7], 7), "{epid}");
        let key = p[2].parse::<u32>().unwrap() * 1_000_000 + p[3].parse::<u32>().unwrap();
        (
            p[0].parse().unwrap(),
            p[1].parse().unwrap(),
            key,
            p[5].parse().unwrap(),
            build.parse().unwrap(),
            p[7][..3].parse().unwrap(),
            p[7][3..].parse().unwrap(),
        )
    }

    #[test]
    fn calendar_arithmetic() {
        assert_eq!(year_and_day_of_year(0), (1970, 1));
        // 2018-10-02T00:00:00Z is day 275 of 2018.
        assert_eq!(year_and_day_of_year(1_538_438_400), (2018, 275));
        // 2020-12-31T23:59:59Z: day 366 of a leap year.
        assert_eq!(year_and_day_of_year(1_609_459_199), (2020, 366));
        // 2021-01-01T00:00:00Z.
        assert_eq!(year_and_day_of_year(1_609_459_200), (2021, 1));
        // 2024-03-01T00:00:00Z: day 61 of a leap year.
        assert_eq!(year_and_day_of_year(1_709_251_200), (2024, 61));
        // 2000-02-29T00:00:00Z.
        assert_eq!(year_and_day_of_year(951_782_400), (2000, 60));
    }

    #[test]
    fn every_epid_is_well_formed_and_plausible() {
        let id = ident(7);
        let cat = catalog();
        let build = cat.win_build(id.host_build).expect("host build in catalog");
        assert!(build.use_for_epid && build.may_be_server);
        // Newest server ePID build released before NOW (2025): 26100, Server 2025.
        assert_eq!(id.host_build, 26100);
        assert!(LCIDS.iter().any(|(l, _)| *l == id.lcid));

        let expected: Vec<Uuid> = cat
            .csvlks()
            .iter()
            .filter(|c| c.group_id.is_some() && c.key_range().is_some())
            .map(|c| c.id)
            .collect();
        assert_eq!(id.epids.keys().copied().collect::<Vec<_>>(), expected);
        assert!(id.epids.len() > 30);

        for (csvlk_id, epid) in &id.epids {
            validate_epid(epid).unwrap();
            let c = cat.csvlk(csvlk_id).unwrap();
            let (platform, group, key, lcid, b, doy, year) = parse_epid(epid);
            assert_eq!(platform, build.platform_id, "{epid}");
            assert_eq!(Some(group), c.group_id, "{epid}");
            assert!(
                key >= c.min_key_id && key <= c.max_key_id,
                "{epid} {}",
                c.name
            );
            assert_eq!(lcid, id.lcid);
            assert_eq!(b, id.host_build);
            // Date between max(release dates) and now, compared at day granularity.
            let earliest = year_and_day_of_year(c.release_date.max(build.release_date));
            let latest = year_and_day_of_year((NOW / 1000) as i64);
            assert!((year, i64::from(doy)) >= earliest, "{epid} {}", c.name);
            assert!((year, i64::from(doy)) <= latest, "{epid}");
        }
    }

    #[test]
    fn deterministic_in_inputs() {
        assert_eq!(ident(1), ident(1));
        let a = ident(1);
        let b = ident(2);
        assert_ne!(a.hwid, b.hwid);
        assert_ne!(a.cluster_id, b.cluster_id);
        assert_eq!(a.cluster_id.get_version_num(), 4);
        let differing = a
            .epids
            .iter()
            .filter(|(k, v)| b.epids.get(*k) != Some(*v))
            .count();
        assert!(differing > a.epids.len() / 2);
        // Another `now` changes dates only within the allowed window but keeps the same keys.
        let later = HostIdentity::generate(NOW + 400 * crate::DAY_MS, [1; 32]);
        assert_eq!(later.hwid, a.hwid);
        assert_eq!(
            later.epids.keys().collect::<Vec<_>>(),
            a.epids.keys().collect::<Vec<_>>()
        );
    }

    #[test]
    fn clock_before_release_dates_still_gives_valid_epids() {
        // 2010-01-01: only older host builds existed.
        let old = HostIdentity::generate(1_262_304_000_000, [3; 32]);
        assert!(old.host_build <= 7601, "{}", old.host_build);
        for epid in old.epids.values() {
            validate_epid(epid).unwrap();
        }
        let zero = HostIdentity::generate(0, [0; 32]);
        for epid in zero.epids.values() {
            validate_epid(epid).unwrap();
        }
    }

    #[test]
    fn made_epids_fit_their_host_key() {
        let id = ident(9);
        let data = kms_catalog::CatalogData::builtin();
        for key in data.host_keys.iter().filter(|k| k.can_make_epid()) {
            let epid = id.make_epid(key, NOW, [5; 32]).unwrap();
            validate_epid(&epid).unwrap();
            assert!(epid_matches(&epid, key), "{epid} {}", key.name);
            // Host build and language are the identity's: one host.
            assert!(epid.contains(&format!("-{}-{}.0000-", id.lcid, id.host_build)));
        }
        let ws2025 = data
            .host_key(&uuid!("84e331f6-4279-48c4-ab10-b75139181351"))
            .unwrap();
        assert!(!epid_matches(
            "03612-04918-000-030000-03-1033-26100.0000-3052024",
            ws2025
        ));
        assert!(epid_matches(
            "03612-04919-000-030000-03-1033-26100.0000-3052024",
            ws2025
        ));
        let _ = well_known::WINDOWS;
    }

    #[test]
    fn validate_epid_accepts_and_rejects() {
        // Examples from the protocol fact sheet and vlmcsd's built-in ePIDs.
        for ok in [
            "05426-00206-559-369684-03-1103-9200.0000-0522022",
            "06401-00206-566-174993-03-1033-9600.0000-2802018",
            "03612-00206-568-381813-03-10250-14393.0000-2702018",
        ] {
            validate_epid(ok).unwrap();
        }
        for bad in [
            "",
            "05426-00206-559-369684-03-1103-9200.0000",
            "5426-00206-559-369684-03-1103-9200.0000-0522022",
            "05426-00206-559-36968-03-1103-9200.0000-0522022",
            "05426-00206-559-369684-02-1103-9200.0000-0522022",
            "05426-00206-559-369684-03-1103-9200.0001-0522022",
            "05426-00206-559-369684-03-1103-9200.0000-3672022",
            "05426-00206-559-369684-03-1103-9200.0000-0002022",
            "05426-00206-559-369684-03-11x3-9200.0000-0522022",
            "05426-00206-559-369684-03-1103-9200.0000-0522022-1",
            "05426-00206-559-369684-03-1103-9200.0000-052202é",
        ] {
            assert!(validate_epid(bad).is_err(), "{bad}");
        }
        let long = format!(
            "05426-00206-559-369684-03-1103-9200.0000-0522022{}",
            "0".repeat(20)
        );
        assert!(validate_epid(&long).is_err());
    }

    #[test]
    fn hwid_hex_round_trip() {
        let mut id = ident(5);
        id.hwid = [0x3A, 0x1C, 0x04, 0x96, 0x00, 0xB6, 0x00, 0x76];
        assert_eq!(id.hwid_hex(), "3A1C049600B60076");
        assert_eq!(parse_hwid("3A1C049600B60076").unwrap(), id.hwid);
        assert_eq!(parse_hwid("0x3a1c049600b60076").unwrap(), id.hwid);
        let other = ident(6);
        assert_eq!(parse_hwid(&other.hwid_hex()).unwrap(), other.hwid);
        for bad in [
            "",
            "3A1C049600B6007",
            "3A1C049600B600766",
            "3A1C049600B6007G",
            "3A1C0496é0B6007",
        ] {
            assert!(parse_hwid(bad).is_err(), "{bad}");
        }
    }
}
