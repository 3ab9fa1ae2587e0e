//! Removing agents: on request, and by the retention limits; their folders go to the trash.

use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::agent::AgentStatus;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::process;
use crate::rebuild;

use super::SupervisorTask;

/// How many agents one round of retention removes. Removing one (its record, folder, spec
/// and cgroup) costs about 0.3 ms on the supervisor's thread: 9,000 ended at once (a stop of
/// 10,000) were a stall of seconds for every call, where 256 a second catch up unnoticed.
const REMOVED_PER_ROUND: usize = 256;

impl SupervisorTask {
    /// Deletes the agent's record, folder and output, if it has ended for good.
    pub(super) fn remove(&mut self, agent_id: &str) -> Result<AgentStatus> {
        let machine = self.table.get(agent_id)?;
        let lingering = machine.may_linger()
            && machine
                .record()
                .hold()
                .is_some_and(|hold| self.os.group_alive(hold));
        if !machine.has_ended() || lingering {
            return Err(Error::NotFinished {
                id: agent_id.to_string(),
                state: machine.record().state,
            });
        }
        let status = machine.status(self.clock.mono());
        if let Some(cgroup) = &machine.record().cgroup
            && let Err(error) = self.os.remove_cgroup(cgroup)
        {
            tracing::warn!(%agent_id, %error, "removing the agent's cgroup");
        }
        self.store.remove_agent(agent_id)?;
        rebuild::remove_spec(&self.specs_dir, agent_id);
        self.events
            .emit(EventKind::Removed, String::new(), None, || status.clone());
        self.histories.remove(agent_id);
        self.forget_proxy(agent_id);
        if let Some(machine) = self.table.remove(agent_id) {
            // The folder moves out of `agents/` at once, so the id can be spawned again right
            // away; deleting a large output can take a while, so that is off the task.
            let dir = &machine.record().agent_dir;
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let trash = self.trash_dir.join(format!("{agent_id}-{nanos}"));
            match std::fs::rename(dir, &trash) {
                Ok(()) => self.empty_trash(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "moving a removed agent's folder away");
                }
            }
        }
        tracing::info!(%agent_id, "removed");
        Ok(status)
    }

    /// Deletes the folders in the trash on one blocking thread, never more: retention may
    /// remove a thousand agents in one turn, and a thread each would leave agentd holding
    /// their stacks and malloc arenas.
    pub(super) fn empty_trash(&mut self) {
        if self.trash_emptying.swap(true, Ordering::SeqCst) {
            return;
        }
        let (trash_dir, emptying) = (self.trash_dir.clone(), self.trash_emptying.clone());
        tokio::task::spawn_blocking(move || {
            loop {
                for entry in std::fs::read_dir(&trash_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = entry.path();
                    if let Err(error) = std::fs::remove_dir_all(&path) {
                        tracing::warn!(dir = %path.display(), %error, "deleting a removed agent's folder");
                    }
                }
                emptying.store(false, Ordering::SeqCst);
                // A folder moved in after the last listing is deleted now, unless a new
                // round already started for it.
                let more = std::fs::read_dir(&trash_dir).is_ok_and(|mut d| d.next().is_some());
                if !more || emptying.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    /// Removes the agents that ended for good longest ago, beyond the count limit or past
    /// the age limit, at most [`REMOVED_PER_ROUND`] a round.
    pub(super) fn apply_retention(&mut self) {
        let retention = self.finished_retention;
        let mut finished: Vec<(SystemTime, String)> = self
            .table
            .machines()
            .filter(|m| m.has_ended())
            .map(|m| {
                let record = m.record();
                let ended = record.ended_at.unwrap_or(UNIX_EPOCH);
                (ended, record.spec.agent_id.clone())
            })
            .collect();
        let Some(oldest_allowed) = self.clock.wall().checked_sub(retention.max_age) else {
            return;
        };
        finished.sort();
        let over = finished.len().saturating_sub(retention.max_count);
        let expired: Vec<String> = finished
            .into_iter()
            .enumerate()
            .filter(|(index, (ended, _))| *index < over || *ended < oldest_allowed)
            .map(|(_, (_, agent_id))| agent_id)
            .take(REMOVED_PER_ROUND)
            .collect();
        let mut removed = 0;
        for agent_id in expired {
            match self.remove(&agent_id) {
                Ok(_) => {
                    removed += 1;
                    tracing::info!(%agent_id, "removed by retention");
                }
                Err(Error::NotFinished { .. }) => {}
                Err(error) => tracing::warn!(%agent_id, %error, "retention could not remove"),
            }
        }
        if removed > 0 {
            process::release_free_memory();
        }
    }
}
