//! Helpers shared by the test suites of several crates.
//!
//! Tests start servers on loopback ports chosen ahead of time (a `kmsd` needs its KMS, admin
//! and Raft ports on its command line, and peers must know them before it starts). Asking the
//! kernel for port 0 and releasing it races twice over: the kernel may hand the same port to
//! the next request (CI saw one `kmsd` given the same port for two listeners), and every
//! outgoing connection on the machine draws from that same ephemeral range. So ports come
//! from below the ephemeral range, where the kernel never assigns on its own, and one process
//! never hands out a port twice.

use std::collections::HashSet;
use std::net::{TcpListener, UdpSocket};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Lowest port handed out; well above the privileged range and common fixed services.
const LOWEST: u16 = 20_000;

/// Ports this process has handed out already.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback port that is free for both TCP and UDP on 127.0.0.1 right now, never returned
/// before by this process, and outside the kernel's ephemeral range when that range leaves
/// room below it (so no outgoing connection can take it before the test binds it).
///
/// Panics when no such port is found: a test cannot run without one.
pub fn free_port() -> u16 {
    let (low, high) = candidate_range();
    // Spread test processes that run at the same time over the range.
    let seed = std::process::id()
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = guard.get_or_insert_with(HashSet::new);
    pick(low, high, seed, handed_out)
        .unwrap_or_else(|| panic!("no free loopback port in {low}..={high}"))
}

/// The first port of `low..=high`, visited in a seed-dependent order, that was not handed out
/// and binds now; it is recorded as handed out.
fn pick(low: u16, high: u16, seed: u32, handed_out: &mut HashSet<u16>) -> Option<u16> {
    let span = u32::from(high - low) + 1;
    // A prime stride visits every port of the span exactly once unless it divides the span.
    let stride = if span % 7_919 == 0 { 1 } else { 7_919 };
    for step in 0..span {
        let offset = seed.wrapping_add(step.wrapping_mul(stride)) % span;
        let port = low + offset as u16;
        if !handed_out.contains(&port) && bindable(port) {
            handed_out.insert(port);
            return Some(port);
        }
    }
    None
}

/// True when both a TCP listener and a UDP socket can bind `port` on 127.0.0.1.
fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && UdpSocket::bind(("127.0.0.1", port)).is_ok()
}

/// Ports to draw from: `LOWEST` up to just below the ephemeral range, or the ports above it
/// when the range starts too low to leave room.
fn candidate_range() -> (u16, u16) {
    let (eph_low, eph_high) = ephemeral_range().unwrap_or((32_768, 60_999));
    if eph_low > LOWEST + 1_000 {
        (LOWEST, eph_low - 1)
    } else if eph_high < 64_000 {
        (eph_high + 1, 65_000)
    } else {
        // No room outside the ephemeral range: the per-process check still holds.
        (LOWEST, 65_000)
    }
}

/// The kernel's ephemeral port range (Linux), if readable.
fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_unique_bindable_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..500).map(|_| free_port()).collect();
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        if let Some((low, high)) = ephemeral_range() {
            if low > LOWEST + 1_000 {
                assert!(
                    ports.iter().all(|p| *p < low || *p > high),
                    "a port fell inside the ephemeral range {low}-{high}"
                );
            }
        }
        // Each one can actually be listened on.
        for port in ports.iter().take(20) {
            TcpListener::bind(("127.0.0.1", *port)).expect("handed-out port binds");
        }
    }

    #[test]
    fn a_port_in_use_or_handed_out_is_skipped_and_exhaustion_is_reported() {
        let (low, high) = candidate_range();
        // Find three consecutive free ports and hold the middle one.
        let base = (low..high - 3)
            .find(|p| (*p..*p + 3).all(bindable))
            .expect("three free ports in a row");
        let held = TcpListener::bind(("127.0.0.1", base + 1)).expect("hold the middle port");
        let mut handed_out = HashSet::new();
        let mut got: Vec<u16> = (0..2)
            .map(|_| pick(base, base + 2, 12_345, &mut handed_out).expect("a free port"))
            .collect();
        got.sort_unstable();
        assert_eq!(got, vec![base, base + 2], "the held port must be skipped");
        assert_eq!(pick(base, base + 2, 12_345, &mut handed_out), None);
        drop(held);
        assert_eq!(pick(base, base + 2, 7, &mut handed_out), Some(base + 1));
    }
}
