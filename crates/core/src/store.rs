//! The store: every agent's [`AgentRecord`] keyed by agent id, the event log keyed by
//! sequence, and the sequence reservation, all in sled. Only this module touches sled.
//! Everything is stored as versioned JSON of our own types (never the protobuf messages), so
//! the API and the storage format can change independently.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use serde::{Deserialize, Serialize};

use crate::agent::AgentRecord;
use crate::error::{Error, Result};

/// The stored form of a record. A change to [`AgentRecord`] that old data cannot be read
/// into adds a variant here and a conversion from the old one.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StoredRecord {
    #[serde(rename = "1")]
    V1(AgentRecord),
}

/// sled's page cache. Its default (1 GiB) lets it grow with the event log and every record
/// ever written (measured: 23, 104, 164 MB after 1, 5, 10 rounds of 1000 agents). Reads
/// from sled are rare (start-up, replays to resuming watchers); writes need only the tree
/// edges they touch: the benchmarks tell no row apart from the 1 GiB default but memory.
const CACHE_BYTES: u64 = 4 << 20;

/// Keys of the `meta` tree.
const SEQUENCE_RESERVED: &[u8] = b"sequence_reserved";
const EVENTS_TRIMMED_THROUGH: &[u8] = b"events_trimmed_through";
/// Counts flushes: each flush writes the next value before it starts.
const GENERATION: &[u8] = b"generation";
/// When the last flush began: the boot it happened in and nanoseconds on the boot clock.
/// Every record written before then is on disk.
const FLUSH_BOOT_ID: &[u8] = b"flush_boot_id";
const FLUSH_STARTED: &[u8] = b"flush_started_ns";

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// `store.generation` beside the store: the generation of the last flush that finished,
    /// written after it (never synced). A store whose own generation is lower lost flushed
    /// writes: it was rolled back or damaged.
    stamp: std::path::PathBuf,
    agents: sled::Tree,
    /// The event log: sequence (big-endian, so sled's order is sequence order) -> event.
    events: sled::Tree,
    meta: sled::Tree,
    /// Records that could not be loaded, kept byte for byte for a person to look at.
    set_aside: sled::Tree,
    durability: Arc<Durability>,
}

/// Group commit. One flush runs at a time, on tokio's blocking pool, and covers every write
/// made before it began; each caller waits for the first flush that covers its writes. It is
/// sled's synchronous flush: its `flush_async` waits on sled's small thread pool for log
/// writes queued to that same pool, and many at once took every pool thread and never
/// finished.
#[derive(Default)]
struct Durability {
    /// Counts writes.
    written: AtomicU64,
    /// Whether a flush runs.
    running: std::sync::Mutex<bool>,
    /// What the flushes so far covered, for callers to wait on.
    flushed: watch::Sender<Flushed>,
    /// The last generation handed to a flush, under a lock so that the count and its write
    /// into `meta` go together (a lower one written last would look like a rollback), and
    /// the last one written to the stamp.
    generation: std::sync::Mutex<u64>,
    stamped: AtomicU64,
}

#[derive(Clone, Default)]
struct Flushed {
    /// Every write counted up to this one is on disk.
    through: u64,
    /// The last flush that failed, and the count of writes made when it did.
    failed: Option<(u64, sled::Error)>,
}

/// What the store says of its own history, read when it is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct StoreHistory {
    /// Flushes the store has seen (0: none since this was introduced).
    pub generation: u64,
    /// Sequences handed out so far (0: the store never published an event).
    pub sequence_reserved: u64,
    /// The boot clock (seconds) when its last flush began, if that was during this boot.
    pub flushed_from: Option<f64>,
}

impl Store {
    /// Opens (or creates) the store. sled locks the folder too, but says so only in words:
    /// the supervisor takes `agentd.lock` first, so a second daemon is told plainly.
    /// A store sled cannot open or read (garbage, truncated files) is
    /// [`Error::StoreUnreadable`], whether sled says so or panics.
    pub fn open(path: &Path) -> Result<Store> {
        let unreadable = |problem: String| Error::StoreUnreadable {
            path: path.to_path_buf(),
            problem,
        };
        let opened = std::panic::catch_unwind(|| {
            let db = sled::Config::new()
                .path(path)
                .cache_capacity(CACHE_BYTES)
                .open()?;
            let trees = (
                db.open_tree("agents")?,
                db.open_tree("events")?,
                db.open_tree("meta")?,
                db.open_tree("set_aside")?,
            );
            Ok::<_, sled::Error>((db, trees))
        });
        let (db, (agents, events, meta, set_aside)) = match opened {
            Ok(Ok(opened)) => opened,
            // The system failing (permissions, no space, no descriptors) is no damage to
            // the store: moving it aside would throw good records away.
            Ok(Err(sled::Error::Io(error)))
                if !matches!(
                    error.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
                ) =>
            {
                return Err(sled::Error::Io(error).into());
            }
            Ok(Err(error)) => return Err(unreadable(error.to_string())),
            Err(panic) => {
                let problem = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "sled panicked".into());
                return Err(unreadable(problem));
            }
        };
        let stamp = path.with_file_name("store.generation");
        let store = Store {
            db,
            stamp,
            agents,
            events,
            meta,
            set_aside,
            durability: Arc::default(),
        };
        let generation = store.meta_u64(GENERATION)?;
        *store
            .durability
            .generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = generation;
        store.durability.stamped.store(generation, Ordering::SeqCst);
        Ok(store)
    }

    /// What the store says of its own history.
    pub(crate) fn history(&self) -> Result<StoreHistory> {
        let same_boot = self
            .meta
            .get(FLUSH_BOOT_ID)?
            .is_some_and(|id| boot_id().is_some_and(|now| now.as_bytes() == id.as_ref()));
        let flushed_from = self
            .meta
            .get(FLUSH_STARTED)?
            .filter(|_| same_boot)
            .and_then(|value| Some(u64::from_be_bytes(value.as_ref().try_into().ok()?)))
            .map(|nanos| nanos as f64 / 1e9);
        Ok(StoreHistory {
            generation: self.meta_u64(GENERATION)?,
            sequence_reserved: self.sequence_reserved()?,
            flushed_from,
        })
    }

    /// The generation the stamp beside the store at `path` names, if it names one.
    pub(crate) fn stamped_generation(path: &Path) -> Option<u64> {
        let text = std::fs::read_to_string(path.with_file_name("store.generation")).ok()?;
        text.trim().parse().ok()
    }

    /// Forgets the stamp beside the store at `path` (a new store starts its own count).
    pub(crate) fn remove_stamp(path: &Path) -> std::io::Result<()> {
        match std::fs::remove_file(path.with_file_name("store.generation")) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        }
    }

    /// Before a flush: the next generation and the time, in the meta tree the flush covers.
    fn begin_flush(&self) -> sled::Result<u64> {
        let mut counted = self
            .durability
            .generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *counted += 1;
        let generation = *counted;
        self.meta.insert(GENERATION, &generation.to_be_bytes())?;
        if let Some(now) = boot_clock_nanos() {
            self.meta.insert(FLUSH_STARTED, &now.to_be_bytes())?;
        }
        if let Some(id) = boot_id() {
            self.meta.insert(FLUSH_BOOT_ID, id.as_bytes())?;
        }
        Ok(generation)
    }

    /// After a flush: the stamp names its generation, unless a later one is there already.
    fn finish_flush(&self, generation: u64) {
        if self
            .durability
            .stamped
            .fetch_max(generation, Ordering::SeqCst)
            >= generation
        {
            return;
        }
        // Always 21 bytes, written over the last: truncating freed the file's block on every
        // flush, and on a filesystem mounted with `discard` each flush then waited for the
        // device to discard it.
        let written = {
            use std::os::unix::fs::{FileExt, OpenOptionsExt};
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&self.stamp)
                .and_then(|file| file.write_all_at(format!("{generation:020}\n").as_bytes(), 0))
        };
        if let Err(error) = written {
            tracing::warn!(%error, path = %self.stamp.display(), "writing the store's stamp");
        }
    }

    fn wrote(&self) {
        self.durability.written.fetch_add(1, Ordering::SeqCst);
    }

    /// The writes counted so far.
    fn written(&self) -> u64 {
        self.durability.written.load(Ordering::SeqCst)
    }

    /// Starts a flush if something written is not on disk and none runs (one that runs goes
    /// on until it covered every write). The supervisor asks once per turn of its loop, so a
    /// transition reaches the disk within one flush, not at sled's next periodic one.
    pub fn flush_soon(&self) {
        let durability = &self.durability;
        let mut running = lock(&durability.running);
        if *running || self.written() <= durability.flushed.borrow().through {
            return;
        }
        *running = true;
        drop(running);
        let store = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || store.flush_while_behind())),
            Err(_) => store.flush_while_behind(),
        }
    }

    /// Flushes until every write is covered, then says no flush runs.
    fn flush_while_behind(&self) {
        let durability = &self.durability;
        loop {
            let covering = self.written();
            let flushed = self.begin_flush().and_then(|generation| {
                self.db.flush()?;
                self.finish_flush(generation);
                Ok(())
            });
            let mut running = lock(&durability.running);
            let written = self.written();
            match flushed {
                Ok(()) => {
                    durability
                        .flushed
                        .send_modify(|flushed| flushed.through = flushed.through.max(covering));
                    if written > covering {
                        continue;
                    }
                }
                Err(error) => {
                    // Whoever waits for a write made so far hears of it; the next asks again.
                    tracing::error!(%error, "flushing the agent store");
                    durability
                        .flushed
                        .send_modify(|flushed| flushed.failed = Some((written, error)));
                }
            }
            *running = false;
            return;
        }
    }

    /// Every readable stored record, in agent id order. A record that cannot be read, or
    /// that could never run (no command), is moved to the `set_aside` tree with its bytes
    /// intact and logged, so one bad record never keeps the daemon from serving the rest.
    pub fn load_agents(&self) -> Result<Vec<AgentRecord>> {
        let mut records = Vec::new();
        for entry in self.agents.iter() {
            let (key, value) = entry?;
            let id = String::from_utf8_lossy(&key).into_owned();
            let problem = match decode(&id, &value) {
                Ok(record) if !record.spec.command.is_empty() && record.spec.agent_id == id => {
                    records.push(record);
                    continue;
                }
                Ok(_) => "it has no command, or another agent's id".to_string(),
                Err(error) => error.to_string(),
            };
            tracing::error!(
                agent_id = %id,
                "setting aside an unreadable agent record (its bytes are kept in the store's \
                 `set_aside` tree): {problem}"
            );
            self.set_aside.insert(&key, value)?;
            self.agents.remove(&key)?;
            self.wrote();
        }
        Ok(records)
    }

    /// What the store takes on disk, as sled counts it.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// How many records were set aside as unreadable, now or by an earlier daemon.
    pub fn set_aside_count(&self) -> usize {
        self.set_aside.len()
    }

    pub fn put(&self, record: &AgentRecord) -> Result<()> {
        let value = serde_json::to_vec(&StoredRecord::V1(record.clone())).map_err(|source| {
            Error::Record {
                key: record.spec.agent_id.clone(),
                source,
            }
        })?;
        self.agents.insert(record.spec.agent_id.as_bytes(), value)?;
        self.wrote();
        Ok(())
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64> {
        Ok(self
            .meta
            .get(key)?
            .and_then(|value| Some(u64::from_be_bytes(value.as_ref().try_into().ok()?)))
            .unwrap_or(0))
    }

    /// Every sequence up to this one may have been handed out by an earlier daemon.
    pub fn sequence_reserved(&self) -> Result<u64> {
        self.meta_u64(SEQUENCE_RESERVED)
    }

    /// Records on disk, before returning, that sequences up to `up_to` may be in use, so a
    /// daemon that crashes never hands one out twice.
    pub fn reserve_sequences(&self, up_to: u64) -> Result<()> {
        self.meta.insert(SEQUENCE_RESERVED, &up_to.to_be_bytes())?;
        self.flush_now()
    }

    /// The highest sequence removed from the log; resuming from before it would miss events.
    pub fn events_trimmed_through(&self) -> Result<u64> {
        self.meta_u64(EVENTS_TRIMMED_THROUGH)
    }

    /// Logs an event, as `events` encoded it, under its sequence.
    pub fn append_event(&self, sequence: u64, encoded: Vec<u8>) -> Result<()> {
        self.events.insert(sequence.to_be_bytes(), encoded)?;
        self.wrote();
        Ok(())
    }

    /// How many events the log holds (a full scan: for start-up only).
    pub fn count_events(&self) -> usize {
        self.events.len()
    }

    /// Removes the oldest events while there are more than `keep` or the oldest is older
    /// than `max_age` (`time_of` reads an event's time from its bytes), always keeping the
    /// newest. Returns how many it removed.
    pub fn trim_events(
        &self,
        keep: usize,
        max_age: Duration,
        mut count: usize,
        time_of: impl Fn(&[u8]) -> Option<SystemTime>,
    ) -> Result<usize> {
        let oldest_allowed = SystemTime::now().checked_sub(max_age);
        let mut removed = 0;
        let mut trimmed_through = None;
        while count > 1 {
            let Some((key, value)) = self.events.first()? else {
                break;
            };
            let too_many = count > keep;
            let too_old = || matches!((time_of(&value), oldest_allowed), (Some(time), Some(limit)) if time < limit);
            if !too_many && !too_old() {
                break;
            }
            self.events.remove(&key)?;
            trimmed_through = Some(sequence_of(&key));
            count -= 1;
            removed += 1;
        }
        if let Some(sequence) = trimmed_through {
            self.meta
                .insert(EVENTS_TRIMMED_THROUGH, &sequence.to_be_bytes())?;
        }
        Ok(removed)
    }

    /// Logged events with `after < sequence <= through`, oldest first, as sequence and
    /// bytes. An entry that cannot be read is skipped with an error in the log.
    pub fn events_between(
        &self,
        after: u64,
        through: u64,
    ) -> impl Iterator<Item = (u64, sled::IVec)> + use<> {
        let start = after.saturating_add(1).to_be_bytes();
        self.events
            .range(start..=through.to_be_bytes())
            .filter_map(|entry| {
                let (key, value) = entry
                    .map_err(|error| tracing::error!(%error, "reading the event log"))
                    .ok()?;
                Some((sequence_of(&key), value))
            })
    }

    pub fn remove_agent(&self, agent_id: &str) -> Result<()> {
        self.agents.remove(agent_id.as_bytes())?;
        self.wrote();
        Ok(())
    }

    /// Puts everything written so far on disk, on this thread (for start-up).
    pub fn flush_now(&self) -> Result<()> {
        let covering = self.written();
        let generation = self.begin_flush()?;
        self.db.flush()?;
        self.finish_flush(generation);
        self.durability
            .flushed
            .send_modify(|flushed| flushed.through = flushed.through.max(covering));
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<()> {
        let count = self.written();
        let mut flushed = self.durability.flushed.subscribe();
        self.flush_soon();
        let outcome = flushed
            .wait_for(|flushed| {
                flushed.through >= count
                    || flushed
                        .failed
                        .as_ref()
                        .is_some_and(|(upto, _)| *upto >= count)
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        match &outcome.failed {
            Some((_, error)) if outcome.through < count => Err(error.clone().into()),
            _ => Ok(()),
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This boot's id: boot clock times from another boot mean nothing now.
fn boot_id() -> Option<&'static str> {
    static ID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
        Some(id.trim().to_string())
    })
    .as_deref()
}

/// Nanoseconds on the boot clock, the one `/proc/PID/stat` start times count on.
fn boot_clock_nanos() -> Option<u64> {
    Some((crate::process::uptime()? * 1e9) as u64)
}

fn sequence_of(key: &[u8]) -> u64 {
    key.try_into().map(u64::from_be_bytes).unwrap_or(0)
}

pub(crate) fn decode(key: &str, value: &[u8]) -> Result<AgentRecord> {
    let StoredRecord::V1(record) =
        serde_json::from_slice(value).map_err(|source| Error::Record {
            key: key.to_string(),
            source,
        })?;
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AgentState, Exit};

    /// A record written by the first store format must keep loading.
    #[test]
    fn version_1_fixture_still_loads() {
        let fixture = include_bytes!("../fixtures/agent-record-v1.json");
        let record = decode("fixture-1", fixture).expect("v1 record decodes");
        assert_eq!(record.spec.agent_id, "fixture-1");
        assert_eq!(record.state, AgentState::Failed);
        assert_eq!(record.exit, Some(Exit::Signal(9)));
        assert_eq!(record.spec.command, ["sleep", "30"]);
        assert_eq!(
            record.spec.labels.get("team").map(String::as_str),
            Some("research")
        );
    }

    #[test]
    fn records_round_trip_through_sled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fixture = include_bytes!("../fixtures/agent-record-v1.json");
        let mut record = decode("fixture-1", fixture).expect("decodes");
        {
            let store = Store::open(dir.path()).expect("opens");
            store.put(&record).expect("put");
            record.state = AgentState::Completed;
            store.put(&record).expect("put again");
        }
        // sled's flusher thread lets go of the folder's lock a moment after the drop.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let store = loop {
            match Store::open(dir.path()) {
                Ok(store) => break store,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("reopening the store: {error}"),
            }
        };
        assert_eq!(store.load_agents().expect("loads"), vec![record]);
    }

    #[test]
    fn unreadable_records_are_set_aside_and_the_rest_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("opens");
        let fixture = include_bytes!("../fixtures/agent-record-v1.json");
        let good = decode("fixture-1", fixture).expect("decodes");
        store.put(&good).expect("put");
        let mut no_command = good.clone();
        no_command.spec = Arc::new(crate::spec::AgentSpec {
            agent_id: "empty".into(),
            command: Vec::new(),
            ..crate::spec::AgentSpec::clone(&good.spec)
        });
        store.put(&no_command).expect("put");
        store
            .agents
            .insert(b"garbled", &b"{not json"[..])
            .expect("insert");
        assert_eq!(store.load_agents().expect("loads"), vec![good.clone()]);
        assert_eq!(store.set_aside_count(), 2);
        let kept = store.set_aside.get(b"garbled").expect("get");
        assert_eq!(kept.as_deref(), Some(&b"{not json"[..]));
        assert_eq!(store.load_agents().expect("loads again"), vec![good]);
    }

    #[test]
    fn each_flush_advances_the_generation_and_the_stamp_beside_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        let store = Store::open(&path).expect("opens");
        assert_eq!(store.history().expect("history"), StoreHistory::default());
        assert_eq!(Store::stamped_generation(&path), None);
        store.flush_now().expect("flush");
        store.flush_now().expect("flush");
        let history = store.history().expect("history");
        assert_eq!(history.generation, 2);
        assert!(history.flushed_from.is_some(), "{history:?}");
        assert_eq!(Store::stamped_generation(&path), Some(2));
    }

    #[test]
    fn a_store_sled_cannot_read_is_unreadable_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        drop(Store::open(&path).expect("opens"));
        for entry in std::fs::read_dir(&path).expect("read").flatten() {
            if entry.file_type().expect("type").is_file() {
                std::fs::write(entry.path(), [0xA5u8; 64]).expect("garble");
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match Store::open(&path) {
                Err(Error::StoreUnreadable { .. }) => break,
                // sled lets go of the lock a moment after the drop.
                Err(Error::Store { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("expected an unreadable store, got {error}"),
                Ok(_) => panic!("a garbled store opened"),
            }
        }
    }

    #[test]
    fn unreadable_records_are_reported_with_their_key() {
        match decode("k1", b"{\"version\": \"99\"}") {
            Err(Error::Record { key, .. }) => assert_eq!(key, "k1"),
            other => panic!("expected a record error, got {other:?}"),
        }
    }
}
