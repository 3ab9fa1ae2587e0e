//! The supervisor's errors: one variant per real cause, so the server can map each to the
//! right gRPC status without reading messages.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field can never be accepted as written.
    #[error("invalid `{field}`: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
    /// The request is valid, but this host (or agentd's privileges) cannot carry it out.
    #[error("`{field}` cannot be enforced here: {problem}")]
    Unsupported {
        field: &'static str,
        problem: String,
    },
    /// History was asked for, but the daemon keeps none (`--history 0`).
    #[error("agentd keeps no samples: it was started with `--history 0`")]
    HistoryOff,
    #[error("no agent `{id}`")]
    NotFound { id: String },
    /// The agent exists but its process has ended.
    #[error("agent `{id}` is not running (it is {state})")]
    NotRunning {
        id: String,
        state: crate::state::AgentState,
    },
    /// A spawn names a parent that is no agent (and not an `@coordinator`).
    #[error(
        "spawning agent `{id}`: parent agent `{parent}` does not exist (name an external \
         coordinator as `@{parent}`)"
    )]
    UnknownParent { id: String, parent: String },
    #[error("at capacity: {count} agents are running or coming back, the limit is {max}")]
    TooManyAgents { max: usize, count: usize },
    #[error(
        "at capacity: the agents' declared load is {used}% of {capacity}%, {requested}% more \
         does not fit"
    )]
    OverCapacity {
        requested: f64,
        used: f64,
        capacity: f64,
    },
    /// Remove needs an agent that has ended for good.
    #[error("agent `{id}` has not ended for good (it is {state}): stop it before removing it")]
    NotFinished {
        id: String,
        state: crate::state::AgentState,
    },
    #[error("agent `{id}` cannot be restarted now: {why}")]
    CannotRestart { id: String, why: String },
    /// The spawn names a user this daemon's policy (`--allow-users`) does not allow.
    #[error("agent `{id}` may not run as user `{user}`: {why}")]
    UserNotAllowed {
        id: String,
        user: String,
        why: String,
    },
    #[error("sandbox: {problem}")]
    SandboxWider { problem: String },
    #[error("agent `{id}` already exists")]
    AlreadyExists { id: String },
    /// The working directory the spawn named is missing or not a directory.
    #[error("spawning agent `{id}`: working directory `{}`: {source}", path.display())]
    WorkingDir {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The operating system refused to start the command (not found, not executable...).
    #[error("spawning agent `{id}`: cannot run `{program}`: {source}")]
    Spawn {
        id: String,
        program: String,
        source: std::io::Error,
    },
    /// The agent's folder or one of its files could not be prepared.
    #[error(
        "agent `{id}`: `{}` exists and is not a folder agentd made (a symbolic link?); remove it",
        path.display()
    )]
    UnsafeAgentDir { id: String, path: PathBuf },
    #[error("preparing folder `{}` of agent `{id}`: {source}", path.display())]
    AgentDir {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent store: {source}")]
    Store {
        #[from]
        source: sled::Error,
    },
    /// sled cannot open or read the store's files (garbage, truncation).
    #[error("the agent store `{}` cannot be read: {problem}", path.display())]
    StoreUnreadable { path: PathBuf, problem: String },
    /// The store is unreadable, empty or older than the host says: the report says what was
    /// found and how to start anyway. Nothing was killed or changed.
    #[error("{report}")]
    StoreDistrusted { report: String },
    #[error("agent store: record `{key}` is not readable: {source}")]
    Record {
        key: String,
        source: serde_json::Error,
    },
    /// Setting up the daemon itself failed (data folder, signal handlers, subreaper).
    #[error("{what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    /// Another daemon holds the data folder's lock; `holder` is the pid it wrote there.
    #[error(
        "another agentd{} runs on the data folder `{}`: stop it first, or start this one on \
         another data folder",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        data_dir.display()
    )]
    DataDirTaken {
        data_dir: PathBuf,
        holder: Option<u32>,
    },
    /// A watch asked to resume from events the log no longer keeps.
    #[error(
        "events after sequence {after} are no longer retained (the log was trimmed through \
         {trimmed_through}): list the agents again and watch with include_snapshot"
    )]
    SequenceCompacted { after: u64, trimmed_through: u64 },
    /// A watch asked to resume from a sequence this daemon never reached.
    #[error(
        "sequence {after} is ahead of this daemon's latest event {latest}: list the agents \
         again and watch with include_snapshot"
    )]
    SequenceAhead { after: u64, latest: u64 },
    #[error("agentd is shutting down")]
    ShuttingDown,
}
