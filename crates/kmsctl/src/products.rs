//! Choosing the product a test client pretends to be, from the catalog.

use kms_catalog::{catalog, KmsItem, Sku};
use kms_wire::kms::{filetime, BaseRequest, ProtocolVersion};
use uuid::Uuid;

/// A product as a KMS client sends it.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub sku: &'static Sku,
    pub kms_item: &'static KmsItem,
}

/// Short names for the products tests use most (a Windows client edition, a server, Office).
pub const ALIASES: &[(&str, &str)] = &[
    ("windows", "73111121-5638-40f6-bc11-f1d7b0d64300"), // Windows 10/11 Enterprise, N=25
    ("server", "34e1ae55-27f8-4950-8877-7a03be5fb181"),  // Windows Server 2019 Datacenter, N=5
    ("office", "d450596f-894d-49e0-966a-fd39ed4c4c64"),  // Office Professional Plus 2016, N=5
    ("office2013", "b322da9c-a2e2-4058-9e4e-f59a6970bd69"), // Office Professional Plus 2013
    ("office2010", "6f327760-8c5c-417c-9b61-836a98287e0c"), // Office Professional Plus 2010
];

/// Why a product name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ProductError {
    #[error("no product matches {0:?}; try `kmsctl products` or a SKU GUID")]
    NotFound(String),
    #[error("{query:?} matches {count} products, e.g. {examples}; be more specific")]
    Ambiguous {
        query: String,
        count: usize,
        examples: String,
    },
    #[error("SKU {0} has no KMS id in the catalog")]
    NoKmsItem(Uuid),
}

/// Resolves an alias, a SKU GUID or a (part of a) product name.
pub fn resolve(query: &str) -> Result<Product, ProductError> {
    let cat = catalog();
    let needle = ALIASES
        .iter()
        .find(|(alias, _)| alias.eq_ignore_ascii_case(query))
        .map(|(_, id)| *id)
        .unwrap_or(query);
    let sku = if let Ok(id) = Uuid::parse_str(needle) {
        cat.sku(&id)
            .ok_or_else(|| ProductError::NotFound(query.to_owned()))?
    } else if let Some(sku) = cat.sku_by_name(needle) {
        sku
    } else {
        let matches = cat.search_skus(needle);
        match matches.as_slice() {
            [] => return Err(ProductError::NotFound(query.to_owned())),
            [one] => *one,
            many => {
                return Err(ProductError::Ambiguous {
                    query: query.to_owned(),
                    count: many.len(),
                    examples: many
                        .iter()
                        .take(3)
                        .map(|s| s.name)
                        .collect::<Vec<_>>()
                        .join("; "),
                })
            }
        }
    };
    let kms_item = cat
        .kms_item(&sku.kms_item_id)
        .ok_or(ProductError::NoKmsItem(sku.id))?;
    Ok(Product { sku, kms_item })
}

/// Fields of a request a test client may vary.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    pub product: Product,
    pub protocol_major: u16,
    pub protocol_minor: u16,
    pub n_policy: u32,
    pub license_status: u32,
    pub is_vm: bool,
    pub workstation: String,
}

impl RequestTemplate {
    pub fn new(product: Product) -> Self {
        Self {
            product,
            protocol_major: product.kms_item.default_protocol,
            protocol_minor: 0,
            n_policy: product.kms_item.n_count_policy,
            license_status: 2,
            is_vm: false,
            workstation: "kmsctl.test".to_owned(),
        }
    }

    /// A request for `cmid` stamped with `now_ms` (Unix milliseconds).
    pub fn build(&self, cmid: Uuid, now_ms: u64) -> BaseRequest {
        BaseRequest {
            version: ProtocolVersion {
                major: self.protocol_major,
                minor: self.protocol_minor,
            },
            is_client_vm: self.is_vm,
            license_status: self.license_status,
            binding_expiration: 43_200,
            application_id: self.product.kms_item.application_id,
            sku_id: self.product.sku.id,
            kms_counted_id: self.product.kms_item.id,
            client_machine_id: cmid,
            required_client_count: self.n_policy,
            request_time: filetime::from_unix_millis(now_ms),
            previous_client_machine_id: Uuid::nil(),
            workstation_name: self.workstation.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_resolve_to_the_intended_groups() {
        let w = resolve("windows").unwrap();
        assert_eq!(w.kms_item.n_count_policy, 25);
        let s = resolve("server").unwrap();
        assert_eq!(s.kms_item.n_count_policy, 5);
        assert_eq!(s.kms_item.application_id, w.kms_item.application_id);
        let o = resolve("office").unwrap();
        assert_eq!(o.kms_item.n_count_policy, 5);
        assert_ne!(o.kms_item.application_id, w.kms_item.application_id);
        for (alias, _) in ALIASES {
            resolve(alias).unwrap();
        }
    }

    #[test]
    fn unknown_names_are_reported() {
        let err = resolve("no such product at all").unwrap_err();
        assert!(err.to_string().contains("no such product"), "{err}");
    }
}
