//! A bounded, node-local event log: the equivalent of the KMS host's event log entries
//! (12290 per activation request, 12293 DNS publish failure, 12294 DNS publish success) plus
//! operational events. Oldest events are dropped first.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Event ids used by the genuine KMS host, kept so operators recognise them.
pub mod ids {
    /// One activation request processed (time, client, workstation, CMID, product, status, count, result).
    pub const ACTIVATION: u32 = 12290;
    /// DNS publishing failed.
    pub const DNS_PUBLISH_FAILED: u32 = 12293;
    /// DNS publishing succeeded.
    pub const DNS_PUBLISH_SUCCEEDED: u32 = 12294;
    /// Node started / stopped, role changes and other operational notes.
    pub const NODE: u32 = 1000;
    /// Cluster membership changes.
    pub const MEMBERSHIP: u32 = 1001;
    /// Replicated configuration changed.
    pub const CONFIG: u32 = 1002;
    /// Quorum lost or regained.
    pub const QUORUM: u32 = 1003;
    /// KMS clients refused by a per-source edge limit (connections or new CMIDs per source
    /// address); one event stands for every refusal of its period (`fields.refused`).
    pub const EDGE_REFUSED: u32 = 1020;
    /// A source address was throttled (HTTP 429) after repeated admin API token failures.
    pub const ADMIN_AUTH_THROTTLED: u32 = 1021;
    /// This node's wall clock is too far from the cluster time (or agrees again).
    pub const CLOCK: u32 = 1004;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Increasing sequence number (per node).
    pub seq: u64,
    /// Unix milliseconds.
    pub time_ms: u64,
    pub event_id: u32,
    /// `info`, `warning` or `error`.
    pub level: String,
    pub message: String,
    /// Structured fields (e.g. the activation's client, cmid, product, count, result).
    #[schema(value_type = Object)]
    pub fields: serde_json::Value,
}

/// Filters for [`EventLog::query`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EventQuery {
    pub event_id: Option<u32>,
    /// Only events with `seq > after`.
    pub after: Option<u64>,
    /// Newest first, at most this many (default 100, at most 1000).
    pub limit: Option<usize>,
}

#[derive(Debug)]
pub struct EventLog {
    capacity: usize,
    inner: Mutex<(u64, VecDeque<StoredEvent>)>,
}

/// An event as kept in the ring: the structured fields as compact JSON text, which is a
/// fraction of a parsed `serde_json::Value` tree (thousands of events stay a few MB).
#[derive(Debug)]
struct StoredEvent {
    seq: u64,
    time_ms: u64,
    event_id: u32,
    level: Box<str>,
    message: Box<str>,
    fields: Box<str>,
}

impl StoredEvent {
    fn to_event(&self) -> Event {
        Event {
            seq: self.seq,
            time_ms: self.time_ms,
            event_id: self.event_id,
            level: self.level.to_string(),
            message: self.message.to_string(),
            fields: serde_json::from_str(&self.fields).unwrap_or(serde_json::Value::Null),
        }
    }
}

impl EventLog {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new((0, VecDeque::new())),
        }
    }

    pub fn push(
        &self,
        time_ms: u64,
        event_id: u32,
        level: &str,
        message: impl Into<String>,
        fields: impl serde::Serialize,
    ) {
        // Straight to compact text: no intermediate JSON tree on the activation path.
        let fields = serde_json::to_string(&fields)
            .unwrap_or_else(|e| format!(r#"{{"error":"unserializable fields: {e}"}}"#))
            .into_boxed_str();
        if let Ok(mut guard) = self.inner.lock() {
            let (seq, events) = &mut *guard;
            *seq += 1;
            if events.len() == self.capacity {
                events.pop_front();
            }
            events.push_back(StoredEvent {
                seq: *seq,
                time_ms,
                event_id,
                level: level.into(),
                message: message.into().into_boxed_str(),
                fields,
            });
        }
    }

    /// Newest first.
    pub fn query(&self, q: &EventQuery) -> Vec<Event> {
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        let Ok(guard) = self.inner.lock() else {
            return Vec::new();
        };
        guard
            .1
            .iter()
            .rev()
            .filter(|e| q.event_id.is_none_or(|id| e.event_id == id))
            .filter(|e| q.after.is_none_or(|a| e.seq > a))
            .take(limit)
            .map(StoredEvent::to_event)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|g| g.1.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
