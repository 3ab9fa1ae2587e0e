//! The agent store: every agent's [`AgentRecord`] in sled, keyed by agent id. Only this
//! module touches sled. Records are stored as versioned JSON of our own types (never the
//! protobuf messages), so the API and the storage format can change independently.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::Notify;

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

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    agents: sled::Tree,
    /// Wakes the background flusher after a write.
    written: Arc<Notify>,
}

impl Store {
    /// Opens (or creates) the store. sled locks the folder, so a second daemon on the same
    /// data folder fails here.
    pub fn open(path: &Path) -> Result<Store> {
        let db = sled::Config::new().path(path).open()?;
        let agents = db.open_tree("agents")?;
        Ok(Store {
            db,
            agents,
            written: Arc::new(Notify::new()),
        })
    }

    /// Writes reach the disk within one flush of being made, not at sled's next periodic
    /// flush, so a daemon killed right after a transition still has it on restart. Flushes
    /// coalesce: writes made while one runs are covered by the next.
    pub fn start_background_flush(&self) {
        let store = self.clone();
        tokio::spawn(async move {
            loop {
                store.written.notified().await;
                if let Err(error) = store.flush().await {
                    tracing::error!(%error, "flushing the agent store");
                }
            }
        });
    }

    /// Every stored record, in agent id order.
    pub fn load_agents(&self) -> Result<Vec<AgentRecord>> {
        self.agents
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(&String::from_utf8_lossy(&key), &value)
            })
            .collect()
    }

    pub fn put(&self, record: &AgentRecord) -> Result<()> {
        let value = serde_json::to_vec(&StoredRecord::V1(record.clone())).map_err(|source| {
            Error::Record {
                key: record.spec.agent_id.clone(),
                source,
            }
        })?;
        self.agents.insert(record.spec.agent_id.as_bytes(), value)?;
        self.written.notify_one();
        Ok(())
    }

    /// Waits until everything written so far is on disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn decode(key: &str, value: &[u8]) -> Result<AgentRecord> {
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
    use crate::agent::{AgentState, Exit};

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
        let store = Store::open(dir.path()).expect("reopens");
        assert_eq!(store.load_agents().expect("loads"), vec![record]);
    }

    #[test]
    fn unreadable_records_are_reported_with_their_key() {
        match decode("k1", b"{\"version\": \"99\"}") {
            Err(Error::Record { key, .. }) => assert_eq!(key, "k1"),
            other => panic!("expected a record error, got {other:?}"),
        }
    }
}
