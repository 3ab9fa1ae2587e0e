//! The stop ladder: the stop signal to the agent's whole process group, a grace period, the
//! signal again, a second grace period, then SIGKILL. A stop ends the moment the whole group
//! is gone, not when the leader exits and not after the full waits. Each stopping agent has
//! its own deadline on the supervisor task, so any number of ladders run at once.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use tokio::time::Instant;

use crate::agent::{AgentState, AgentStatus};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::lifecycle::RunEnd;
use crate::os;
use crate::spec::check_id;
use crate::supervisor::{ShutdownPolicy, StopTarget, SupervisorTask, Timer};

/// How a client's stop behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopOptions {
    /// SIGKILL at once instead of the ladder.
    pub force: bool,
    /// Also stop every descendant agent, children first.
    pub cascade: bool,
}

/// Why an agent is being stopped; it decides the state the agent ends in and whether the
/// restart policy may start it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// A client asked (Cleanup, or a cascade it asked for).
    Requested,
    Shutdown,
    /// Its parent agent ended for good and its policy says to follow.
    ParentExited,
    /// A health check whose action is stop.
    Health,
    /// A health check whose action is restart.
    HealthRestart,
    MaxRuntime,
    /// No first heartbeat within the startup timeout.
    StartupTimeout,
}

impl StopReason {
    pub fn client_asked(self) -> bool {
        matches!(self, StopReason::Requested | StopReason::Shutdown)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopOutcome {
    /// The group was gone after the first stop signal.
    ExitedOnFirstSignal,
    /// The group needed the second stop signal.
    Escalated,
    /// The group needed SIGKILL (or the stop was forced).
    Killed,
    /// The agent had already ended before the stop.
    AlreadyExited,
}

#[derive(Debug, Clone)]
pub struct StopReport {
    pub agent_id: String,
    pub outcome: StopOutcome,
    /// From the stop request until the whole group was gone.
    pub duration: Duration,
    pub status: AgentStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    FirstSignal,
    SecondSignal,
    Kill,
}

/// A stop under way.
pub(crate) struct Stop {
    started: Instant,
    step: Step,
    deadline: Instant,
    /// Everyone who asked for this stop; each gets the report.
    waiters: Vec<oneshot::Sender<StopReport>>,
    pub reason: StopReason,
}

/// After SIGKILL the group is signalled and checked again this often until it is gone
/// (a process in uninterruptible sleep dies only when it wakes).
const KILL_RECHECK: Duration = Duration::from_secs(1);

impl SupervisorTask {
    /// Starts stopping an agent, or joins a stop already under way. The agent must exist.
    pub(crate) fn begin_stop(
        &mut self,
        agent_id: &str,
        force: bool,
        reason: StopReason,
    ) -> oneshot::Receiver<StopReport> {
        let (waiter, report) = oneshot::channel();
        self.cancel_restart(agent_id);
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return report;
        };
        if let Some(stop) = agent.stop.as_mut() {
            stop.waiters.push(waiter);
            // A client's stop wins: the agent will not be restarted.
            if reason.client_asked() {
                stop.reason = reason;
            }
            if force && stop.step != Step::Kill {
                self.enter_step(agent_id, Step::Kill);
            }
            return report;
        }
        let pgid = agent.record.pid.filter(|&pgid| {
            agent.leader_alive || (agent.group_may_live && os::GroupProbe::default().alive(pgid))
        });
        if pgid.is_none() {
            agent.group_may_live = false;
            let _ = waiter.send(StopReport {
                agent_id: agent_id.to_string(),
                outcome: StopOutcome::AlreadyExited,
                duration: Duration::ZERO,
                status: agent.status(),
            });
            return report;
        }
        let now = Instant::now();
        agent.stop = Some(Stop {
            started: now,
            step: Step::FirstSignal,
            deadline: now,
            waiters: vec![waiter],
            reason,
        });
        if agent.leader_alive {
            agent.record.state = AgentState::Stopping;
            let record = agent.record.clone();
            self.persist(&record);
            self.emit(
                agent_id,
                EventKind::Stopping,
                if force { "force" } else { "graceful" }.to_string(),
            );
        }
        self.enter_step(agent_id, if force { Step::Kill } else { Step::FirstSignal });
        report
    }

    /// Sends the step's signal and sets its deadline.
    pub(crate) fn enter_step(&mut self, agent_id: &str, step: Step) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let (Some(pgid), Some(stop)) = (agent.record.pid, agent.stop.as_mut()) else {
            return;
        };
        let policy = agent.record.spec.stop_policy;
        let (signal, wait) = match step {
            Step::FirstSignal => (policy.signal, policy.first_grace),
            Step::SecondSignal => (policy.signal, policy.second_grace),
            Step::Kill => (Signal::SIGKILL, KILL_RECHECK),
        };
        self.timers
            .remove(&(stop.deadline, agent_id.to_string(), Timer::StopStep));
        stop.step = step;
        stop.deadline = Instant::now() + wait;
        self.timers
            .insert((stop.deadline, agent_id.to_string(), Timer::StopStep));
        tracing::info!(%agent_id, ?step, %signal, "stop ladder");
        let sent = match os::signal_group(pgid, signal) {
            // A leader that left its group still gets the signal.
            Ok(false) if agent.leader_alive => os::signal_process(pgid, signal),
            other => other,
        };
        if let Err(error) = sent {
            tracing::warn!(%agent_id, %error, %signal, "signalling the agent's process group");
        }
    }

    /// The current step's grace period ran out: finish if the group is gone, else escalate.
    pub(crate) fn on_stop_deadline(&mut self, agent_id: &str) {
        if self.finish_stop_if_gone(agent_id, &mut os::GroupProbe::default()) {
            return;
        }
        let Some(step) = self
            .agents
            .get(agent_id)
            .and_then(|agent| agent.stop.as_ref())
            .map(|stop| stop.step)
        else {
            return;
        };
        let next = match step {
            Step::FirstSignal => Step::SecondSignal,
            Step::SecondSignal | Step::Kill => Step::Kill,
        };
        self.enter_step(agent_id, next);
    }

    /// Ends the stop and answers its waiters if the leader is reaped and the group is empty.
    pub(crate) fn finish_stop_if_gone(
        &mut self,
        agent_id: &str,
        probe: &mut os::GroupProbe,
    ) -> bool {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return false;
        };
        if agent.stop.is_none()
            || agent.leader_alive
            || agent.record.pid.is_some_and(|pgid| probe.alive(pgid))
        {
            return false;
        }
        agent.group_may_live = false;
        let Some(stop) = agent.stop.take() else {
            return false;
        };
        self.timers
            .remove(&(stop.deadline, agent_id.to_string(), Timer::StopStep));
        let outcome = match stop.step {
            Step::FirstSignal => StopOutcome::ExitedOnFirstSignal,
            Step::SecondSignal => StopOutcome::Escalated,
            Step::Kill => StopOutcome::Killed,
        };
        let duration = stop.started.elapsed();
        tracing::info!(%agent_id, ?outcome, ?duration, "stopped");
        let status = agent.status();
        for waiter in stop.waiters {
            let _ = waiter.send(StopReport {
                agent_id: agent_id.to_string(),
                outcome,
                duration,
                status: status.clone(),
            });
        }
        self.run_ended(agent_id, RunEnd::Stopped(stop.reason));
        true
    }

    /// Agents being stopped: each has exactly one stop-step timer.
    fn stopping(&self) -> impl Iterator<Item = &String> {
        self.timers
            .iter()
            .filter(|(_, _, timer)| *timer == Timer::StopStep)
            .map(|(_, id, _)| id)
    }

    pub(crate) fn has_lingering_group(&self) -> bool {
        self.stopping()
            .any(|id| self.agents.get(id).is_some_and(|a| !a.leader_alive))
    }

    pub(crate) fn check_stopping_groups(&mut self) {
        let stopping: Vec<String> = self.stopping().cloned().collect();
        let mut probe = os::GroupProbe::default();
        for agent_id in stopping {
            self.finish_stop_if_gone(&agent_id, &mut probe);
        }
    }

    pub(crate) fn stop(
        &mut self,
        target: StopTarget,
        options: StopOptions,
        reply: oneshot::Sender<Result<Vec<StopReport>>>,
    ) {
        let agent_ids = match target {
            StopTarget::All => self.agents.keys().cloned().collect(),
            StopTarget::Agents(ids) if ids.is_empty() => {
                let _ = reply.send(Err(Error::Invalid {
                    field: "agent_ids",
                    problem: "name at least one agent, or stop all".into(),
                }));
                return;
            }
            StopTarget::Agents(ids) => ids,
        };
        if let Some(unknown) = agent_ids.iter().find(|id| !self.agents.contains_key(*id)) {
            let error = match check_id("agent_ids", unknown) {
                Err(error) => error,
                Ok(()) => Error::NotFound {
                    id: unknown.clone(),
                },
            };
            let _ = reply.send(Err(error));
            return;
        }
        if options.cascade {
            match self.stop_cascade(agent_ids, options.force) {
                Some(cascade) => {
                    tokio::spawn(async move {
                        let _ = reply.send(Ok(cascade.await));
                    });
                }
                None => {
                    let _ = reply.send(Err(Error::ShuttingDown));
                }
            }
            return;
        }
        let pending: Vec<_> = agent_ids
            .iter()
            .map(|id| self.begin_stop(id, options.force, StopReason::Requested))
            .collect();
        tokio::spawn(async move {
            let mut reports = Vec::with_capacity(pending.len());
            for report in pending {
                match report.await {
                    Ok(report) => reports.push(report),
                    Err(_) => {
                        let _ = reply.send(Err(Error::ShuttingDown));
                        return;
                    }
                }
            }
            let _ = reply.send(Ok(reports));
        });
    }

    pub(crate) fn shutdown(&mut self, reply: oneshot::Sender<()>) {
        self.shutting_down = true;
        let live: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, agent)| {
                agent.leader_alive
                    || agent.group_may_live
                    || agent.record.state == AgentState::BackingOff
            })
            .map(|(id, _)| id.clone())
            .collect();
        let pending: Vec<_> = match self.limits.on_shutdown {
            ShutdownPolicy::Stop => {
                tracing::info!(agents = live.len(), "shutting down: stopping every agent");
                live.iter()
                    .map(|id| self.begin_stop(id, false, StopReason::Shutdown))
                    .collect()
            }
            ShutdownPolicy::Detach => {
                tracing::info!(
                    agents = live.len(),
                    "shutting down: leaving agents running for the next agentd to adopt"
                );
                Vec::new()
            }
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            for report in pending {
                let _ = report.await;
            }
            if let Err(error) = store.flush().await {
                tracing::error!(%error, "flushing the store at shutdown");
            }
            let _ = reply.send(());
        });
    }
}
