//! Whether the store can be trusted (`trust.rs`), and what became of each stored agent
//! while agentd was away (`recover.rs`): the machines the table starts with.

use std::collections::BTreeMap;
use std::path::Path;

use crate::agent::AgentRecord;

use crate::error::{Error, Result};
use crate::keeper::{KeptChild, KeptExit};
use crate::machine::AgentMachine;
use crate::os::Os;
use crate::rebuild::{self, Rebuilt};
use crate::recover::{self, ExitWatch, KeeperState};
use crate::state::AgentState;
use crate::store::{Store, StoreHistory};
use crate::trust;

use super::{Ack, SupervisorTask, Work};

impl SupervisorTask {
    /// Loads every stored agent and learns what became of it while agentd was away.
    /// `records`: the store's, or rebuilt from the agent folders (`rebuilt`), in which case
    /// no process is killed for want of a record.
    pub(super) fn recover(
        &mut self,
        keeper: KeeperState,
        records: Vec<AgentRecord>,
        rebuilt: Option<Rebuilt>,
    ) -> Result<()> {
        self.records_set_aside = u32::try_from(self.store.set_aside_count()).unwrap_or(u32::MAX);
        // Every agent is in the table before any effect runs: an agent that ended for good
        // stops the children that follow it, whatever their place in id order.
        let mut pending = Vec::new();
        let trusted = rebuilt.is_none();
        let recovery = recover::recover(
            records,
            self.os.as_ref(),
            &self.agents_dir,
            &keeper,
            trusted,
        );
        for stray in recovery.strays {
            self.watch_stray(stray);
        }
        for found in recovery.found {
            let agent_id = found.record.spec.agent_id.clone();
            let now = self.now();
            let mut effects = Vec::new();
            let machine = AgentMachine::recovered(found.record, found.how, now, &mut effects);
            if let Some(at) = machine.deadline() {
                self.deadlines.insert((at, agent_id.clone()));
            }
            let (pid, request_id) = (
                machine.record().pid,
                machine.record().spec.request_id.clone(),
            );
            self.table.insert(machine);
            match (found.watch, pid) {
                (ExitWatch::Keeper, Some(pid)) => {
                    self.table.child_started(&agent_id, pid, &request_id);
                    let _ = self.acks.send(Ack::Recorded(pid));
                }
                (ExitWatch::Pidfd(pidfd), _) => self.watch_adopted(agent_id.clone(), pidfd),
                _ => {}
            }
            pending.push((agent_id, now, effects));
        }
        for (agent_id, now, effects) in pending {
            self.queue
                .extend(effects.into_iter().map(|effect| Work::Effect {
                    agent_id: agent_id.clone(),
                    now,
                    effect,
                }));
        }
        self.carry_out_queue();
        if let Some(rebuilt) = rebuilt {
            self.report_rebuild(&rebuilt);
        }
        Ok(())
    }

    /// Says, in one error line, what became of each agent whose record was rebuilt.
    pub(super) fn report_rebuild(&self, rebuilt: &Rebuilt) {
        let mut adopted = Vec::new();
        let mut ended = Vec::new();
        let mut lost = Vec::new();
        for machine in self.table.machines() {
            let record = machine.record();
            let id = record.spec.agent_id.clone();
            match record.state {
                AgentState::Lost => lost.push(id),
                _ if machine.leader_alive() => adopted.push(id),
                _ => ended.push(format!("{id} ({})", record.state_text())),
            }
        }
        let list = |ids: &[String]| match ids.is_empty() {
            true => "none".to_string(),
            false => ids.join(", "),
        };
        tracing::error!(
            "records rebuilt after the store could not be trusted (the old store is kept at \
             `{}`): running, adopted: {}; ended while agentd was away: {}; LOST, how they \
             ended is unknown (the old store may have known, or was rolled back past it): {}; \
             folders with no spec, not rebuilt, their processes left alone: {}",
            rebuilt
                .aside
                .as_deref()
                .map_or_else(|| "nowhere".into(), |p| p.display().to_string()),
            list(&adopted),
            list(&ended),
            list(&lost),
            list(&rebuilt.without_spec),
        );
    }
}

/// The store to start on, with its records: the one opened, if the host agrees with it;
/// else, with `--recover-store rebuild`, a new one and records rebuilt from the agent
/// folders; else the refusal, before anything is killed or written.
pub(super) fn trusted_store(
    opened: std::result::Result<Store, String>,
    rebuilding: bool,
    (store_dir, specs_dir, agents_dir): (&Path, &Path, &Path),
    os: &dyn Os,
    (children, exits): (&[KeptChild], &[KeptExit]),
) -> Result<(Store, Vec<AgentRecord>, Option<Rebuilt>)> {
    // Only the keeper's word counts: it talks to agentd's user alone. A process that
    // carries an agent folder in its environment proves nothing: anyone can set one.
    let ticks = os.proc_units().0.max(1) as f64;
    let mut running = BTreeMap::<String, f64>::new();
    for child in children {
        let at = child.start_ticks.map_or(f64::MAX, |t| t as f64 / ticks);
        let earliest = running.entry(child.agent_id.clone()).or_insert(at);
        *earliest = earliest.min(at);
    }
    let mut records = Vec::new();
    let (history, problem) = match &opened {
        Ok(store) => {
            records = store.load_agents()?;
            (store.history()?, None)
        }
        Err(problem) => (StoreHistory::default(), Some(problem)),
    };
    let evidence = trust::Evidence {
        records: &records,
        history,
        stamp: Store::stamped_generation(store_dir),
        folders: trust::agent_folders(agents_dir),
        running,
        exited: exits.iter().map(|exit| exit.agent_id.clone()).collect(),
        recorded: children
            .iter()
            .filter(|child| child.recorded)
            .map(|child| child.agent_id.clone())
            .collect(),
    };
    let reasons = match problem {
        Some(problem) => vec![format!("sled cannot read it ({problem})")],
        None => trust::judge(&evidence).unwrap_or_default(),
    };
    if let (Ok(store), true) = (&opened, reasons.is_empty()) {
        if rebuilding {
            tracing::warn!(
                "the agent store agrees with the agents found: it is used as it is, and \
                 --recover-store is ignored"
            );
        }
        rebuild::write_missing_specs(specs_dir, &records);
        return Ok((store.clone(), records, None));
    }
    let findings = trust::findings(store_dir, &reasons, &evidence);
    if !rebuilding {
        return Err(Error::StoreDistrusted {
            report: trust::refusal(store_dir, &findings),
        });
    }
    // sled lets go of the old files; they move aside with their folder.
    drop(opened);
    let aside = rebuild::move_aside(store_dir)?;
    tracing::error!(
        "{findings}. --recover-store rebuild: the store was moved aside to `{}`; records are \
         rebuilt from the agent folders and the keeper",
        aside.as_deref().unwrap_or(store_dir).display()
    );
    let store = Store::open(store_dir)?;
    let mut rebuilt = rebuild::rebuild(specs_dir, agents_dir);
    rebuilt.aside = aside;
    let records = std::mem::take(&mut rebuilt.records);
    Ok((store, records, Some(rebuilt)))
}
