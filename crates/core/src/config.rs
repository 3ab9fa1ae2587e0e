//! How the supervisor is configured: its data folder, sampling, event and agent retention,
//! capacity, and what it does with its agents when it shuts down.

use std::path::PathBuf;
use std::time::Duration;

use crate::cgroup::CgroupSetting;
use crate::events::EventRetention;
use crate::logs::LogRotation;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Holds the store (`store/`) and one folder per agent (`agents/ID/`).
    pub data_dir: PathBuf,
    pub sample_interval: Duration,
    /// How far back each agent's samples are kept in memory; zero keeps none.
    pub history: Duration,
    /// Events a subscriber may fall behind by before it is told it lagged. A sampling round
    /// sends one HEALTH event per live agent at once, before any watcher runs: the ring must
    /// hold a round of the whole fleet. A slot costs about 40 bytes; an event is released as
    /// soon as every watcher has read it.
    pub event_buffer: usize,
    pub event_retention: EventRetention,
    pub limits: Limits,
    pub log_rotation: LogRotation,
    /// How long, and how many, agents that ended for good are kept before they are removed.
    pub finished_retention: FinishedRetention,
    /// Whether agents get cgroups, and where.
    pub cgroups: CgroupSetting,
    /// Variables of agentd's environment passed on to every agent, beyond `PATH`, the
    /// locale and `TZ` (agents never get the rest of it).
    pub pass_env: Vec<String>,
    /// The users (names or uids) agents may run as. Empty: any user but root; root, uid 0
    /// or group 0 only when listed here.
    pub allow_users: Vec<String>,
    /// What to do with a store that cannot be trusted; `None` refuses to start.
    pub recover_store: Option<StoreRecovery>,
    pub sandbox: SandboxConfig,
    /// The LLM gateway agents get variables for (`--llm-providers`), if it runs.
    pub gateway: Option<crate::spend::GatewayEnv>,
}

/// Sandboxes, daemon-wide.
#[derive(Debug, Clone, Default)]
pub struct SandboxConfig {
    /// `--default-sandbox`: every agent that names no sandbox gets the default one.
    pub default_on: bool,
    /// `--egress-resolve NAME=ADDR`: names the proxies answer without DNS, and may reach
    /// even on loopback or a private network.
    pub egress_resolve: Vec<String>,
    /// What no agent may be given besides the data folder: agentd's sockets elsewhere.
    pub private: Vec<PathBuf>,
}

/// How to start on a store that cannot be trusted (unreadable, empty while agents exist,
/// rolled back). Acts only on such a store: a trusted one is used as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRecovery {
    /// Move the store aside and rebuild each agent's record from its folder's spec and the
    /// keeper, adopting the agents that run.
    Rebuild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedRetention {
    pub max_count: usize,
    pub max_age: Duration,
}

impl Default for FinishedRetention {
    fn default() -> Self {
        FinishedRetention {
            max_count: 1000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What the daemon allows and how it leaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The total declared load (`load_percentage`) the host takes.
    pub capacity: f64,
    /// Agents that may be starting, running, stopping or backing off at once.
    pub max_agents: Option<usize>,
    pub on_shutdown: ShutdownPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity: 100.0,
            max_agents: None,
            on_shutdown: ShutdownPolicy::Stop,
        }
    }
}

/// What a daemon that is asked to shut down does with its agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownPolicy {
    /// Stop every agent with its ladder, all at once.
    #[default]
    Stop,
    /// Leave them running; the next agentd adopts them.
    Detach,
}

impl SupervisorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        SupervisorConfig {
            data_dir,
            sample_interval: Duration::from_secs(1),
            history: Duration::from_secs(600),
            event_buffer: 65_536,
            event_retention: EventRetention::default(),
            limits: Limits::default(),
            log_rotation: LogRotation::default(),
            finished_retention: FinishedRetention::default(),
            cgroups: CgroupSetting::default(),
            pass_env: Vec::new(),
            allow_users: Vec::new(),
            recover_store: None,
            sandbox: SandboxConfig::default(),
            gateway: None,
        }
    }
}
