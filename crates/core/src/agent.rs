//! One agent as the supervisor keeps it: the stored [`AgentRecord`] (spec, state, pid,
//! times, exit) and the [`AgentStatus`] view that answers status calls and rides on events.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::egress::EgressCounts;
use crate::health::{HealthIssue, HealthMetric};
use crate::spec::AgentSpec;
use crate::spend::{Spend, Usage};
use crate::state::{AgentState, Containment, EndReason, Exit, Health, Hold, TreeSample};

/// Everything stored about an agent. Field changes need a new record version in `store`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub spec: Arc<AgentSpec>,
    pub state: AgentState,
    pub agent_dir: PathBuf,
    /// Leader pid, which is also the process group id.
    pub pid: Option<i32>,
    /// The leader's start time in clock ticks since boot (`/proc/PID/stat`), so that after a
    /// daemon restart a reused pid is never mistaken for the agent.
    pub start_ticks: Option<u64>,
    pub started_at: Option<SystemTime>,
    pub ended_at: Option<SystemTime>,
    /// `None` while running, and after an exit this daemon could not observe (adopted agent).
    pub exit: Option<Exit>,
    pub error: Option<String>,
    pub progress: f64,
    pub progress_message: String,
    /// Started by an earlier daemon and adopted by this one: its exit status cannot be seen.
    pub adopted: bool,
    #[serde(default)]
    pub progress_details: BTreeMap<String, String>,
    #[serde(default)]
    pub last_heartbeat: Option<SystemTime>,
    /// Failed health checks that still hold.
    #[serde(default)]
    pub health_issues: Vec<HealthIssue>,
    /// Times the restart policy started it again.
    #[serde(default)]
    pub restart_count: u32,
    /// The most resident memory the current (or last) run's processes held in a sample.
    #[serde(default)]
    pub peak_memory_bytes: u64,
    /// CPU time the current (or last) run's processes used, so an ended run still says
    /// what it cost.
    #[serde(default)]
    pub cpu_seconds: f64,
    /// How the run before the current one (or the pending restart) ended.
    #[serde(default)]
    pub last_exit: Option<Exit>,
    #[serde(default)]
    pub next_restart_at: Option<SystemTime>,
    /// Consecutive short runs, which set the next backoff.
    #[serde(default)]
    pub backoff_step: u32,
    /// Why the current (or last) run ended.
    #[serde(default)]
    pub end_reason: EndReason,
    /// How long the last run lasted, measured on the monotonic clock.
    #[serde(default)]
    pub ran_for: Option<Duration>,
    /// How its processes are held.
    #[serde(default)]
    pub containment: Containment,
    /// Its cgroup, relative to each hierarchy's mount point.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Limits enforced without a cgroup, and how.
    #[serde(default)]
    pub limit_fallbacks: Vec<String>,
    /// A `PROXY` agent's connections through its proxy, in all its runs.
    #[serde(default)]
    pub egress: EgressCounts,
    /// What the kernel refused a sandboxed agent, in all its runs.
    #[serde(default)]
    pub denials: SandboxDenials,
    /// What it spent through the LLM gateway, in all its runs.
    #[serde(default)]
    pub spend: Spend,
    /// What it and its descendants spent, against its budget.
    #[serde(default)]
    pub tree_spend: Usage,
    /// The running totals its status file last reported, per model, and the run they are of
    /// (its restart count): what they grow by is counted.
    #[serde(default)]
    pub status_usage: (u32, BTreeMap<String, Usage>),
    /// The budget limit reached, while it stays reached (acted on once).
    #[serde(default)]
    pub budget_reached: Option<String>,
    /// Its key to the LLM gateway (`spend.rs`), made at spawn when agentd has providers.
    /// Never shown.
    #[serde(default)]
    pub gateway_key: Option<String>,
}

/// What the kernel's audit records said a sandboxed agent was refused (`audit.rs`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDenials {
    /// Landlock: files (and sockets and scopes where the kernel confines them).
    pub files: u64,
    /// seccomp: system calls.
    pub syscalls: u64,
}

impl AgentRecord {
    /// A new run starts with no progress: the last run's would read as this one's.
    pub(crate) fn forget_progress(&mut self) {
        self.progress = 0.0;
        self.progress_message.clear();
        self.progress_details.clear();
    }

    /// The record of an agent about to start for the first time.
    pub(crate) fn new(spec: Arc<AgentSpec>, agent_dir: PathBuf, now: SystemTime) -> AgentRecord {
        AgentRecord {
            spec,
            state: AgentState::Starting,
            agent_dir,
            pid: None,
            start_ticks: None,
            started_at: Some(now),
            ended_at: None,
            exit: None,
            error: None,
            progress: 0.0,
            progress_message: String::new(),
            adopted: false,
            progress_details: BTreeMap::new(),
            last_heartbeat: None,
            health_issues: Vec::new(),
            restart_count: 0,
            peak_memory_bytes: 0,
            cpu_seconds: 0.0,
            last_exit: None,
            next_restart_at: None,
            backoff_step: 0,
            end_reason: EndReason::Unspecified,
            ran_for: None,
            containment: Containment::ProcessGroup,
            cgroup: None,
            limit_fallbacks: Vec::new(),
            egress: EgressCounts::default(),
            denials: SandboxDenials::default(),
            spend: Spend::default(),
            tree_spend: Usage::default(),
            status_usage: (0, BTreeMap::new()),
            budget_reached: None,
            gateway_key: None,
        }
    }

    /// How its processes are held, for signals and probes; `None` before its first start.
    pub(crate) fn hold(&self) -> Option<Hold<'_>> {
        Some(Hold {
            pgid: self.pid?,
            cgroup: self.cgroup.as_deref(),
        })
    }

    /// How the current run ended, for messages.
    pub fn state_text(&self) -> String {
        match self.exit {
            Some(Exit::Code(code)) => format!("with code {code}"),
            Some(Exit::Signal(signal)) => format!("by signal {signal}"),
            None => format!("{:?}", self.state).to_lowercase(),
        }
    }
}

/// An agent's status at one moment: its record plus the latest health sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    pub record: AgentRecord,
    /// The leader process exists (not yet reaped).
    pub process_alive: bool,
    pub process_status: String,
    pub is_zombie: bool,
    pub cpu_percent: f64,
    pub memory_mb: f64,
    pub num_threads: u32,
    pub num_processes: u32,
    pub runtime: Duration,
    pub health: Health,
}

/// What the status says of an agent's health, from its record and whether its leader is a
/// zombie.
pub(crate) fn health(record: &AgentRecord, is_zombie: bool) -> Health {
    match record.state {
        AgentState::Starting => Health::Unknown,
        AgentState::Paused => Health::Healthy,
        AgentState::Running | AgentState::Stopping if is_zombie => Health::Zombie,
        AgentState::Running | AgentState::Stopping
            if record
                .health_issues
                .iter()
                .any(|issue| issue.metric == HealthMetric::Heartbeat) =>
        {
            Health::Stalled
        }
        AgentState::Running | AgentState::Stopping if !record.health_issues.is_empty() => {
            Health::OverLimit
        }
        AgentState::Running | AgentState::Stopping => Health::Healthy,
        AgentState::Completed => Health::Completed,
        AgentState::Killed => Health::Stopped,
        AgentState::Failed | AgentState::TimedOut => Health::Failed,
        AgentState::Lost => Health::Unknown,
        AgentState::BackingOff => match record.exit {
            Some(Exit::Code(0)) => Health::Completed,
            _ => Health::Failed,
        },
    }
}

impl AgentStatus {
    /// `running_for`: how long the current run has lasted on the monotonic clock, while it
    /// runs; once it ended, the record's `ran_for` is shown.
    pub(crate) fn new(
        record: &AgentRecord,
        alive: bool,
        sample: Option<&TreeSample>,
        running_for: Option<Duration>,
    ) -> Self {
        let sample = sample.filter(|_| alive);
        let is_zombie = sample.is_some_and(|s| s.leader_status == "zombie");
        let process_status = match (alive, sample, record.state) {
            (true, Some(sample), _) => sample.leader_status.to_string(),
            (true, None, _) => "running".to_string(),
            (false, _, AgentState::Starting | AgentState::Lost) => "unknown".to_string(),
            (false, _, _) => "exited".to_string(),
        };
        let health = health(record, is_zombie);
        let runtime = running_for.or(record.ran_for).unwrap_or_else(|| {
            // A record from before `ran_for` was kept: wall time is all there is.
            let end = record.ended_at.unwrap_or_else(SystemTime::now);
            record
                .started_at
                .and_then(|start| end.duration_since(start).ok())
                .unwrap_or_default()
        });
        AgentStatus {
            record: record.clone(),
            process_alive: alive,
            process_status,
            is_zombie,
            cpu_percent: sample.map_or(0.0, |s| s.cpu_percent),
            memory_mb: sample.map_or(0.0, |s| s.memory_bytes as f64 / (1024.0 * 1024.0)),
            num_threads: sample.map_or(0, |s| s.num_threads),
            num_processes: sample.map_or(0, |s| s.num_processes),
            runtime,
            health,
        }
    }

    pub fn agent_id(&self) -> &str {
        &self.record.spec.agent_id
    }
}
