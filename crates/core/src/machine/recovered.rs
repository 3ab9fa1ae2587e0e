//! A machine rebuilt from a stored record after agentd restarted, as recovery (`recover.rs`)
//! found its process: adopted and running, exited while agentd was away, gone, or as stored.

use std::time::{Duration, SystemTime};

use crate::agent::AgentRecord;
use crate::events::EventKind;
use crate::lifecycle::RunEnd;
use crate::state::{AgentState, EndReason, Exit, StopReason};

use super::{AgentMachine, Effect, Now, Phase, Run, Stop};

/// How recovery found an agent that an earlier daemon left.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Recovered {
    /// Its process still runs, and has for this long.
    Running { ran_for: Duration },
    /// Its process ended while agentd was away, and how is known; so is how long it ran,
    /// when the keeper saw it start.
    Exited {
        exit: Exit,
        ran_for: Option<Duration>,
        at: SystemTime,
    },
    /// Its process is gone, and how it ended cannot be learned.
    Gone,
    /// It had ended, or was waiting to start again: it goes on as stored.
    AsStored,
}

impl AgentMachine {
    /// An agent loaded from the store, as recovery found it.
    pub fn recovered(
        record: AgentRecord,
        how: Recovered,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> AgentMachine {
        let was_stopping = record.state == AgentState::Stopping;
        let phase = match record.state {
            AgentState::BackingOff => {
                let max = record.spec.lifecycle.backoff.max;
                let wait = record
                    .next_restart_at
                    .and_then(|due| due.duration_since(now.wall).ok())
                    .unwrap_or_default()
                    .min(max);
                Phase::BackingOff {
                    due: now.mono + wait,
                    lingering: false,
                }
            }
            _ => Phase::Ended { lingering: false },
        };
        let mut machine = AgentMachine {
            run: Run::new(&record, now.mono),
            record,
            phase,
            sample: None,
        };
        match how {
            Recovered::AsStored => {}
            Recovered::Running { ran_for } => {
                let started = now.mono.checked_sub(ran_for).unwrap_or(now.mono);
                machine.run = Run::new(&machine.record, started);
                // How long ago the last heartbeat came is wall time across a restart: the
                // silence is counted afresh from the adoption instead.
                if machine.record.last_heartbeat.is_some() {
                    machine.run.last_heartbeat = Some(now.mono);
                }
                // A frozen agent stays frozen across a restart of agentd.
                if machine.record.state == AgentState::Paused {
                    machine.phase = Phase::Paused { since: now.mono };
                } else {
                    machine.phase = Phase::Running;
                    machine.record.state = AgentState::Running;
                }
                machine.record.adopted = true;
                out.push(Effect::Persist);
                machine.emit(out, EventKind::Adopted, String::new());
                if was_stopping {
                    // A stop was under way when the earlier daemon went away: carry it out.
                    machine.stop(now, false, StopReason::Requested, out);
                }
            }
            Recovered::Exited { exit, ran_for, at } => {
                let started = ran_for.and_then(|ran| now.mono.checked_sub(ran));
                machine.run = Run::new(&machine.record, started.unwrap_or(now.mono));
                machine.phase = if was_stopping {
                    Phase::Stopping(Stop::new(now, StopReason::Requested, true, false))
                } else {
                    Phase::Running
                };
                // It ended when the keeper reaped it, not now.
                let then = Now { wall: at, ..now };
                machine.leader_exited(then, Some(exit), false, false, out);
            }
            Recovered::Gone => {
                let record = &mut machine.record;
                let message = "the process was gone when agentd restarted, and how it ended \
                               could not be learned";
                record.state = AgentState::Lost;
                record.end_reason = EndReason::Lost;
                record.ended_at = Some(now.wall);
                record.error = Some(message.to_string());
                out.push(Effect::Persist);
                out.push(Effect::RunEnded(EndReason::Lost));
                machine.emit(out, EventKind::Lost, message.to_string());
                machine.end_run(now, RunEnd::Lost, false, out);
            }
        }
        machine
    }
}
