//! The types every layer shares, and nothing else: an agent's state, how its run ended and
//! why it is being stopped, its health, how its processes are held, and one sample of its
//! tree. A leaf: it imports nothing of the crate, so the stored record, the errors, the
//! policies and the OS seam can all name these without importing each other.

use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    Starting,
    Running,
    Stopping,
    Completed,
    Failed,
    /// Ended because a stop was requested, whatever its exit code.
    Killed,
    /// agentd restarted and the process was gone.
    Lost,
    /// Ended; the restart policy starts it again at `next_restart_at`.
    BackingOff,
    /// Ran past its `max_runtime` and was stopped.
    TimedOut,
    /// Frozen by a Pause until a Resume.
    Paused,
}

/// As the API names it, without its prefix: `RUNNING`, `BACKING_OFF`.
impl std::fmt::Display for AgentState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentState::Starting => "STARTING",
            AgentState::Running => "RUNNING",
            AgentState::Stopping => "STOPPING",
            AgentState::Completed => "COMPLETED",
            AgentState::Failed => "FAILED",
            AgentState::Killed => "KILLED",
            AgentState::Lost => "LOST",
            AgentState::BackingOff => "BACKING_OFF",
            AgentState::TimedOut => "TIMED_OUT",
            AgentState::Paused => "PAUSED",
        })
    }
}

impl AgentState {
    /// How many states there are (counts by state are arrays this long).
    pub const COUNT: usize = AgentState::Paused as usize + 1;

    /// The process may still exist.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            AgentState::Starting | AgentState::Running | AgentState::Stopping | AgentState::Paused
        )
    }

    /// Its declared load counts against the daemon's capacity: live, or coming back.
    pub fn holds_capacity(self) -> bool {
        self.is_live() || self == AgentState::BackingOff
    }
}

/// Why an agent's run ended, in one place; the state keeps its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Still running (or never started).
    #[default]
    Unspecified,
    /// Exited on its own with a known exit code.
    Exited,
    /// Killed by a signal agentd did not send.
    Signaled,
    /// A stop a client, a shutdown or its parent asked for.
    Stopped,
    /// Ran past its `max_runtime`, or sent no first heartbeat within its `startup_timeout`.
    TimedOut,
    /// Stopped by the action of a failed health check.
    HealthAction,
    /// The process could not be started.
    StartFailed,
    /// Killed by the kernel for running out of memory (set by containment).
    OomKilled,
    /// Gone, and how it ended could not be learned.
    Lost,
    /// Stopped at its budget, or an ancestor's (on_limit stop).
    Budget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Zombie,
    Completed,
    Failed,
    Unknown,
    /// Alive, but no heartbeat within the timeout.
    Stalled,
    /// Alive, but over a memory or CPU threshold.
    OverLimit,
    /// Ended because a stop was asked for.
    Stopped,
}

/// How the leader process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// The shell's view: the code, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(code) => code,
            Exit::Signal(signal) => 128 + signal,
        }
    }

    pub fn signal(self) -> Option<i32> {
        match self {
            Exit::Code(_) => None,
            Exit::Signal(signal) => Some(signal),
        }
    }
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
    /// A client asked for a restart: the run is started again as soon as it has ended.
    Restart,
    /// Its budget, or an ancestor's, was reached and says stop.
    Budget,
}

impl StopReason {
    pub fn client_asked(self) -> bool {
        matches!(self, StopReason::Requested | StopReason::Shutdown)
    }

    /// How a trace names it.
    pub fn name(self) -> &'static str {
        match self {
            StopReason::Requested => "requested",
            StopReason::Shutdown => "shutdown",
            StopReason::ParentExited => "parent exited",
            StopReason::Health => "health",
            StopReason::HealthRestart => "health restart",
            StopReason::MaxRuntime => "max runtime",
            StopReason::StartupTimeout => "startup timeout",
            StopReason::Restart => "restart",
            StopReason::Budget => "budget",
        }
    }
}

/// How an agent's processes are held together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Containment {
    /// Its own process group; limits through `setrlimit`.
    #[default]
    ProcessGroup,
    /// A cgroup in a pure v2 hierarchy.
    CgroupV2,
    /// A cgroup in the v2 hierarchy for membership, and v1 controllers for limits.
    CgroupHybrid,
}

/// How an agent's processes are held together: the leader's process group, and the
/// agent's cgroup when it has one (then the cgroup is the truth about membership).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hold<'a> {
    pub pgid: i32,
    pub cgroup: Option<&'a Path>,
}

/// One measurement of an agent's process tree: the leader, its descendants, and orphans of
/// its process group that were reparented to agentd.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeSample {
    /// The leader's state, as psutil names it.
    pub leader_status: &'static str,
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub num_threads: u32,
    pub num_processes: u32,
    /// CPU time the run's processes have used so far, in seconds: its cgroup's counter, or
    /// what the tree's members were seen to use.
    pub cpu_seconds: f64,
}
