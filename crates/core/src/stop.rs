//! The words of a stop: what a client asks for, why agentd stops an agent, the ladder's
//! steps and how a stop ended. The ladder itself (the stop signal to the whole process group,
//! a grace period, the signal again, a second grace period, then SIGKILL, ending the moment
//! the whole group is gone) runs in `machine.rs`.

use std::time::Duration;

use crate::agent::AgentStatus;

/// How a client's stop behaves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopOptions {
    /// SIGKILL at once instead of the ladder.
    pub force: bool,
    /// Also stop every descendant agent, children first.
    pub cascade: bool,
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

impl StopOutcome {
    /// How a trace names it.
    pub fn name(self) -> &'static str {
        match self {
            StopOutcome::ExitedOnFirstSignal => "exited on first signal",
            StopOutcome::Escalated => "escalated",
            StopOutcome::Killed => "killed",
            StopOutcome::AlreadyExited => "already exited",
        }
    }
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
