//! Lifecycle and health events. The supervisor is the only publisher: it stamps each event
//! with the next sequence number, appends it to the event log in the store (health samples
//! excepted: they are live only) and broadcasts it. Each subscriber reads from a bounded
//! ring; one that falls behind by more than the ring holds is told so (`Lagged`) instead of
//! slowing the supervisor or anyone else.
//!
//! Sequences survive restarts: they are handed out from blocks reserved on disk first, so
//! a daemon that crashes skips the rest of its block instead of reusing numbers.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::agent::AgentStatus;
use crate::error::{Error, Result};
use crate::health::Alert;
use crate::spec::AgentSpec;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    Stalled,
    Alert,
    Recovered,
    Restarting,
    TimedOut,
    Removed,
    Paused,
    Resumed,
    /// The kernel's OOM killer ended the run (over `memory_max_mb`).
    OomKilled,
    /// The agent's proxy refused a connection.
    EgressDenied,
    /// UpdateSandbox changed the agent's `allow_hosts`.
    SandboxUpdated,
    /// The kernel refused a sandboxed agent a file or a system call.
    SandboxDenied,
    /// A budget was reached.
    BudgetExhausted,
    /// SetBudget changed a budget.
    BudgetUpdated,
}

/// A connection a sandboxed agent's proxy refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeniedConnection {
    pub host: String,
    pub port: u16,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// One per-daemon counter; snapshot events repeat the sequence of the last event sent
    /// before them.
    pub sequence: u64,
    pub time: SystemTime,
    pub kind: EventKind,
    pub status: AgentStatus,
    pub message: String,
    /// The measurement behind a STALLED or ALERT event.
    #[serde(default)]
    pub alert: Option<Alert>,
    /// The connection an EGRESS_DENIED event refused.
    #[serde(default)]
    pub denied: Option<DeniedConnection>,
    /// The event as the APIs send it, made once per format by the first watcher that sends
    /// it: a hundred watchers of one event cost one encoding, not a hundred.
    #[serde(skip)]
    pub encoded: Encodings,
}

/// The stored form of a logged event: the store keeps these bytes and knows nothing of them.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StoredEvent {
    #[serde(rename = "1")]
    V1(Event),
}

impl Event {
    fn encode(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&StoredEvent::V1(self.clone())).map_err(|source| Error::Record {
            key: format!("event {}", self.sequence),
            source,
        })
    }

    fn decode(sequence: u64, bytes: &[u8]) -> Result<Event> {
        let StoredEvent::V1(event) =
            serde_json::from_slice(bytes).map_err(|source| Error::Record {
                key: format!("event {sequence}"),
                source,
            })?;
        Ok(event)
    }
}

/// How an API puts an event on the wire; core only keeps the bytes.
#[derive(Debug, Clone, Copy)]
pub enum Format {
    Protobuf,
    /// A whole server-sent event: its `id:`, `event:` and `data:` (JSON) lines.
    ServerSent,
    /// As `Protobuf` and `ServerSent`, with only the figures of the status (`EVENT_VIEW_FIGURES`).
    ProtobufFigures,
    ServerSentFigures,
}

#[derive(Debug, Clone, Default)]
pub struct Encodings {
    protobuf: OnceLock<Box<[u8]>>,
    server_sent: OnceLock<Box<[u8]>>,
    protobuf_figures: OnceLock<Box<[u8]>>,
    server_sent_figures: OnceLock<Box<[u8]>>,
}

impl Event {
    /// The event in `format`, encoded by `encode` if nobody did yet.
    pub fn encoded(&self, format: Format, encode: impl FnOnce(&Event) -> Vec<u8>) -> &[u8] {
        let slot = match format {
            Format::Protobuf => &self.encoded.protobuf,
            Format::ServerSent => &self.encoded.server_sent,
            Format::ProtobufFigures => &self.encoded.protobuf_figures,
            Format::ServerSentFigures => &self.encoded.server_sent_figures,
        };
        slot.get_or_init(|| encode(self).into_boxed_slice())
    }
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
        self.takes(event.kind) && self.matches_agent(&event.status)
    }

    /// Whether events of this kind pass (no kinds named: every kind).
    pub fn takes(&self, kind: EventKind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }
}

/// How much of the event log is kept.
#[derive(Debug, Clone, Copy)]
pub struct EventRetention {
    pub max_events: usize,
    pub max_age: Duration,
}

impl Default for EventRetention {
    fn default() -> Self {
        EventRetention {
            max_events: 100_000,
            max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// What a new subscriber gets, taken atomically: the snapshot or the replay covers every
/// event up to the moment of subscribing, and `events` every event after it.
pub struct Subscription {
    pub snapshot: Vec<Event>,
    pub replay: Option<Replay>,
    pub events: broadcast::Receiver<Arc<Event>>,
    /// After the replay, for a watcher of changed figures that resumes: every matching
    /// agent's status as of now (SNAPSHOT events), as figures may have changed in the gap
    /// and no sample tells them again.
    pub current: Vec<Event>,
    /// Held as long as the subscriber wants a HEALTH sample of each agent every round, its
    /// figures changed or not; `None` for one that wants only those that changed, or none.
    pub every_round: Option<EveryRound>,
}

/// Which HEALTH samples a subscriber wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Samples {
    #[default]
    None,
    /// Those whose figures changed: a table of figures, which keeps the last ones it got
    /// (from a snapshot, or when it resumes from the statuses sent after the replay).
    Changed,
    /// Every agent's, every round (see [`EveryRound`]).
    EveryRound,
}

/// A subscriber that wants every sample: while one is held, the sampler sends unchanged
/// samples too (see [`EventBus::every_round_wanted`]).
pub struct EveryRound(Arc<AtomicUsize>);

impl Drop for EveryRound {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Logged events after a sequence, up to the moment of subscribing.
pub struct Replay {
    store: Store,
    after: u64,
    through: u64,
}

impl Replay {
    /// The last sequence the replay covers; live events start after it.
    pub fn through(&self) -> u64 {
        self.through
    }

    /// The events, oldest first, read lazily from the log.
    pub fn events(&self) -> impl Iterator<Item = Event> + use<> {
        self.store
            .events_between(self.after, self.through)
            .filter_map(|(sequence, bytes)| {
                Event::decode(sequence, &bytes)
                    .map_err(|error| tracing::error!(%error, "skipping an unreadable event"))
                    .ok()
            })
    }
}

/// Sequences reserved on disk at a time.
const SEQUENCE_BLOCK: u64 = 10_000;
/// Appends between two checks of the log's age limit.
const TRIM_EVERY: usize = 256;

pub(crate) struct EventBus {
    sender: broadcast::Sender<Arc<Event>>,
    /// Subscribers holding an [`EveryRound`].
    every_round: Arc<AtomicUsize>,
    last_sequence: u64,
    /// Sequences up to here are reserved on disk.
    reserved: u64,
    store: Store,
    retention: EventRetention,
    /// Set when sequences could not be reserved on disk: from then on nothing is published
    /// (an unreserved number could be handed out twice after a crash) and the supervisor
    /// stops.
    broken: Option<Error>,
    /// Events in the log.
    logged: usize,
    appended_since_trim: usize,
}

impl EventBus {
    /// Continues after every sequence an earlier daemon may have used.
    pub fn open(store: Store, capacity: usize, retention: EventRetention) -> Result<Self> {
        let (sender, _) = broadcast::channel(capacity.max(1));
        let reserved = store.sequence_reserved()?;
        let logged = store.count_events();
        let mut bus = EventBus {
            sender,
            every_round: Arc::default(),
            last_sequence: reserved,
            reserved,
            store,
            retention,
            broken: None,
            logged,
            appended_since_trim: 0,
        };
        bus.reserve()?;
        bus.trim();
        Ok(bus)
    }

    fn reserve(&mut self) -> Result<()> {
        let up_to = self.last_sequence + SEQUENCE_BLOCK;
        self.store.reserve_sequences(up_to)?;
        self.reserved = up_to;
        Ok(())
    }

    /// A subscriber wants every agent's HEALTH sample each round, even one whose figures did
    /// not change (a whole-status watcher; a table of figures keeps the last ones it got).
    pub fn every_round_wanted(&self) -> bool {
        self.every_round.load(Ordering::Relaxed) > 0
    }

    /// Stamps the next sequence and publishes. The status is only built when the event is
    /// logged or someone is watching.
    pub fn emit(
        &mut self,
        kind: EventKind,
        message: String,
        alert: Option<Alert>,
        status: impl FnOnce() -> AgentStatus,
    ) {
        self.emit_denied(kind, message, alert, None, status)
    }

    /// [`EventBus::emit`], with the connection an EGRESS_DENIED event refused.
    pub fn emit_denied(
        &mut self,
        kind: EventKind,
        message: String,
        alert: Option<Alert>,
        denied: Option<DeniedConnection>,
        status: impl FnOnce() -> AgentStatus,
    ) {
        let logged = kind != EventKind::Health;
        // A health sample nobody watches is not an event: it takes no sequence number.
        if !logged && self.sender.receiver_count() == 0 {
            return;
        }
        if self.broken.is_some() {
            return;
        }
        if self.last_sequence + 1 > self.reserved
            && let Err(error) = self.reserve()
        {
            tracing::error!(%error, "reserving event sequences on disk; publishing stops");
            self.broken = Some(error);
            return;
        }
        self.last_sequence += 1;
        let event = Arc::new(Event {
            sequence: self.last_sequence,
            time: SystemTime::now(),
            kind,
            status: status(),
            message,
            alert,
            denied,
            encoded: Encodings::default(),
        });
        if logged {
            self.log(&event);
        }
        // A failed send means nobody is watching.
        let _ = self.sender.send(event);
    }

    /// Appends to the log. The agent's environment is left out: it may be large and
    /// secret, and no event shows it.
    fn log(&mut self, event: &Event) {
        let mut stored = event.clone();
        let spec = &stored.status.record.spec;
        if !spec.env.is_empty() {
            stored.status.record.spec = Arc::new(AgentSpec {
                env: BTreeMap::new(),
                ..AgentSpec::clone(spec)
            });
        }
        let appended = stored
            .encode()
            .and_then(|bytes| self.store.append_event(stored.sequence, bytes));
        if let Err(error) = appended {
            tracing::error!(%error, sequence = event.sequence, "logging an event");
            return;
        }
        self.logged += 1;
        self.appended_since_trim += 1;
        // Over the count limit every append trims one; the age limit is checked now and then.
        if self.logged > self.retention.max_events || self.appended_since_trim >= TRIM_EVERY {
            self.trim();
        }
    }

    /// Why events can no longer be published, if they cannot.
    pub fn failure(&self) -> Option<&Error> {
        self.broken.as_ref()
    }

    fn trim(&mut self) {
        self.appended_since_trim = 0;
        let retention = self.retention;
        match self.store.trim_events(
            retention.max_events,
            retention.max_age,
            self.logged,
            |bytes| Some(Event::decode(0, bytes).ok()?.time),
        ) {
            Ok(removed) => self.logged -= removed,
            Err(error) => tracing::error!(%error, "trimming the event log"),
        }
    }

    /// Subscribes, then builds the snapshot from `statuses` or checks that a resume from
    /// `after` is possible, all on the supervisor task, so no event falls in between. With a
    /// resume, `statuses` are the ones sent after the replay ([`Subscription::current`]).
    pub fn subscribe(
        &self,
        statuses: impl Iterator<Item = AgentStatus>,
        after: Option<u64>,
        samples: Samples,
    ) -> Result<Subscription> {
        let replay = match after {
            None => None,
            Some(after) if after > self.last_sequence => {
                return Err(Error::SequenceAhead {
                    after,
                    latest: self.last_sequence,
                });
            }
            Some(after) => {
                let trimmed_through = self.store.events_trimmed_through()?;
                if after < trimmed_through {
                    return Err(Error::SequenceCompacted {
                        after,
                        trimmed_through,
                    });
                }
                Some(Replay {
                    store: self.store.clone(),
                    after,
                    through: self.last_sequence,
                })
            }
        };
        let events = self.sender.subscribe();
        let now = SystemTime::now();
        let statuses = statuses
            .map(|status| Event {
                sequence: self.last_sequence,
                time: now,
                kind: EventKind::Snapshot,
                status,
                message: String::new(),
                alert: None,
                denied: None,
                encoded: Encodings::default(),
            })
            .collect();
        let (snapshot, current) = match &replay {
            None => (statuses, Vec::new()),
            Some(_) => (Vec::new(), statuses),
        };
        let every_round = (samples == Samples::EveryRound).then(|| {
            self.every_round.fetch_add(1, Ordering::Relaxed);
            EveryRound(self.every_round.clone())
        });
        Ok(Subscription {
            snapshot,
            replay,
            events,
            current,
            every_round,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, time: SystemTime) -> Event {
        let fixture = include_bytes!("../fixtures/agent-record-v1.json");
        let record = crate::store::decode("fixture-1", fixture).expect("decodes");
        Event {
            sequence,
            time,
            kind: crate::events::EventKind::Spawned,
            status: crate::agent::AgentStatus::new(&record, false, None, None),
            message: String::new(),
            alert: None,
            denied: None,
            encoded: Default::default(),
        }
    }

    #[test]
    fn the_event_log_trims_by_count_and_age_and_remembers_where() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let time_of = |bytes: &[u8]| Some(Event::decode(0, bytes).ok()?.time);
        let old = SystemTime::now() - Duration::from_secs(7200);
        for sequence in 1..=5 {
            let event = event(sequence, old);
            let bytes = event.encode().expect("encodes");
            store.append_event(sequence, bytes).expect("append");
        }
        for sequence in 6..=10 {
            let bytes = event(sequence, SystemTime::now())
                .encode()
                .expect("encodes");
            store.append_event(sequence, bytes).expect("append");
        }
        assert_eq!(
            store
                .trim_events(8, Duration::from_secs(86400), 10, time_of)
                .expect("trim"),
            2
        );
        assert_eq!(store.events_trimmed_through().expect("meta"), 2);
        assert_eq!(
            store
                .trim_events(8, Duration::from_secs(3600), 8, time_of)
                .expect("trim"),
            3
        );
        assert_eq!(store.events_trimmed_through().expect("meta"), 5);
        let left: Vec<u64> = store
            .events_between(0, 99)
            .map(|(sequence, _)| sequence)
            .collect();
        assert_eq!(left, [6, 7, 8, 9, 10]);
        let some: Vec<u64> = store
            .events_between(7, 9)
            .map(|(sequence, _)| sequence)
            .collect();
        assert_eq!(some, [8, 9]);
        // The newest event always stays, so the log never forgets how far it got.
        assert_eq!(
            store
                .trim_events(0, Duration::ZERO, 5, time_of)
                .expect("trim"),
            4
        );
        assert_eq!(store.count_events(), 1);
    }
}
