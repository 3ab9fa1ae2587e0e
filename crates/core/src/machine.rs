//! One agent's lifecycle as a state machine that never touches the OS, the store or the
//! event bus. Each input (started, start failed, leader exited, group gone, stop requested,
//! timer due, heartbeat, sample, recovered) comes with the time it happened, [`Now`], and
//! pushes [`Effect`]s (signal the group, write the record, emit an event, start again...)
//! that the supervisor task carries out. Its one timer is [`AgentMachine::deadline`]; the
//! driver calls [`AgentMachine::timeout`] once it passes.
//!
//! Every duration (ladder steps, backoff, heartbeat silence, runtime limits, run length) is
//! measured on the monotonic clock; wall time only stamps what people read.
//!
//! How a Cleanup becomes a SIGKILL, all in this file: [`AgentMachine::stop`] enters the first
//! step of the ladder (or the kill step, when forced); each step signals the whole process
//! group and sets the phase's deadline; [`AgentMachine::timeout`] escalates
//! first signal → second signal → SIGKILL, and SIGKILL is sent again every [`KILL_RECHECK`]
//! until the group is gone. The stop finishes when the leader has exited and its group is
//! empty ([`AgentMachine::leader_exited`], [`AgentMachine::group_gone`]).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use crate::agent::{AgentRecord, AgentStatus};
use crate::events::EventKind;
use crate::health::Alert;
use crate::lifecycle::{RunEnd, wants_restart};
use crate::state::{AgentState, Containment, EndReason, Exit, StopReason, TreeSample};
use crate::stop::{Step, StopOutcome};

/// After SIGKILL the group is signalled again this often until it is gone (a process in
/// uninterruptible sleep dies only when it wakes).
pub(crate) const KILL_RECHECK: Duration = Duration::from_secs(1);

/// The moment an input happens, as the driver's clock reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    /// Every duration and deadline.
    pub mono: Instant,
    /// Timestamps shown to people, and nothing else.
    pub wall: SystemTime,
    /// A random draw in [-1, 1] that spreads restart delays (backoff jitter).
    pub jitter: f64,
    /// The daemon is shutting down: no run is started again.
    pub shutting_down: bool,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Send the signal to the agent's process group (and to its leader, should the leader have
    /// left the group).
    Signal(Signal),
    /// Write the record to the store.
    Persist,
    Emit {
        kind: EventKind,
        message: String,
        alert: Option<Alert>,
    },
    /// Start the process again (a restart); answer with `started` or `start_failed`.
    Launch,
    /// A run ended (for the metrics: once per run, whatever follows).
    RunEnded(EndReason),
    /// The stop under way is over: answer everyone who waits for it.
    StopFinished {
        outcome: StopOutcome,
        duration: Duration,
    },
    /// The agent will not run again: its children that follow their parent must stop.
    EndedForGood,
    /// Freeze (or thaw) every process of the agent.
    Freeze(bool),
}

/// A process that started, and how it is held.
#[derive(Debug, Clone, Default)]
pub(crate) struct Launched {
    pub pid: i32,
    pub start_ticks: Option<u64>,
    pub containment: Containment,
    pub cgroup: Option<PathBuf>,
    pub limit_fallbacks: Vec<String>,
}

/// A stop under way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stop {
    pub step: Step,
    /// When the current step's grace period ends.
    pub deadline: Instant,
    pub reason: StopReason,
    pub started: Instant,
    /// The leader has not exited yet.
    pub leader_alive: bool,
    /// The run's end was decided before this stop began: it stops the remains of a run
    /// (members of its group that outlived the leader), so its end decides nothing.
    pub leftovers: bool,
}

/// Where an agent is in its lifecycle, with what that phase needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Phase {
    /// The record is written and the process is being started.
    Starting {
        restart: bool,
    },
    Running,
    /// Frozen since `since`: health checks wait, `max_runtime` keeps counting.
    Paused {
        since: Instant,
    },
    Stopping(Stop),
    /// The run ended; the restart policy starts it again at `due`. `lingering`: members of the
    /// last run's group may outlive its leader.
    BackingOff {
        due: Instant,
        lingering: bool,
    },
    Ended {
        lingering: bool,
    },
}

/// The clocks and counters of the current run.
#[derive(Debug, Clone, Copy)]
struct Run {
    started: Instant,
    last_heartbeat: Option<Instant>,
    /// Where heartbeat silence is counted from before the first heartbeat: the start, moved
    /// on by the time spent paused.
    quiet_since: Instant,
    max_runtime_at: Option<Instant>,
    /// When the first heartbeat must have come, until it has.
    startup_deadline: Option<Instant>,
    /// Consecutive samples over the CPU limit.
    cpu_samples_over: u32,
}

pub(crate) struct AgentMachine {
    record: AgentRecord,
    phase: Phase,
    run: Run,
    sample: Option<TreeSample>,
}

impl AgentMachine {
    /// A new agent whose record is about to be written and whose process is about to start.
    pub fn starting(mut record: AgentRecord, now: Now) -> AgentMachine {
        record.state = AgentState::Starting;
        AgentMachine {
            run: Run::new(&record, now.mono),
            record,
            phase: Phase::Starting { restart: false },
            sample: None,
        }
    }

    pub fn record(&self) -> &AgentRecord {
        &self.record
    }

    #[cfg(test)]
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Why it is being stopped, while it is.
    pub fn stop_reason(&self) -> Option<StopReason> {
        match self.phase {
            Phase::Stopping(stop) => Some(stop.reason),
            _ => None,
        }
    }

    /// The leader process exists (not yet reaped, or for an adopted agent, not yet exited).
    pub fn leader_alive(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::Paused { .. } => true,
            Phase::Stopping(stop) => stop.leader_alive,
            _ => false,
        }
    }

    /// Members of its process group may still run (the driver checks before relying on it).
    pub fn may_linger(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::Paused { .. } | Phase::Stopping(_) => true,
            Phase::BackingOff { lingering, .. } | Phase::Ended { lingering } => lingering,
            Phase::Starting { .. } => false,
        }
    }

    /// A stop under way whose leader is gone: the driver checks the group until it is gone,
    /// then answers with `group_gone`.
    pub fn watches_group(&self) -> bool {
        matches!(self.phase, Phase::Stopping(stop) if !stop.leader_alive)
    }

    /// Ended for good: it will not run again unless a client starts it.
    pub fn has_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended { .. })
    }

    /// The latest sample, while the leader lives.
    pub fn live_sample(&self) -> Option<&TreeSample> {
        self.sample.as_ref().filter(|_| self.leader_alive())
    }

    pub fn status(&self, now: Instant) -> AgentStatus {
        let alive = self.leader_alive();
        let running_for = alive.then(|| now.saturating_duration_since(self.run.started));
        AgentStatus::new(&self.record, alive, self.sample.as_ref(), running_for)
    }

    /// When [`AgentMachine::timeout`] must next be called.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Stopping(stop) => Some(stop.deadline),
            Phase::BackingOff { due, .. } => Some(due),
            Phase::Running => {
                let startup = self
                    .run
                    .startup_deadline
                    .filter(|_| self.run.last_heartbeat.is_none());
                match (self.run.max_runtime_at, startup) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
            Phase::Paused { .. } => self.run.max_runtime_at,
            Phase::Starting { .. } | Phase::Ended { .. } => None,
        }
    }

    /// The process started.
    pub fn started(&mut self, now: Now, launched: Launched, out: &mut Vec<Effect>) {
        let Phase::Starting { restart } = self.phase else {
            return;
        };
        let record = &mut self.record;
        record.state = AgentState::Running;
        record.pid = Some(launched.pid);
        record.start_ticks = launched.start_ticks;
        record.containment = launched.containment;
        record.cgroup = launched.cgroup;
        record.limit_fallbacks = launched.limit_fallbacks;
        record.started_at = Some(now.wall);
        record.ended_at = None;
        record.ran_for = None;
        record.exit = None;
        record.error = None;
        record.end_reason = EndReason::Unspecified;
        record.adopted = false;
        record.peak_memory_bytes = 0;
        record.cpu_seconds = 0.0;
        let message = if restart {
            record.restart_count += 1;
            record.last_heartbeat = None;
            record.health_issues.clear();
            record.forget_progress();
            format!("restart {}", record.restart_count)
        } else {
            String::new()
        };
        self.run = Run::new(&self.record, now.mono);
        self.phase = Phase::Running;
        self.sample = None;
        out.push(Effect::Persist);
        self.emit(out, EventKind::Spawned, message);
    }

    /// The process could not be started. A first start's failure ends the agent (the spawn
    /// fails); a restart's counts as a failed run.
    pub fn start_failed(&mut self, now: Now, error: String, out: &mut Vec<Effect>) {
        let Phase::Starting { restart } = self.phase else {
            return;
        };
        let record = &mut self.record;
        record.state = AgentState::Failed;
        record.end_reason = EndReason::StartFailed;
        record.error = Some(error.clone());
        record.started_at.get_or_insert(now.wall);
        record.ended_at = Some(now.wall);
        record.ran_for = Some(Duration::ZERO);
        record.exit = None;
        if restart {
            // The attempt counts: a restart that can never start must not back off forever.
            record.restart_count += 1;
        }
        out.push(Effect::Persist);
        out.push(Effect::RunEnded(EndReason::StartFailed));
        self.emit(out, EventKind::Failed, error);
        if restart {
            self.end_run(now, RunEnd::FailedToStart, false, out);
        } else {
            self.end_for_good(false, out);
        }
    }

    /// The leader exited: `exit` is how, when it could be learned. `group_alive`: other
    /// members of its process group (or cgroup) still run. `oom_killed`: the kernel's OOM
    /// killer killed a member of its cgroup during the run.
    pub fn leader_exited(
        &mut self,
        now: Now,
        exit: Option<Exit>,
        group_alive: bool,
        oom_killed: bool,
        out: &mut Vec<Effect>,
    ) {
        let stop = match self.phase {
            Phase::Running => None,
            Phase::Paused { .. } => {
                // What is left of the tree must be able to run, and be stopped.
                out.push(Effect::Freeze(false));
                None
            }
            Phase::Stopping(stop) if stop.leader_alive => Some(stop),
            _ => return,
        };
        self.sample = None;
        let lifecycle = &self.record.spec.lifecycle;
        let seconds = |limit: Option<Duration>| limit.map_or(0.0, |l| l.as_secs_f64());
        let exit_text = match exit {
            Some(Exit::Code(code)) => format!("exited with code {code}"),
            Some(Exit::Signal(signal)) => format!("killed by signal {signal}"),
            None => "exited; how could not be learned (it was not agentd's child)".to_string(),
        };
        let (state, kind, reason, error) = match stop.map(|stop| stop.reason) {
            Some(StopReason::MaxRuntime) => (
                AgentState::TimedOut,
                EventKind::TimedOut,
                EndReason::TimedOut,
                Some(format!(
                    "ran past its max_runtime of {}s",
                    seconds(lifecycle.max_runtime)
                )),
            ),
            Some(StopReason::StartupTimeout) => (
                AgentState::Failed,
                EventKind::Failed,
                EndReason::TimedOut,
                Some(format!(
                    "sent no first heartbeat within its startup_timeout of {}s",
                    seconds(lifecycle.startup_timeout)
                )),
            ),
            // The health check already recorded why in `error`.
            Some(StopReason::HealthRestart) => (
                AgentState::Failed,
                EventKind::Failed,
                EndReason::HealthAction,
                None,
            ),
            Some(reason @ (StopReason::Health | StopReason::Budget)) => (
                AgentState::Killed,
                EventKind::Killed,
                match reason {
                    StopReason::Budget => EndReason::Budget,
                    _ => EndReason::HealthAction,
                },
                None,
            ),
            Some(
                StopReason::Requested
                | StopReason::Shutdown
                | StopReason::ParentExited
                | StopReason::Restart,
            ) => (
                AgentState::Killed,
                EventKind::Killed,
                EndReason::Stopped,
                None,
            ),
            None if oom_killed && exit != Some(Exit::Code(0)) => (
                AgentState::Failed,
                EventKind::OomKilled,
                EndReason::OomKilled,
                Some(format!(
                    "{exit_text}: the kernel's OOM killer ended it at its memory limit{}",
                    self.record
                        .spec
                        .resources
                        .memory_max_mb
                        .map_or(String::new(), |mb| format!(" of {mb} MB"))
                )),
            ),
            None => match exit {
                Some(Exit::Code(0)) => (
                    AgentState::Completed,
                    EventKind::Exited,
                    EndReason::Exited,
                    None,
                ),
                Some(Exit::Code(_)) => (
                    AgentState::Failed,
                    EventKind::Failed,
                    EndReason::Exited,
                    Some(exit_text.clone()),
                ),
                Some(Exit::Signal(_)) => (
                    AgentState::Failed,
                    EventKind::Failed,
                    EndReason::Signaled,
                    Some(exit_text.clone()),
                ),
                None => (
                    AgentState::Lost,
                    EventKind::Lost,
                    EndReason::Lost,
                    Some(exit_text.clone()),
                ),
            },
        };
        let record = &mut self.record;
        record.state = state;
        record.end_reason = reason;
        record.exit = exit;
        record.ended_at = Some(now.wall);
        record.ran_for = Some(now.mono.saturating_duration_since(self.run.started));
        if error.is_some() {
            record.error = error;
        }
        out.push(Effect::Persist);
        out.push(Effect::RunEnded(reason));
        self.emit(out, kind, exit_text);
        match stop {
            Some(mut stop) if group_alive => {
                stop.leader_alive = false;
                self.phase = Phase::Stopping(stop);
            }
            Some(stop) => self.finish_stop(now, stop, out),
            None => self.end_run(now, RunEnd::Exited(exit), group_alive, out),
        }
    }

    /// No member of the process group is left.
    pub fn group_gone(&mut self, now: Now, out: &mut Vec<Effect>) {
        match &mut self.phase {
            Phase::Stopping(stop) if !stop.leader_alive => {
                let stop = *stop;
                self.finish_stop(now, stop, out);
            }
            Phase::BackingOff { lingering, .. } | Phase::Ended { lingering } => *lingering = false,
            _ => {}
        }
    }

    /// Starts stopping the agent, or joins the stop under way. Returns false when there is
    /// nothing to stop (it had ended and no member of its group is left).
    pub fn stop(
        &mut self,
        now: Now,
        force: bool,
        reason: StopReason,
        out: &mut Vec<Effect>,
    ) -> bool {
        let first = if force { Step::Kill } else { Step::FirstSignal };
        match self.phase {
            Phase::Starting { .. } | Phase::Ended { lingering: false } => false,
            Phase::Running | Phase::Paused { .. } => {
                if matches!(self.phase, Phase::Paused { .. }) {
                    // Thawed first, so that it can handle its stop signal.
                    out.push(Effect::Freeze(false));
                }
                self.record.state = AgentState::Stopping;
                out.push(Effect::Persist);
                let how = if force { "force" } else { "graceful" };
                self.emit(out, EventKind::Stopping, how.to_string());
                self.enter_step(now, Stop::new(now, reason, true, false), first, out);
                true
            }
            Phase::Stopping(mut stop) => {
                // A client's stop wins: the agent will not be started again.
                if reason.client_asked() {
                    stop.reason = reason;
                    self.phase = Phase::Stopping(stop);
                }
                if force && stop.step != Step::Kill {
                    self.enter_step(now, stop, Step::Kill, out);
                }
                true
            }
            Phase::BackingOff { lingering, .. } => {
                let record = &mut self.record;
                record.state = AgentState::Killed;
                record.end_reason = EndReason::Stopped;
                record.next_restart_at = None;
                out.push(Effect::Persist);
                self.emit(out, EventKind::Killed, "restart cancelled by a stop".into());
                self.end_for_good(lingering, out);
                if lingering {
                    self.stop_leftovers(now, reason, first, out);
                }
                lingering
            }
            Phase::Ended { lingering: true } => {
                self.stop_leftovers(now, reason, first, out);
                true
            }
        }
    }

    /// The deadline passed: escalate the ladder, start again, or enforce a runtime limit.
    pub fn timeout(&mut self, now: Now, out: &mut Vec<Effect>) {
        match self.phase {
            Phase::Stopping(stop) if now.mono >= stop.deadline => {
                let next = match stop.step {
                    Step::FirstSignal => Step::SecondSignal,
                    Step::SecondSignal | Step::Kill => Step::Kill,
                };
                self.enter_step(now, stop, next, out);
            }
            Phase::BackingOff { due, .. } if now.mono >= due => {
                // Not written: until the start's outcome is, the store's BACKING_OFF holds
                // (a crash meanwhile restarts it, or adopts what the keeper started).
                self.record.next_restart_at = None;
                self.record.state = AgentState::Starting;
                self.phase = Phase::Starting { restart: true };
                out.push(Effect::Launch);
            }
            Phase::Paused { .. } if self.run.max_runtime_at.is_some_and(|at| now.mono >= at) => {
                self.stop(now, false, StopReason::MaxRuntime, out);
            }
            Phase::Running => {
                let run = self.run;
                if run.max_runtime_at.is_some_and(|at| now.mono >= at) {
                    self.stop(now, false, StopReason::MaxRuntime, out);
                } else if run.last_heartbeat.is_none()
                    && run.startup_deadline.is_some_and(|at| now.mono >= at)
                {
                    self.stop(now, false, StopReason::StartupTimeout, out);
                }
            }
            _ => {}
        }
    }

    fn emit(&self, out: &mut Vec<Effect>, kind: EventKind, message: String) {
        out.push(Effect::Emit {
            kind,
            message,
            alert: None,
        });
    }

    /// Signals the step's signal and sets its deadline.
    fn enter_step(&mut self, now: Now, mut stop: Stop, step: Step, out: &mut Vec<Effect>) {
        let policy = self.record.spec.stop_policy;
        let (signal, wait) = match step {
            Step::FirstSignal => (policy.signal, policy.first_grace),
            Step::SecondSignal => (policy.signal, policy.second_grace),
            Step::Kill => (Signal::SIGKILL, KILL_RECHECK),
        };
        stop.step = step;
        stop.deadline = now.mono + wait;
        self.phase = Phase::Stopping(stop);
        out.push(Effect::Signal(signal));
    }

    /// Stops what is left of a run that already ended: members of its group.
    fn stop_leftovers(&mut self, now: Now, reason: StopReason, first: Step, out: &mut Vec<Effect>) {
        self.enter_step(now, Stop::new(now, reason, false, true), first, out);
    }

    fn finish_stop(&mut self, now: Now, stop: Stop, out: &mut Vec<Effect>) {
        let outcome = match stop.step {
            Step::FirstSignal => StopOutcome::ExitedOnFirstSignal,
            Step::SecondSignal => StopOutcome::Escalated,
            Step::Kill => StopOutcome::Killed,
        };
        if stop.leftovers {
            self.phase = Phase::Ended { lingering: false };
        } else {
            self.end_run(now, RunEnd::Stopped(stop.reason), false, out);
        }
        out.push(Effect::StopFinished {
            outcome,
            duration: now.mono.saturating_duration_since(stop.started),
        });
    }

    /// The run is over: start it again after a backoff if the policy wants, else it has ended
    /// for good.
    fn end_run(&mut self, now: Now, end: RunEnd, lingering: bool, out: &mut Vec<Effect>) {
        if matches!(end, RunEnd::Stopped(StopReason::Restart)) && !now.shutting_down {
            self.relaunch(out);
            return;
        }
        let policy = self.record.spec.lifecycle.clone();
        if now.shutting_down || !wants_restart(policy.restart, &end) {
            self.end_for_good(lingering, out);
            return;
        }
        let record = &mut self.record;
        if let Some(max) = policy.max_restarts
            && record.restart_count >= max
        {
            // One FAILED event per run: when the run that ends it all failed, its event
            // becomes the one that says so.
            let last_run = match out.last() {
                Some(Effect::Emit {
                    kind: EventKind::Failed,
                    message,
                    ..
                }) => {
                    let how = format!("failed: {message}");
                    out.pop();
                    how
                }
                _ => format!("ended {}", record.state_text()),
            };
            let message = format!("gave up after {max} restarts; the last run {last_run}");
            record.state = AgentState::Failed;
            record.error = Some(message.clone());
            out.push(Effect::Persist);
            self.emit(out, EventKind::Failed, message);
            self.end_for_good(lingering, out);
            return;
        }
        if record
            .ran_for
            .is_some_and(|ran| ran >= policy.backoff.reset_after)
        {
            record.backoff_step = 0;
        }
        let delay = policy.backoff.jittered(record.backoff_step, now.jitter);
        record.backoff_step += 1;
        record.last_exit = record.exit;
        record.state = AgentState::BackingOff;
        record.next_restart_at = Some(now.wall + delay);
        self.phase = Phase::BackingOff {
            due: now.mono + delay,
            lingering,
        };
        let message = format!(
            "restarting in {:.2}s (restart {}{})",
            delay.as_secs_f64(),
            record.restart_count + 1,
            policy
                .max_restarts
                .map_or(String::new(), |max| format!(" of {max}"))
        );
        out.push(Effect::Persist);
        self.emit(out, EventKind::Restarting, message);
    }

    /// Starts the agent again now, without a backoff: a restart a client asked for.
    fn relaunch(&mut self, out: &mut Vec<Effect>) {
        let record = &mut self.record;
        if record.state != AgentState::BackingOff {
            record.last_exit = record.exit;
        }
        record.next_restart_at = None;
        record.backoff_step = 0;
        record.state = AgentState::Starting;
        self.phase = Phase::Starting { restart: true };
        out.push(Effect::Persist);
        self.emit(out, EventKind::Restarting, "restart requested".into());
        out.push(Effect::Launch);
    }

    fn end_for_good(&mut self, lingering: bool, out: &mut Vec<Effect>) {
        self.phase = Phase::Ended { lingering };
        out.push(Effect::EndedForGood);
    }
}

impl Stop {
    fn new(now: Now, reason: StopReason, leader_alive: bool, leftovers: bool) -> Stop {
        Stop {
            step: Step::FirstSignal,
            deadline: now.mono,
            reason,
            started: now.mono,
            leader_alive,
            leftovers,
        }
    }
}

impl Run {
    /// A run that started at `started`, with the limits of the agent's policy.
    fn new(record: &AgentRecord, started: Instant) -> Run {
        let lifecycle = &record.spec.lifecycle;
        Run {
            started,
            last_heartbeat: None,
            quiet_since: started,
            max_runtime_at: lifecycle.max_runtime.map(|limit| started + limit),
            startup_deadline: lifecycle.startup_timeout.map(|limit| started + limit),
            cpu_samples_over: 0,
        }
    }
}

mod control;
mod health;
mod recovered;

pub(crate) use recovered::Recovered;

#[cfg(test)]
mod tests;
