//! What a starting daemon does with the records an earlier one left: adopt the agents that
//! still run, mark the others lost.

use std::os::fd::OwnedFd;
use std::time::SystemTime;

use tokio::time::Instant;

use crate::agent::AgentState;
use crate::error::Result;
use crate::events::EventKind;
use crate::lifecycle::RunEnd;
use crate::os;
use crate::supervisor::{SupervisorTask, Timer};

impl SupervisorTask {
    /// Loads every stored agent. Agents an earlier daemon left running are adopted when
    /// their pid still names the same process (same start time), and marked lost otherwise.
    /// Restarts that were pending go on at their time; lost agents whose policy restarts
    /// them are restarted.
    pub(crate) fn recover(&mut self) -> Result<()> {
        let mut lost = Vec::new();
        let records = self.store.load_agents()?;
        self.records_set_aside = u32::try_from(self.store.set_aside_count()).unwrap_or(u32::MAX);
        for mut record in records {
            let agent_id = record.spec.agent_id.clone();
            if record.pid.is_some() && !record.spec.request_id.is_empty() {
                self.by_request
                    .insert(record.spec.request_id.clone(), agent_id.clone());
            }
            if record.state == AgentState::BackingOff {
                let wait = record
                    .next_restart_at
                    .and_then(|due| due.duration_since(SystemTime::now()).ok())
                    .unwrap_or_default();
                self.insert(record, false);
                let at = Instant::now() + wait;
                if let Some(agent) = self.agents.get_mut(&agent_id) {
                    agent.restart_at = Some(at);
                }
                self.timers.insert((at, agent_id, Timer::Restart));
                continue;
            }
            if !record.state.is_live() {
                self.insert(record, false);
                continue;
            }
            // Same pid and start time: the same process. A zombie is already gone (its new
            // parent may never reap it).
            let same_process = record.pid.filter(|&pid| {
                os::proc_stat(pid).is_some_and(|stat| {
                    Some(stat.start_ticks) == record.start_ticks && stat.state != 'Z'
                })
            });
            match same_process.map(|pid| (pid, os::pidfd_open(pid))) {
                Some((pid, Ok(pidfd))) => {
                    record.state = AgentState::Running;
                    record.adopted = true;
                    self.persist(&record);
                    self.insert(record, true);
                    self.watch_adopted(agent_id.clone(), pidfd);
                    tracing::info!(%agent_id, pid, "adopted");
                    self.emit(&agent_id, EventKind::Adopted, String::new());
                    self.schedule_run_limits(&agent_id);
                }
                _ => {
                    let message = "the process was gone when agentd restarted".to_string();
                    record.state = AgentState::Lost;
                    record.ended_at = Some(SystemTime::now());
                    record.error = Some(message.clone());
                    self.persist(&record);
                    self.insert(record, false);
                    tracing::warn!(%agent_id, "{message}");
                    self.emit(&agent_id, EventKind::Lost, message);
                    lost.push(agent_id);
                }
            }
        }
        for agent_id in lost {
            if let Some(agent) = self.agents.get_mut(&agent_id) {
                agent.run_over = false;
            }
            self.run_ended(&agent_id, RunEnd::Lost);
        }
        Ok(())
    }

    /// An adopted agent is not our child: its exit arrives through a pidfd.
    pub(crate) fn watch_adopted(&self, agent_id: String, pidfd: OwnedFd) {
        let exits = self.adopted_exits_tx.clone();
        tokio::spawn(async move {
            match os::wait_for_exit(pidfd).await {
                Ok(()) => {
                    let _ = exits.send(agent_id);
                }
                Err(error) => {
                    tracing::error!(%agent_id, %error, "cannot watch adopted agent for its exit");
                }
            }
        });
    }
}
