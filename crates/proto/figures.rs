//! `EVENT_VIEW_FIGURES`: the fields of an `AgentStatus` that a table of agents shows, in one
//! place for the daemon, which cuts a HEALTH sample's status down to them, and for the
//! clients, which lay them over the status they hold.

use crate::v1::AgentStatus;

/// The same fields, as proto3 JSON names them (the daemon's JSON writes every field, default
/// or not, so `/v1/events` keeps only these).
pub const FIGURES_JSON: [&str; 21] = [
    "agentId",
    "state",
    "processAlive",
    "processStatus",
    "cpuPercent",
    "memoryMb",
    "peakMemoryMb",
    "cpuSeconds",
    "runtimeSeconds",
    "numThreads",
    "numProcesses",
    "health",
    "healthReason",
    "progress",
    "progressMessage",
    "egress",
    "denials",
    "spend",
    "treeSpend",
    "budget",
    "budgetReached",
];

impl AgentStatus {
    /// Only the figures; every other field at its default.
    pub fn figures(mut self) -> AgentStatus {
        AgentStatus {
            agent_id: std::mem::take(&mut self.agent_id),
            ..AgentStatus::default().with_figures(self)
        }
    }

    /// This status with the figures of `figures` laid over it.
    pub fn with_figures(self, figures: AgentStatus) -> AgentStatus {
        AgentStatus {
            state: figures.state,
            process_alive: figures.process_alive,
            process_status: figures.process_status,
            cpu_percent: figures.cpu_percent,
            memory_mb: figures.memory_mb,
            peak_memory_mb: figures.peak_memory_mb,
            cpu_seconds: figures.cpu_seconds,
            runtime_seconds: figures.runtime_seconds,
            num_threads: figures.num_threads,
            num_processes: figures.num_processes,
            health: figures.health,
            health_reason: figures.health_reason,
            progress: figures.progress,
            progress_message: figures.progress_message,
            egress: figures.egress,
            denials: figures.denials,
            spend: figures.spend,
            tree_spend: figures.tree_spend,
            budget: figures.budget,
            budget_reached: figures.budget_reached,
            ..self
        }
    }
}
