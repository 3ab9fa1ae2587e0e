//! The agentd supervisor: starts agent processes, samples their health, stops them with a
//! signal ladder, reaps every child, keeps each agent's record in sled and publishes
//! lifecycle and health events.
//!
//! Nothing here knows gRPC. [`Supervisor::start`] spawns the one task that owns the agent
//! table; everything else talks to it through a cloneable [`SupervisorHandle`].

mod agent;
mod agent_dir;
mod audit;
mod cgroup;
mod clock;
mod config;
mod confine;
mod egress;
mod error;
mod events;
mod files;
mod handle;
mod health;
mod history;
mod keeper;
mod launch;
mod lifecycle;
mod logs;
mod machine;
mod netns;
mod os;
mod process;
#[cfg(test)]
mod proptests;
mod rebuild;
mod recorder;
mod recover;
mod sampler;
mod sandbox;
mod spec;
mod spend;
mod state;
mod stop;
mod store;
mod supervisor;
mod table;
mod trace;
mod trust;

pub use agent::{AgentRecord, AgentStatus};
pub use cgroup::CgroupSetting;
pub use config::{
    FinishedRetention, Limits as DaemonLimits, SandboxConfig, ShutdownPolicy, StoreRecovery,
    SupervisorConfig,
};
pub use error::{Error, Result};
pub use events::{
    DeniedConnection, Event, EventFilter, EventKind, EventRetention, Format as EventFormat, Replay,
    Samples, Subscription,
};
pub use files::check_folder;
pub use handle::{
    AgentHistory, HealthReport, ListFilter, ListPage, ReapReport, StopTarget, Summary,
    SupervisorHandle, Watch,
};
pub use health::{Alert, HealthAction, HealthIssue, HealthMetric, HealthPolicy, ProgressReport};
pub use history::HistoryPoint;
pub use keeper::{KEEPER_ARG, KEEPER_DIR_VAR, run_keeper};
pub use lifecycle::{Backoff, LifecyclePolicy, ParentExit, RestartPolicy};
pub use logs::{FolderWatch, LogError, LogFile, LogRotation, LogStream};
pub use recorder::Recorder;
pub use sandbox::{Network, Sandbox, SandboxRequest, SandboxSupport};
pub use spec::{AgentSpec, Limits, Resources, RunAs, SpawnRequest, StopPolicy};
pub use spend::{
    Budget, Exhausted, GatewayEnv, GatewayKeys, InNamespace, Ledger, OnLimit, Reserve, Spend,
    Spending, Usage,
};
pub use state::{AgentState, Containment, EndReason, Exit, Health};
pub use stop::{StopOptions, StopOutcome, StopReport};
pub use supervisor::Supervisor;
pub use trace::TARGET as TRACE_TARGET;
