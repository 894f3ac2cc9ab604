//! Display names and parsers shared by the endpoints, the CSV export and the metrics.

use kms_catalog::catalog;
use uuid::Uuid;

/// License status names (slmgr wording, snake_case), by wire value.
pub fn license_status_name(status: u32) -> &'static str {
    match status {
        0 => "unlicensed",
        1 => "licensed",
        2 => "initial_grace",
        3 => "out_of_tolerance_grace",
        4 => "non_genuine_grace",
        5 => "notification",
        6 => "extended_grace",
        _ => "other",
    }
}

/// Application name from the catalog; unknown ids are shown as `unknown <id>` so two
/// unknown lists never share a name.
pub fn application_name(id: &Uuid) -> String {
    match catalog().application(id) {
        Some(a) => a.name.to_owned(),
        None if id.is_nil() => "unknown".to_owned(),
        None => format!("unknown {id}"),
    }
}

pub fn sku_name(id: &Uuid) -> String {
    catalog()
        .sku(id)
        .map_or_else(|| id.to_string(), |s| s.name.to_owned())
}

pub fn kms_item_name(id: &Uuid) -> String {
    catalog()
        .kms_item(id)
        .map_or_else(|| id.to_string(), |k| k.name.to_owned())
}

/// The count a client of `application` needs: the largest N seen, else the catalog's largest
/// N policy among the application's KMS ids (25 for Windows, 5 for Office).
pub fn threshold(application: &Uuid, max_n_seen: u32) -> u32 {
    if max_n_seen > 0 {
        return max_n_seen;
    }
    catalog()
        .kms_items()
        .iter()
        .filter(|k| k.application_id == *application && !k.is_retail)
        .map(|k| k.n_count_policy)
        .max()
        .unwrap_or(0)
}

fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Resolves an application given as id, alias (`windows`, `office2010`, `office2013`,
/// `office`) or catalog name (case, spaces and punctuation ignored).
pub fn parse_application(s: &str) -> Result<Uuid, String> {
    if let Ok(id) = Uuid::parse_str(s.trim()) {
        return Ok(id);
    }
    let wanted = normalize(s);
    let alias = match wanted.as_str() {
        "windows" => Some(kms_catalog::well_known::WINDOWS),
        "office2010" | "office14" => Some(kms_catalog::well_known::OFFICE_2010),
        "office2013" | "office15" | "office" => Some(kms_catalog::well_known::OFFICE_2013),
        _ => None,
    };
    alias
        .or_else(|| {
            catalog()
                .applications()
                .iter()
                .find(|a| normalize(a.name) == wanted)
                .map(|a| a.id)
        })
        .ok_or_else(|| {
            format!("{s:?} is not an application (windows, office2010, office2013 or an id)")
        })
}

/// A product filter: a SKU, a KMS id, or an id the catalog does not know (matched
/// against both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProductFilter {
    Sku(Uuid),
    KmsId(Uuid),
    AnyId(Uuid),
}

impl ProductFilter {
    pub fn matches(&self, sku: &Uuid, kms_id: &Uuid) -> bool {
        match self {
            Self::Sku(id) => sku == id,
            Self::KmsId(id) => kms_id == id,
            Self::AnyId(id) => sku == id || kms_id == id,
        }
    }
}

/// Resolves a product given as SKU id, KMS id, SKU name or product group name.
pub fn parse_product(s: &str) -> Result<ProductFilter, String> {
    let cat = catalog();
    if let Ok(id) = Uuid::parse_str(s.trim()) {
        return Ok(if cat.sku(&id).is_some() {
            ProductFilter::Sku(id)
        } else if cat.kms_item(&id).is_some() {
            ProductFilter::KmsId(id)
        } else {
            ProductFilter::AnyId(id)
        });
    }
    let wanted = normalize(s);
    if wanted.is_empty() {
        return Err("empty product".into());
    }
    if let Some(item) = cat.kms_items().iter().find(|k| normalize(k.name) == wanted) {
        return Ok(ProductFilter::KmsId(item.id));
    }
    if let Some(sku) = cat.sku_by_name(s) {
        return Ok(ProductFilter::Sku(sku.id));
    }
    match cat.search_skus(s).as_slice() {
        [one] => Ok(ProductFilter::Sku(one.id)),
        [] => Err(format!("no product matches {s:?}")),
        many => Err(format!(
            "{s:?} matches {} products; give a SKU id or a full name",
            many.len()
        )),
    }
}

/// Parses a time given as RFC 3339 or Unix milliseconds.
pub fn parse_time_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|e| format!("{s:?}: {e}"));
    }
    let parsed = chrono::DateTime::parse_from_rfc3339(t)
        .map_err(|e| format!("{s:?} is neither RFC 3339 nor Unix milliseconds: {e}"))?;
    u64::try_from(parsed.timestamp_millis()).map_err(|_| format!("{s:?} is before 1970"))
}

/// RFC 3339 in UTC with milliseconds.
pub fn format_time_ms(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applications_by_alias_name_and_id() {
        use kms_catalog::well_known::*;
        assert_eq!(parse_application("Windows"), Ok(WINDOWS));
        assert_eq!(parse_application("office2010"), Ok(OFFICE_2010));
        assert_eq!(parse_application("Office 14 (2010)"), Ok(OFFICE_2010));
        assert_eq!(parse_application("office"), Ok(OFFICE_2013));
        assert_eq!(parse_application(&OFFICE_2013.to_string()), Ok(OFFICE_2013));
        assert!(parse_application("linux").is_err());
    }

    #[test]
    fn products_by_sku_kms_id_and_name() {
        let sku = Uuid::parse_str("73111121-5638-40f6-bc11-f1d7b0d64300").unwrap();
        assert_eq!(parse_product(&sku.to_string()), Ok(ProductFilter::Sku(sku)));
        let kms_id = catalog().sku(&sku).unwrap().kms_item_id;
        assert_eq!(
            parse_product(&kms_id.to_string()),
            Ok(ProductFilter::KmsId(kms_id))
        );
        let name = catalog().kms_item(&kms_id).unwrap().name;
        assert_eq!(parse_product(name), Ok(ProductFilter::KmsId(kms_id)));
        let unknown = Uuid::from_u128(7);
        assert_eq!(
            parse_product(&unknown.to_string()),
            Ok(ProductFilter::AnyId(unknown))
        );
        assert!(parse_product("no such product at all").is_err());
        assert!(parse_product("Windows").is_err(), "ambiguous");
    }

    #[test]
    fn times_rfc3339_and_millis() {
        assert_eq!(parse_time_ms("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time_ms("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time_ms("2023-11-14T23:13:20.5+01:00"),
            Ok(1_700_000_000_500)
        );
        assert!(parse_time_ms("yesterday").is_err());
        assert!(parse_time_ms("1969-12-31T23:59:59Z").is_err());
        assert_eq!(
            format_time_ms(1_700_000_000_500),
            "2023-11-14T22:13:20.500Z"
        );
    }

    #[test]
    fn thresholds_follow_n_policy() {
        assert_eq!(threshold(&kms_catalog::well_known::WINDOWS, 0), 25);
        assert_eq!(threshold(&kms_catalog::well_known::OFFICE_2013, 0), 5);
        assert_eq!(threshold(&kms_catalog::well_known::WINDOWS, 5), 5);
    }
}
