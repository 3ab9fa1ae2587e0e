//! What a record can be rebuilt from when the store cannot be trusted: every agent's spawn
//! spec, written at spawn to `DATA/specs/ID.json` (0600, no fsync: one small write on the
//! spawn path), and removed with the agent. The specs live beside the store rather than in
//! the agent's folder, which the agent (or the user it runs as) owns and could rewrite into
//! a command agentd would run as itself. With `--recover-store rebuild` the damaged store
//! is moved aside and each agent folder with a spec becomes a record that recovery then
//! treats as running: adopted if its process runs, ended as the keeper saw it, else LOST.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::agent::AgentRecord;

use crate::error::{Error, Result};
use crate::spec::{AgentSpec, check_id};
use crate::state::AgentState;

/// The folder of specs in the data folder.
pub(crate) const SPECS: &str = "specs";

/// The stored form of a spec, versioned as records are.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StoredSpec {
    #[serde(rename = "1")]
    V1(AgentSpec),
}

fn spec_path(specs_dir: &Path, agent_id: &str) -> PathBuf {
    specs_dir.join(format!("{agent_id}.json"))
}

/// Writes the agent's spec where a rebuild finds it; not synced (the store's flush is).
pub(crate) fn write_spec(specs_dir: &Path, spec: &AgentSpec) -> Result<()> {
    write_spec_into(specs_dir, spec, None)
}

/// Writes the spec into `premade` (an empty file agentd made ahead, beside the specs folder)
/// and renames it into place, if given; else creates it in place.
pub(crate) fn write_spec_into(
    specs_dir: &Path,
    spec: &AgentSpec,
    premade: Option<&Path>,
) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = spec_path(specs_dir, &spec.agent_id);
    let failed = |source| Error::AgentDir {
        id: spec.agent_id.clone(),
        path: path.clone(),
        source,
    };
    let bytes =
        serde_json::to_vec(&StoredSpec::V1(spec.clone())).map_err(|source| Error::Record {
            key: format!("spec of {}", spec.agent_id),
            source,
        })?;
    let write = |path: &Path| {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .and_then(|mut file| file.write_all(&bytes))
    };
    match premade {
        Some(premade) => write(premade).and_then(|()| std::fs::rename(premade, &path)),
        None => write(&path),
    }
    .map_err(failed)
}

/// Writes the specs an earlier agentd did not, from the records of a trusted store, so its
/// agents can be rebuilt too.
pub(crate) fn write_missing_specs(specs_dir: &Path, records: &[AgentRecord]) {
    for record in records {
        let spec = &record.spec;
        if spec_path(specs_dir, &spec.agent_id).exists() {
            continue;
        }
        if let Err(error) = write_spec(specs_dir, spec) {
            tracing::warn!(agent_id = %spec.agent_id, %error, "writing the agent's spec");
        }
    }
}

/// Forgets a removed agent's spec.
pub(crate) fn remove_spec(specs_dir: &Path, agent_id: &str) {
    let path = spec_path(specs_dir, agent_id);
    if let Err(error) = std::fs::remove_file(&path)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%agent_id, %error, "removing the agent's spec");
    }
}

/// Records rebuilt from the agent folders.
pub(crate) struct Rebuilt {
    /// One per folder with a readable spec, as if it still ran.
    pub records: Vec<AgentRecord>,
    /// Folders with no readable spec (made by an older agentd, or the spec is damaged):
    /// no record, and their processes are left alone.
    pub without_spec: Vec<String>,
    /// Where the damaged store went.
    pub aside: Option<PathBuf>,
}

/// A record for each folder under `agents_dir` with a spec in `specs_dir`.
pub(crate) fn rebuild(specs_dir: &Path, agents_dir: &Path) -> Rebuilt {
    let mut rebuilt = Rebuilt {
        records: Vec::new(),
        without_spec: Vec::new(),
        aside: None,
    };
    for agent_id in crate::trust::agent_folders(agents_dir) {
        match read_spec(specs_dir, &agent_id) {
            Ok((spec, written)) => {
                let mut record =
                    AgentRecord::new(Arc::new(spec), agents_dir.join(&agent_id), written);
                // Recovery looks for the process of a live record.
                record.state = AgentState::Running;
                rebuilt.records.push(record);
            }
            Err(problem) => {
                tracing::error!(%agent_id, "cannot rebuild the agent's record: {problem}");
                rebuilt.without_spec.push(agent_id);
            }
        }
    }
    rebuilt
}

fn read_spec(specs_dir: &Path, agent_id: &str) -> Result<(AgentSpec, SystemTime), String> {
    check_id("agent_id", agent_id).map_err(|error| error.to_string())?;
    let path = spec_path(specs_dir, agent_id);
    let file = crate::files::open_for_reading(&path)
        .map_err(|error| format!("reading `{}`: {error}", path.display()))?;
    let written = file
        .metadata()
        .and_then(|meta| meta.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let StoredSpec::V1(spec) = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|error| format!("`{}` is not a spec: {error}", path.display()))?;
    if spec.agent_id != agent_id || spec.command.is_empty() {
        return Err(format!(
            "`{}` names another agent or no command",
            path.display()
        ));
    }
    Ok((spec, written))
}

/// Moves a damaged store (and its stamp) aside to `store.damaged-SECONDS`, kept for a
/// person to look at. Returns where it went, if there was a store.
pub(crate) fn move_aside(store_dir: &Path) -> Result<Option<PathBuf>> {
    let seconds = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let aside = store_dir.with_file_name(format!("store.damaged-{seconds}"));
    let failed = |source| Error::Setup {
        what: format!(
            "moving the damaged store `{}` aside to `{}`",
            store_dir.display(),
            aside.display()
        ),
        source,
    };
    let moved = match std::fs::rename(store_dir, &aside) {
        Ok(()) => Some(aside.clone()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => return Err(failed(error)),
    };
    // The stamp goes with it: the new store starts its own count.
    let stamp = store_dir.with_file_name("store.generation");
    let kept = moved.is_some() && std::fs::rename(&stamp, aside.join("store.generation")).is_ok();
    if !kept {
        crate::store::Store::remove_stamp(store_dir).map_err(failed)?;
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_written_at_spawn_rebuilds_a_running_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (specs, agents) = (dir.path().join("specs"), dir.path().join("agents"));
        std::fs::create_dir_all(&specs).expect("specs");
        std::fs::create_dir_all(agents.join("a1")).expect("folder");
        std::fs::create_dir_all(agents.join("old")).expect("folder");
        let fixture = include_bytes!("../fixtures/agent-record-v1.json");
        let stored = crate::store::decode("fixture-1", fixture).expect("decodes");
        let spec = AgentSpec {
            agent_id: "a1".into(),
            ..AgentSpec::clone(&stored.spec)
        };
        write_spec(&specs, &spec).expect("write");
        let rebuilt = rebuild(&specs, &agents);
        assert_eq!(rebuilt.without_spec, ["old"]);
        let [record] = &rebuilt.records[..] else {
            panic!("one record: {:?}", rebuilt.records);
        };
        assert_eq!(*record.spec, spec);
        assert_eq!(record.state, AgentState::Running);
        assert_eq!(record.agent_dir, agents.join("a1"));
        remove_spec(&specs, "a1");
        assert!(rebuild(&specs, &agents).records.is_empty());
    }
}
