//! What a client asks of a machine besides a stop: pause, resume, restart and a new
//! sandbox; and the proxy's counts.

use std::sync::Arc;

use crate::agent::SandboxDenials;
use crate::egress::EgressCounts;
use crate::events::EventKind;
use crate::spec::AgentSpec;
use crate::state::{AgentState, StopReason};

use super::{AgentMachine, Effect, Now, Phase};

impl AgentMachine {
    /// Its proxy's counts, as they stand (written with the record's next change).
    pub fn set_egress(&mut self, counts: EgressCounts) {
        self.record.egress = counts;
    }

    /// What the kernel refused it, to count one more (written with the record's next change).
    pub fn spend_mut(&mut self) -> &mut crate::spend::Spend {
        &mut self.record.spend
    }

    pub fn tree_spend_mut(&mut self) -> &mut crate::spend::Usage {
        &mut self.record.tree_spend
    }

    pub fn status_usage_mut(
        &mut self,
    ) -> &mut (u32, std::collections::BTreeMap<String, crate::spend::Usage>) {
        &mut self.record.status_usage
    }

    pub fn budget_reached_mut(&mut self) -> &mut Option<String> {
        &mut self.record.budget_reached
    }

    pub fn denials_mut(&mut self) -> &mut SandboxDenials {
        &mut self.record.denials
    }

    /// Its spec with a new sandbox (UpdateSandbox).
    pub fn set_spec(&mut self, spec: Arc<AgentSpec>, out: &mut Vec<Effect>) {
        self.record.spec = spec;
        out.push(Effect::Persist);
    }

    /// Freezes a running agent. `Err` with its state when it is not running; pausing a
    /// paused agent changes nothing.
    pub fn pause(&mut self, now: Now, out: &mut Vec<Effect>) -> Result<(), AgentState> {
        match self.phase {
            Phase::Paused { .. } => Ok(()),
            Phase::Running => {
                self.phase = Phase::Paused { since: now.mono };
                self.record.state = AgentState::Paused;
                out.push(Effect::Freeze(true));
                out.push(Effect::Persist);
                self.emit(out, EventKind::Paused, String::new());
                Ok(())
            }
            _ => Err(self.record.state),
        }
    }

    /// Thaws a paused agent; heartbeat silence is counted as if the pause had not happened.
    /// Resuming a running agent changes nothing.
    pub fn resume(&mut self, now: Now, out: &mut Vec<Effect>) -> Result<(), AgentState> {
        match self.phase {
            Phase::Running => Ok(()),
            Phase::Paused { since } => {
                let paused = now.mono.saturating_duration_since(since);
                let run = &mut self.run;
                run.last_heartbeat = run.last_heartbeat.map(|at| at + paused);
                run.quiet_since += paused;
                run.startup_deadline = run.startup_deadline.map(|at| at + paused);
                self.phase = Phase::Running;
                self.record.state = AgentState::Running;
                out.push(Effect::Freeze(false));
                out.push(Effect::Persist);
                self.emit(
                    out,
                    EventKind::Resumed,
                    format!("after {:.1}s paused", paused.as_secs_f64()),
                );
                Ok(())
            }
            _ => Err(self.record.state),
        }
    }

    /// A client asked for a restart: a running agent goes down its stop ladder and comes
    /// up again as soon as it has ended; a restart pending in backoff happens now; an agent
    /// that ended starts again. Says why not when it cannot be restarted now.
    pub fn restart(&mut self, now: Now, out: &mut Vec<Effect>) -> Result<(), &'static str> {
        if let Some(why) = self.restart_blocked() {
            return Err(why);
        }
        match self.phase {
            Phase::Running | Phase::Paused { .. } => {
                self.stop(now, false, StopReason::Restart, out);
            }
            Phase::Stopping(mut stop) => {
                stop.reason = StopReason::Restart;
                self.phase = Phase::Stopping(stop);
            }
            _ => self.relaunch(out),
        }
        Ok(())
    }

    /// Why a restart cannot be asked for now, if it cannot.
    pub fn restart_blocked(&self) -> Option<&'static str> {
        match self.phase {
            Phase::Starting { .. } => Some("it is starting"),
            Phase::Stopping(stop) if stop.leftovers => {
                Some("processes of its last run are still being stopped")
            }
            Phase::Ended { lingering: true } => {
                Some("processes of its last run are still running; stop them first")
            }
            _ => None,
        }
    }
}
