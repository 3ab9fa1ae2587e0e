//! Whether the store can be trusted, judged at start against what the host says of the
//! agents: the keeper's children and unacknowledged exits and the folders under `agents/`
//! (not processes that merely carry an agent folder in their environment: any user can
//! start one). Recovery kills a process that has no record, so a store that lost records
//! would have agentd kill running work: a
//! store that is empty while agents exist, that is behind its own stamp (it lost flushed
//! writes: rolled back or truncated), or that lacks agents which started before its last
//! flush began, is not trusted. agentd then refuses to start, before it kills or writes
//! anything, and the report says what it found and how to go on.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::agent::AgentRecord;
use crate::store::StoreHistory;

/// The flag that starts agentd on a store that is not trusted.
pub(crate) const RECOVER_FLAG: &str = "--recover-store rebuild";

/// What the host says, next to what the store holds.
pub(crate) struct Evidence<'a> {
    pub records: &'a [AgentRecord],
    pub history: StoreHistory,
    /// The generation the stamp beside the store names.
    pub stamp: Option<u64>,
    /// Folders under `agents/`.
    pub folders: BTreeSet<String>,
    /// Agents with a process now (the keeper's children), and when the earliest of them
    /// started, in seconds on the boot clock.
    pub running: BTreeMap<String, f64>,
    /// Agents whose exit the keeper holds, unacknowledged.
    pub exited: BTreeSet<String>,
    /// Agents the keeper runs whose record agentd said was on disk.
    pub recorded: BTreeSet<String>,
}

/// How much earlier than the last flush a process must have started to say its record was
/// on disk (start times count in clock ticks; the flush time is read from `/proc/uptime`).
const MARGIN_SECONDS: f64 = 0.05;

/// Why the store is not trusted; `None` when it is.
pub(crate) fn judge(evidence: &Evidence) -> Option<Vec<String>> {
    let known: BTreeSet<&str> = evidence
        .records
        .iter()
        .map(|r| r.spec.agent_id.as_str())
        .collect();
    let mut reasons = Vec::new();
    let history = evidence.history;
    if let Some(stamp) = evidence.stamp.filter(|&s| s > history.generation) {
        reasons.push(format!(
            "it is older than its own last flush (generation {} on disk, {stamp} in \
             `store.generation`): it was rolled back to an older copy or lost writes",
            history.generation
        ));
    }
    let never_used =
        evidence.records.is_empty() && history.generation == 0 && history.sequence_reserved == 0;
    let anything =
        !evidence.folders.is_empty() || !evidence.running.is_empty() || !evidence.exited.is_empty();
    if never_used && anything {
        reasons.push("it is empty, though agents were started in this data folder".to_string());
    }
    if let Some(flushed_from) = history.flushed_from {
        let missing: Vec<&str> = evidence
            .running
            .iter()
            .filter(|(id, started)| {
                !known.contains(id.as_str()) && **started + MARGIN_SECONDS < flushed_from
            })
            .map(|(id, _)| id.as_str())
            .collect();
        if !missing.is_empty() {
            reasons.push(format!(
                "it has no record of {}, which started before its last flush and run",
                names(&missing)
            ));
        }
    }
    let live: BTreeSet<&str> = evidence
        .records
        .iter()
        .filter(|r| r.state.is_live())
        .map(|r| r.spec.agent_id.as_str())
        .collect();
    let lost: Vec<&str> = evidence
        .recorded
        .iter()
        .map(String::as_str)
        .filter(|id| !live.contains(id))
        .collect();
    if !lost.is_empty() {
        reasons.push(format!(
            "the keeper runs {}, whose running record was on disk, and the store has no such \
             record",
            names(&lost)
        ));
    }
    (!reasons.is_empty()).then_some(reasons)
}

/// Why the store is not trusted, what it holds and what the host says.
pub(crate) fn findings(store_dir: &Path, reasons: &[String], evidence: &Evidence) -> String {
    let known: BTreeSet<&str> = evidence
        .records
        .iter()
        .map(|r| r.spec.agent_id.as_str())
        .collect();
    let running: Vec<&str> = evidence.running.keys().map(String::as_str).collect();
    let unrecorded: Vec<&str> = evidence
        .folders
        .iter()
        .map(String::as_str)
        .filter(|id| !known.contains(id))
        .collect();
    let stale: Vec<&str> = evidence
        .records
        .iter()
        .filter(|r| r.state.is_live())
        .map(|r| r.spec.agent_id.as_str())
        .filter(|id| !evidence.running.contains_key(*id) && !evidence.exited.contains(*id))
        .collect();
    let mut found = vec![
        format!("agent records in the store: {}", evidence.records.len()),
        format!(
            "agents with running processes: {}{}",
            running.len(),
            listed(&running)
        ),
        format!("agent folders: {}", evidence.folders.len()),
    ];
    if !unrecorded.is_empty() {
        found.push(format!(
            "agent folders with no record: {}{}",
            unrecorded.len(),
            listed(&unrecorded)
        ));
    }
    if !stale.is_empty() {
        found.push(format!(
            "agents the store says run, which do not: {}{}",
            stale.len(),
            listed(&stale)
        ));
    }
    format!(
        "the agent store `{}` cannot be trusted: {}. Found: {}",
        store_dir.display(),
        reasons.join("; "),
        found.join("; "),
    )
}

/// The refusal to start: the findings, and how to start anyway.
pub(crate) fn refusal(store_dir: &Path, findings: &str) -> String {
    let data_dir = store_dir.parent().unwrap_or(store_dir);
    format!(
        "{findings}. agentd did not start: nothing was killed or changed, and the agents keep \
         running. If the store was damaged or restored from an older copy, start agentd once \
         with `{RECOVER_FLAG}`: the store is moved aside to `{}/store.damaged-TIME`, each \
         agent's record is rebuilt from its folder (its spec in `specs/`) and the keeper, and \
         running agents are adopted; an agent whose end cannot be learned is LOST",
        data_dir.display(),
    )
}

/// ` (a, b, c and 4 more)`, or nothing.
fn listed(ids: &[&str]) -> String {
    match ids.is_empty() {
        true => String::new(),
        false => format!(" ({})", names(ids)),
    }
}

fn names(ids: &[&str]) -> String {
    const SHOWN: usize = 8;
    let mut text = ids
        .iter()
        .take(SHOWN)
        .map(|id| format!("`{id}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        text += &format!(" and {} more", ids.len() - SHOWN);
    }
    text
}

/// The agent folders under `agents_dir`, by name.
pub(crate) fn agent_folders(agents_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(agents_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::AgentState;

    fn record(id: &str, state: AgentState) -> AgentRecord {
        let fixture = include_bytes!("../fixtures/agent-record-v1.json");
        let mut record = crate::store::decode("fixture-1", fixture).expect("decodes");
        let mut spec = crate::spec::AgentSpec::clone(&record.spec);
        spec.agent_id = id.into();
        record.spec = std::sync::Arc::new(spec);
        record.state = state;
        record
    }

    fn evidence(records: &[AgentRecord], history: StoreHistory) -> Evidence<'_> {
        Evidence {
            records,
            history,
            stamp: None,
            folders: BTreeSet::new(),
            running: BTreeMap::new(),
            exited: BTreeSet::new(),
            recorded: BTreeSet::new(),
        }
    }

    #[test]
    fn a_new_data_folder_is_trusted() {
        assert_eq!(judge(&evidence(&[], StoreHistory::default())), None);
    }

    #[test]
    fn an_empty_store_beside_agent_folders_is_not() {
        let mut found = evidence(&[], StoreHistory::default());
        found.folders.insert("a1".into());
        found.running.insert("a1".into(), 10.0);
        let reasons = judge(&found).expect("distrusted");
        assert!(reasons[0].contains("empty"), "{reasons:?}");
        let findings = findings(Path::new("/d/store"), &reasons, &found);
        assert!(
            findings.contains("agents with running processes: 1 (`a1`)"),
            "{findings}"
        );
        let report = refusal(Path::new("/d/store"), &findings);
        assert!(report.contains(RECOVER_FLAG), "{report}");
    }

    #[test]
    fn a_store_behind_its_stamp_was_rolled_back() {
        let records = [record("a1", AgentState::Running)];
        let history = StoreHistory {
            generation: 7,
            sequence_reserved: 100,
            flushed_from: None,
        };
        let mut found = evidence(&records, history);
        found.stamp = Some(7);
        assert_eq!(judge(&found), None, "a stamp equal to the store is fine");
        found.stamp = Some(9);
        let reasons = judge(&found).expect("distrusted");
        assert!(reasons[0].contains("rolled back"), "{reasons:?}");
        let findings = findings(Path::new("/d/store"), &reasons, &found);
        assert!(
            findings.contains("agents the store says run, which do not: 1 (`a1`)"),
            "{findings}"
        );
    }

    #[test]
    fn an_unknown_agent_is_damage_only_if_it_started_before_the_last_flush() {
        let records = [record("a1", AgentState::Running)];
        let history = StoreHistory {
            generation: 3,
            sequence_reserved: 100,
            flushed_from: Some(100.0),
        };
        let mut found = evidence(&records, history);
        found.running.insert("a1".into(), 50.0);
        // A spawn cut short: its record had not reached the disk when agentd died.
        found.running.insert("late".into(), 100.0);
        assert_eq!(judge(&found), None);
        found.running.insert("early".into(), 60.0);
        let reasons = judge(&found).expect("distrusted");
        assert!(reasons[0].contains("`early`"), "{reasons:?}");
        assert!(!reasons[0].contains("`late`"), "{reasons:?}");
    }

    #[test]
    fn a_run_the_keeper_knows_was_recorded_must_be_in_the_store() {
        let records = [
            record("a1", AgentState::Running),
            record("done", AgentState::Completed),
        ];
        let history = StoreHistory {
            generation: 3,
            sequence_reserved: 100,
            flushed_from: None,
        };
        let mut found = evidence(&records, history);
        found.recorded.insert("a1".into());
        assert_eq!(judge(&found), None);
        found.recorded.insert("done".into());
        found.recorded.insert("new".into());
        let reasons = judge(&found).expect("distrusted");
        assert!(reasons[0].contains("`done`, `new`"), "{reasons:?}");
    }
}
