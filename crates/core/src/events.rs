//! Lifecycle and health events. The supervisor is the only publisher: it stamps each event
//! with the next sequence number and broadcasts it. Each subscriber reads from a bounded
//! ring; one that falls behind by more than the ring holds is told so (`Lagged`) instead of
//! slowing the supervisor or anyone else.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::agent::AgentStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Spawned,
    Exited,
    Failed,
    Stopping,
    Killed,
    Health,
    Progress,
    Lost,
    Adopted,
    Snapshot,
}

#[derive(Debug, Clone)]
pub struct Event {
    /// One per-daemon counter; snapshot events repeat the sequence of the last event sent
    /// before them.
    pub sequence: u64,
    pub time: SystemTime,
    pub kind: EventKind,
    pub status: AgentStatus,
    pub message: String,
}

/// Which events a subscriber wants. Empty sets mean "all".
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub agent_ids: HashSet<String>,
    pub parent_agent_id: String,
    pub kinds: HashSet<EventKind>,
}

impl EventFilter {
    pub fn matches_agent(&self, status: &AgentStatus) -> bool {
        (self.agent_ids.is_empty() || self.agent_ids.contains(status.agent_id()))
            && (self.parent_agent_id.is_empty()
                || self.parent_agent_id == status.record.spec.parent_agent_id)
    }

    pub fn matches(&self, event: &Event) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&event.kind))
            && self.matches_agent(&event.status)
    }
}

/// What a new subscriber gets, taken atomically: every event after `snapshot` arrives on
/// `events`, and nothing before it does.
pub struct Subscription {
    pub snapshot: Vec<Event>,
    pub events: broadcast::Receiver<Arc<Event>>,
}

pub(crate) struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    last_sequence: u64,
}

impl EventBus {
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        EventBus {
            sender,
            last_sequence: 0,
        }
    }

    /// Stamps the next sequence. The status is only built when someone is watching.
    pub fn emit(&mut self, kind: EventKind, message: String, status: impl FnOnce() -> AgentStatus) {
        self.last_sequence += 1;
        if self.sender.receiver_count() == 0 {
            return;
        }
        let event = Event {
            sequence: self.last_sequence,
            time: SystemTime::now(),
            kind,
            status: status(),
            message,
        };
        // A failed send means the last watcher left in between: nobody to tell.
        let _ = self.sender.send(Arc::new(event));
    }

    /// Subscribes, then builds the snapshot from `statuses`, both on the supervisor task, so
    /// no event falls between them.
    pub fn subscribe(&self, statuses: impl Iterator<Item = AgentStatus>) -> Subscription {
        let events = self.sender.subscribe();
        let now = SystemTime::now();
        let snapshot = statuses
            .map(|status| Event {
                sequence: self.last_sequence,
                time: now,
                kind: EventKind::Snapshot,
                status,
                message: String::new(),
            })
            .collect();
        Subscription { snapshot, events }
    }
}
