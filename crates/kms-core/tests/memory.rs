//! Memory budget: 100,000 registered clients must fit well under the daemon's 64 MB RSS.
//! A counting global allocator measures the state's live heap exactly (this file is its own
//! test binary, so no other test allocates concurrently).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use kms_catalog::well_known::WINDOWS;
use kms_core::{ActivationRequest, Command, CommandResult, HostIdentity, State};
use uuid::{uuid, Uuid};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const T0: u64 = 1_700_000_000_000;
const KMS_WIN10_2019: Uuid = uuid!("11b15659-e603-4cf1-9c1f-f0ec01b81888");
const CLIENTS: u32 = 100_000;
/// Budget for the state's heap with 100k clients (the daemon has other needs too).
const HEAP_BUDGET: usize = 20 * 1024 * 1024;

fn identity() -> HostIdentity {
    let epids: BTreeMap<Uuid, String> = kms_catalog::CatalogData::builtin()
        .host_keys
        .iter()
        .map(|c| {
            (
                c.id,
                format!(
                    "06401-00206-551-{:06}-03-1033-17763.0000-2762018",
                    c.min_key_id % 1_000_000
                ),
            )
        })
        .collect();
    HostIdentity {
        cluster_id: Uuid::from_u128(1),
        hwid: [0; 8],
        host_build: 17763,
        lcid: 1033,
        epids,
    }
}

#[test]
fn hundred_thousand_clients_fit_the_budget() {
    // Touch the catalog first so its lazily built parts (if any) are not attributed to us.
    let _ = kms_catalog::catalog().application(&WINDOWS);
    let before = LIVE.load(Ordering::Relaxed);
    let mut state = State::default();
    state.apply(&Command::InitIdentity(identity()));
    state.apply(&Command::InitCatalog(kms_core::CatalogUpdate {
        catalog: kms_catalog::CatalogData::builtin(),
        epids: BTreeMap::new(),
    }));
    let mut i = 0u32;
    while i < CLIENTS {
        let now = T0 + u64::from(i) * 50;
        let requests: Vec<ActivationRequest> = (i..(i + 64).min(CLIENTS))
            .map(|k| ActivationRequest {
                application_id: WINDOWS,
                sku_id: Uuid::from_u128(0x5000),
                kms_counted_id: KMS_WIN10_2019,
                // Spread like random v4 CMIDs.
                client_machine_id: Uuid::from_u128(
                    u128::from(k).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835),
                ),
                previous_client_machine_id: Uuid::nil(),
                required_client_count: 25,
                license_status: 2,
                binding_expiration: 43_200,
                is_client_vm: k % 3 == 0,
                request_time: (now + 11_644_473_600_000) * 10_000,
                workstation_name: format!("DESKTOP-{k:07X}.corp.example.com"),
                protocol_major: 6,
                protocol_minor: 0,
                client_address: Some(
                    format!(
                        "10.{}.{}.{}:{}",
                        k >> 16,
                        (k >> 8) & 255,
                        k & 255,
                        49152 + k % 1000
                    )
                    .parse()
                    .unwrap(),
                ),
            })
            .collect();
        let CommandResult::Activations(out) = state.apply(&Command::Activate { now, requests })
        else {
            panic!("not an activation result");
        };
        assert!(out
            .iter()
            .all(|o| matches!(o, kms_core::ActivationOutcome::Granted(_))));
        i += 64;
    }
    assert_eq!(state.client_count(), CLIENTS as usize);
    let heap = LIVE.load(Ordering::Relaxed).saturating_sub(before);

    let snapshot = state.to_snapshot();
    let restored = State::from_snapshot(&snapshot).unwrap();
    assert_eq!(restored.client_count(), CLIENTS as usize);
    assert!(restored == state);

    println!(
        "100k clients: state heap {:.1} MiB ({} B/client), snapshot {:.1} MiB ({} B/client)",
        heap as f64 / 1048576.0,
        heap / CLIENTS as usize,
        snapshot.len() as f64 / 1048576.0,
        snapshot.len() / CLIENTS as usize,
    );
    assert!(
        heap < HEAP_BUDGET,
        "state heap {heap} B exceeds {HEAP_BUDGET} B"
    );
    assert!(
        snapshot.len() < 10 * 1024 * 1024,
        "snapshot {} B",
        snapshot.len()
    );
}
