//! `State::last_replicated_time`: the latest proposer time carried by an applied command, the
//! lower bound the cluster clock stamps from.

use std::collections::BTreeMap;

use kms_catalog::well_known::WINDOWS;
use kms_core::{ActivationOutcome, ActivationRequest, Command, HostIdentity, State, UnixMillis};
use uuid::{uuid, Uuid};

const T0: UnixMillis = 1_700_000_000_000;
const KMS_WIN10_2019: Uuid = uuid!("11b15659-e603-4cf1-9c1f-f0ec01b81888");

fn identity() -> HostIdentity {
    let epids: BTreeMap<Uuid, String> = kms_catalog::catalog()
        .csvlks()
        .iter()
        .map(|c| (c.id, format!("EPID-{}", c.id)))
        .collect();
    HostIdentity {
        cluster_id: Uuid::from_u128(0xC1),
        hwid: [1, 2, 3, 4, 5, 6, 7, 8],
        host_build: 17763,
        lcid: 1033,
        epids,
    }
}

fn request(client: u128, now: UnixMillis) -> ActivationRequest {
    ActivationRequest {
        application_id: WINDOWS,
        sku_id: Uuid::from_u128(0xbeef),
        kms_counted_id: KMS_WIN10_2019,
        client_machine_id: Uuid::from_u128(0x7000_0000_0000_4000_8000_0000_0000_0000 | client),
        previous_client_machine_id: Uuid::nil(),
        required_client_count: 25,
        license_status: 2,
        binding_expiration: 43_200,
        is_client_vm: false,
        request_time: (now + 11_644_473_600_000) * 10_000,
        workstation_name: format!("pc{client}.corp.example"),
        protocol_major: 6,
        protocol_minor: 0,
        client_address: None,
    }
}

fn activate(state: &mut State, now: UnixMillis, client: u128) {
    let result = state.apply(&Command::Activate {
        now,
        requests: vec![request(client, now)],
    });
    assert!(
        matches!(&result, kms_core::CommandResult::Activations(v)
            if matches!(v.as_slice(), [ActivationOutcome::Granted(_)])),
        "{result:?}"
    );
}

#[test]
fn every_timestamped_command_moves_it_forward_never_back() {
    let mut state = State::default();
    assert_eq!(state.last_replicated_time(), None);
    state.apply(&Command::InitIdentity(identity()));
    assert_eq!(
        state.last_replicated_time(),
        None,
        "identity carries no time"
    );
    activate(&mut state, T0, 1);
    assert_eq!(state.last_replicated_time(), Some(T0));
    activate(&mut state, T0 + 5_000, 2);
    assert_eq!(state.last_replicated_time(), Some(T0 + 5_000));
    state.apply(&Command::Expire { now: T0 + 9_000 });
    assert_eq!(state.last_replicated_time(), Some(T0 + 9_000));
    // An older stamp (a clock that went back) does not move it back.
    state.apply(&Command::Expire { now: T0 + 1_000 });
    assert_eq!(state.last_replicated_time(), Some(T0 + 9_000));
}

#[test]
fn derived_on_load_from_the_snapshot_as_a_lower_bound() {
    let mut state = State::default();
    state.apply(&Command::InitIdentity(identity()));
    assert_eq!(
        State::from_snapshot(&state.to_snapshot())
            .unwrap()
            .last_replicated_time(),
        None
    );
    activate(&mut state, T0, 1);
    activate(&mut state, T0 + 7_000, 2);
    activate(&mut state, T0 + 3_000, 3);
    let loaded = State::from_snapshot(&state.to_snapshot()).unwrap();
    assert_eq!(loaded.last_replicated_time(), Some(T0 + 7_000));
    // The snapshot format is unchanged: equal states, equal bytes.
    assert_eq!(loaded.to_snapshot(), state.to_snapshot());
    // An Expire's time is not in the snapshot: the loaded value is a lower bound, and the
    // hint never makes two states unequal.
    state.apply(&Command::Expire { now: T0 + 60_000 });
    let loaded = State::from_snapshot(&state.to_snapshot()).unwrap();
    assert_eq!(loaded.last_replicated_time(), Some(T0 + 7_000));
    assert!(loaded.last_replicated_time() <= state.last_replicated_time());
    assert!(loaded == state);
}
