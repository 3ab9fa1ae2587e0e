//! What a starting daemon does with the records an earlier one left: adopt the agents that
//! still run, mark the others lost.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::SystemTime;

use nix::sys::signal::Signal;

use tokio::time::Instant;

use crate::agent::{AgentRecord, AgentState};
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
        // What agentd started, whatever the records say: a spawn or a restart whose record
        // did not reach the disk before a crash still left its process running.
        let mut marked: HashMap<String, Vec<os::MarkedLeader>> = HashMap::new();
        for leader in os::marked_leaders(&self.agents_dir) {
            marked
                .entry(leader.agent_id.clone())
                .or_default()
                .push(leader);
        }
        for mut record in records {
            let agent_id = record.spec.agent_id.clone();
            if record.pid.is_some() && !record.spec.request_id.is_empty() {
                self.by_request
                    .insert(record.spec.request_id.clone(), agent_id.clone());
            }
            let was_live = record.state.is_live() || record.state == AgentState::BackingOff;
            // Same pid and start time: the same process. A zombie is already gone (its new
            // parent may never reap it).
            let same_process = record.pid.filter(|&pid| {
                record.state.is_live()
                    && os::proc_stat(pid).is_some_and(|stat| {
                        Some(stat.start_ticks) == record.start_ticks && stat.state != 'Z'
                    })
            });
            // Else the run whose record was not yet written: the oldest leader carrying the
            // agent's folder (any younger one is its descendant).
            let unrecorded = match (same_process, was_live) {
                (None, true) => marked
                    .remove(&agent_id)
                    .and_then(|leaders| leaders.into_iter().min_by_key(|l| l.stat.start_ticks)),
                _ => None,
            };
            if same_process.is_none() && unrecorded.is_none() && !record.state.is_live() {
                if record.state == AgentState::BackingOff {
                    self.resume_backoff(record);
                } else {
                    self.insert(record, false);
                }
                continue;
            }
            if let Some(leader) = &unrecorded {
                tracing::warn!(
                    %agent_id,
                    pid = leader.pid,
                    "found the agent's process running though its record did not say so"
                );
                if record.state == AgentState::BackingOff {
                    record.restart_count += 1;
                    record.last_exit = record.exit;
                    record.exit = None;
                    record.next_restart_at = None;
                }
                record.pid = Some(leader.pid);
                record.start_ticks = Some(leader.stat.start_ticks);
                record.ended_at = None;
                record.error = None;
            }
            let pid = same_process.or(unrecorded.map(|leader| leader.pid));
            match pid.map(|pid| (pid, os::pidfd_open(pid))) {
                Some((pid, Ok(pidfd))) => {
                    record.state = AgentState::Running;
                    record.adopted = true;
                    if !record.spec.request_id.is_empty() {
                        self.by_request
                            .insert(record.spec.request_id.clone(), agent_id.clone());
                    }
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
        // Processes of agents with no record at all: their spawn was never acknowledged.
        for leader in marked.into_values().flatten() {
            if self.agents.contains_key(&leader.agent_id) {
                continue;
            }
            tracing::warn!(
                agent_id = %leader.agent_id,
                pid = leader.pid,
                "killing a process agentd started but has no record of (its spawn was cut short)"
            );
            if let Err(error) = os::signal_group(leader.pid, Signal::SIGKILL) {
                tracing::error!(pid = leader.pid, %error, "killing an unrecorded agent process");
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

    /// A restart that was pending goes on at its time.
    fn resume_backoff(&mut self, record: AgentRecord) {
        let agent_id = record.spec.agent_id.clone();
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
