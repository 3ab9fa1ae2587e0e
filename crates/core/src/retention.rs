//! Removing agents that have ended for good: on request (Remove) and by retention, so a
//! daemon that runs for months does not fill its disk with old agents' folders.

use std::time::SystemTime;

use crate::agent::AgentStatus;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::os;
use crate::supervisor::SupervisorTask;

impl SupervisorTask {
    /// Deletes the agent's record, folder and output, if it has ended for good.
    pub(crate) fn remove(&mut self, agent_id: &str) -> Result<AgentStatus> {
        let agent = self.agent(agent_id)?;
        let state = agent.record.state;
        let lingering = agent.group_may_live
            && agent
                .record
                .pid
                .is_some_and(|pgid| os::GroupProbe::default().alive(pgid));
        if state.holds_capacity() || agent.stop.is_some() || lingering {
            return Err(Error::NotFinished {
                id: agent_id.to_string(),
                state,
            });
        }
        let status = agent.status();
        self.store.remove_agent(agent_id)?;
        self.emit(agent_id, EventKind::Removed, String::new());
        if let Some(agent) = self.agents.remove(agent_id) {
            self.by_request.retain(|_, id| id != agent_id);
            // The folder moves out of `agents/` at once, so the id can be spawned again right
            // away; deleting a large output can take a while, so that is off the task.
            let dir = agent.record.agent_dir;
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let trash = self.trash_dir.join(format!("{agent_id}-{nanos}"));
            match std::fs::rename(&dir, &trash) {
                Ok(()) => {
                    tokio::task::spawn_blocking(move || {
                        if let Err(error) = std::fs::remove_dir_all(&trash) {
                            tracing::warn!(dir = %trash.display(), %error, "deleting a removed agent's folder");
                        }
                    });
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "moving a removed agent's folder away");
                }
            }
        }
        tracing::info!(%agent_id, "removed");
        Ok(status)
    }

    /// Removes the agents that ended for good longest ago, beyond the count limit or past
    /// the age limit.
    pub(crate) fn apply_retention(&mut self) {
        let retention = self.finished_retention;
        let mut finished: Vec<(SystemTime, String)> = self
            .agents
            .values()
            .filter(|agent| agent.run_over && !agent.record.state.holds_capacity())
            .map(|agent| {
                let ended = agent.record.ended_at.unwrap_or(SystemTime::UNIX_EPOCH);
                (ended, agent.record.spec.agent_id.clone())
            })
            .collect();
        let Some(oldest_allowed) = SystemTime::now().checked_sub(retention.max_age) else {
            return;
        };
        finished.sort();
        let over = finished.len().saturating_sub(retention.max_count);
        let expired: Vec<String> = finished
            .into_iter()
            .enumerate()
            .filter(|(index, (ended, _))| *index < over || *ended < oldest_allowed)
            .map(|(_, (_, agent_id))| agent_id)
            .collect();
        for agent_id in expired {
            match self.remove(&agent_id) {
                Ok(_) => tracing::info!(%agent_id, "removed by retention"),
                Err(Error::NotFinished { .. }) => {}
                Err(error) => tracing::warn!(%agent_id, %error, "retention could not remove"),
            }
        }
    }
}
