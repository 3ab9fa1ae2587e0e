//! What a spawn asks for, and the checks that turn a request into an [`AgentSpec`] before
//! anything is stored or started.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::health::{HealthAction, HealthPolicy};
use crate::lifecycle::{LifecyclePolicy, RestartPolicy};
use crate::sandbox::{Sandbox, SandboxRequest};
use crate::spend::Budget;

/// A spawn as the client sent it, before validation.
#[derive(Debug, Clone, Default)]
pub struct SpawnRequest {
    pub request_id: String,
    pub agent_id: String,
    pub parent_agent_id: String,
    pub agent_name: String,
    pub agent_type: String,
    pub model: String,
    pub prompt: String,
    pub load_percentage: f64,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: String,
    pub labels: BTreeMap<String, String>,
    /// Signal name, empty for the default.
    pub stop_signal: String,
    pub first_grace: Option<Duration>,
    pub second_grace: Option<Duration>,
    pub health_policy: HealthPolicy,
    pub lifecycle: LifecyclePolicy,
    pub resources: Resources,
    /// A user name or numeric id to run as (agentd must be root); empty: agentd's own.
    pub user: String,
    /// A group name or numeric id; empty: the user's primary group.
    pub group: String,
    /// Confinement; `None`: none (unless `--default-sandbox` or a sandboxed parent).
    pub sandbox: Option<SandboxRequest>,
    /// What it and its descendants may spend through the LLM gateway.
    pub budget: Option<Budget>,
}

/// What an agent may use. `None` or empty: no limit.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// Hard limit: the kernel's OOM killer ends the agent above it.
    pub memory_max_mb: Option<f64>,
    /// Throttled above it (cgroup v2 only).
    pub memory_high_mb: Option<f64>,
    /// CPU time per wall-clock time: 0.5 is half a core.
    pub cpu_max_cores: Option<f64>,
    /// Processes and threads in the agent's tree.
    pub pids_max: Option<u32>,
    /// CPUs the agent may run on.
    pub cpus: Vec<u32>,
    pub nice: Option<i32>,
    /// `RLIMIT_NOFILE`.
    pub open_files_max: Option<u32>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }

    /// Range checks; what the host can enforce is checked where the host is known.
    fn validate(&self) -> Result<()> {
        const MAX_MB: f64 = 1024.0 * 1024.0 * 1024.0;
        for (field, value) in [
            ("resources.memory_max_mb", self.memory_max_mb),
            ("resources.memory_high_mb", self.memory_high_mb),
        ] {
            if let Some(mb) = value
                && !(1.0..=MAX_MB).contains(&mb)
            {
                return invalid(
                    field,
                    format!("{mb} MB is out of range: give 1 MB to 1 PB, or 0 for no limit"),
                );
            }
        }
        if let (Some(high), Some(max)) = (self.memory_high_mb, self.memory_max_mb)
            && high > max
        {
            return invalid(
                "resources.memory_high_mb",
                format!("{high} MB is above memory_max_mb {max} MB"),
            );
        }
        if let Some(cores) = self.cpu_max_cores
            && !(0.01..=4096.0).contains(&cores)
        {
            return invalid(
                "resources.cpu_max_cores",
                format!("{cores} is out of range: give 0.01 to 4096 cores, or 0 for no limit"),
            );
        }
        let online = online_cpus();
        if self.cpus.len() > 4096 {
            return invalid("resources.cpus", "lists more than 4096 CPUs");
        }
        if let Some(cpu) = self.cpus.iter().find(|&&cpu| cpu >= online) {
            return invalid(
                "resources.cpus",
                format!(
                    "CPU {cpu} does not exist: this host has CPUs 0 to {}",
                    online - 1
                ),
            );
        }
        if let Some(nice) = self.nice
            && !(-20..=19).contains(&nice)
        {
            return invalid(
                "resources.nice",
                format!("{nice} is not between -20 and 19"),
            );
        }
        if let Some(files) = self.open_files_max {
            let most = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
                .unwrap_or(1 << 20);
            if !(1..=most).contains(&files) {
                return invalid(
                    "resources.open_files_max",
                    format!("{files} is out of range: give 1 to {most} (fs.nr_open)"),
                );
            }
        }
        if self.pids_max == Some(0) {
            return invalid("resources.pids_max", "0 processes cannot run anything");
        }
        Ok(())
    }
}

/// How many CPUs the host has (the highest number plus one), read once: std reads the
/// cgroup's quota from `/proc` on every call, which cost 2% of a spawn storm.
fn online_cpus() -> u32 {
    static CPUS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CPUS.get_or_init(count_cpus)
}

fn count_cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .into_iter()
        .chain(
            std::fs::read_to_string("/sys/devices/system/cpu/online")
                .ok()
                .and_then(|text| {
                    let last = text.trim().rsplit([',', '-']).next()?.parse::<u32>().ok()?;
                    Some(last + 1)
                }),
        )
        .max()
        .unwrap_or(1)
}

/// Who an agent runs as, resolved when it is spawned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the user's, from the group database.
    pub groups: Vec<u32>,
}

impl RunAs {
    /// Looks up `user` (and `group`) by name or number. `Ok(None)` when neither is given.
    pub(crate) fn resolve(user: &str, group: &str) -> Result<Option<RunAs>> {
        use nix::unistd::{Gid, Group, Uid, User};
        if user.is_empty() && group.is_empty() {
            return Ok(None);
        }
        let unknown = |field, problem: String| Error::Invalid { field, problem };
        let entry = if user.is_empty() {
            User::from_uid(Uid::current())
        } else if let Ok(uid) = user.parse::<u32>() {
            User::from_uid(Uid::from_raw(uid))
        } else {
            User::from_name(user)
        }
        .ok()
        .flatten();
        let (name, uid, primary) = match (entry, user.parse::<u32>()) {
            (Some(entry), _) => (entry.name, entry.uid.as_raw(), entry.gid.as_raw()),
            // A numeric id with no entry in the user database runs with its own number as
            // its group, as `setpriv --reuid` would.
            (None, Ok(uid)) => (uid.to_string(), uid, uid),
            (None, Err(_)) => {
                return Err(unknown(
                    "user",
                    format!("no user `{user}` in this host's user database"),
                ));
            }
        };
        let gid = if group.is_empty() {
            primary
        } else if let Ok(gid) = group.parse::<u32>() {
            gid
        } else {
            Group::from_name(group)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    unknown(
                        "group",
                        format!("no group `{group}` in this host's group database"),
                    )
                })?
                .gid
                .as_raw()
        };
        let groups_of = |gid: u32| -> Vec<u32> {
            std::ffi::CString::new(name.clone())
                .ok()
                .and_then(|c_name| nix::unistd::getgrouplist(&c_name, Gid::from_raw(gid)).ok())
                .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
                .unwrap_or_else(|| vec![gid])
        };
        // Only a group the user belongs to: `--group shadow` would otherwise hand any agent
        // the host's password hashes.
        if gid != primary && !groups_of(primary).contains(&gid) {
            return Err(unknown(
                "group",
                format!(
                    "user `{name}` is not a member of group `{group}`: an agent runs only with \
                     its user's own groups"
                ),
            ));
        }
        let groups = groups_of(gid);
        Ok(Some(RunAs {
            user: name,
            uid,
            gid,
            groups,
        }))
    }
}

/// A validated spawn: what is stored and what the process is started from. The prompt is
/// not part of it; it lives in the agent's `prompt.txt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub agent_id: String,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub parent_agent_id: String,
    #[serde(default)]
    pub agent_name: String,
    #[serde(default)]
    pub agent_type: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub load_percentage: f64,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `None` means the agent's own folder.
    #[serde(default)]
    pub working_dir: Option<PathBuf>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub stop_policy: StopPolicy,
    #[serde(default)]
    pub health_policy: HealthPolicy,
    #[serde(default)]
    pub lifecycle: LifecyclePolicy,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub run_as: Option<RunAs>,
    /// Confined: what it may read, write and connect to (see `sandbox.rs`).
    #[serde(default)]
    pub sandbox: Option<Sandbox>,
    /// What it and its descendants may spend through the LLM gateway (`spend.rs`).
    #[serde(default)]
    pub budget: Option<Budget>,
}

/// The stop ladder: `signal`, wait `first_grace`, `signal` again, wait `second_grace`, SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StopPolicy {
    #[serde(with = "signal_name")]
    pub signal: Signal,
    pub first_grace: Duration,
    pub second_grace: Duration,
}

impl Default for StopPolicy {
    /// SIGTERM, 10 s, SIGTERM, 5 s, SIGKILL.
    fn default() -> Self {
        StopPolicy {
            signal: Signal::SIGTERM,
            first_grace: Duration::from_secs(10),
            second_grace: Duration::from_secs(5),
        }
    }
}

/// Size limits on what a client may send, so one request cannot exhaust the daemon.
pub struct Limits;

impl Limits {
    pub const ID_LEN: usize = 128;
    pub const TEXT_LEN: usize = 1024;
    pub const PROMPT_BYTES: usize = 1024 * 1024;
    pub const COMMAND_ARGS: usize = 4096;
    pub const COMMAND_BYTES: usize = 256 * 1024;
    pub const ENV_ENTRIES: usize = 256;
    pub const ENV_BYTES: usize = 64 * 1024;
    pub const LABELS: usize = 64;
    pub const MAX_GRACE: Duration = Duration::from_secs(3600);
}

impl SpawnRequest {
    /// Checks every field; `agent_id` must already be filled in (generated when empty).
    pub(crate) fn validate(self) -> Result<(AgentSpec, String)> {
        check_id("agent_id", &self.agent_id)?;
        if !self.parent_agent_id.is_empty() {
            // `@name` is an external coordinator: `@` can never appear in an agent id.
            let parent = &self.parent_agent_id;
            check_id(
                "parent_agent_id",
                parent.strip_prefix('@').unwrap_or(parent),
            )?;
        }
        check_len("request_id", &self.request_id, Limits::ID_LEN)?;
        check_len("agent_name", &self.agent_name, Limits::TEXT_LEN)?;
        check_len("agent_type", &self.agent_type, Limits::TEXT_LEN)?;
        check_len("model", &self.model, Limits::TEXT_LEN)?;
        if self.prompt.len() > Limits::PROMPT_BYTES {
            return invalid(
                "prompt",
                format!(
                    "{} bytes is over the limit of {} bytes",
                    self.prompt.len(),
                    Limits::PROMPT_BYTES
                ),
            );
        }
        if !(0.0..=100.0).contains(&self.load_percentage) {
            return invalid(
                "load_percentage",
                format!("must be between 0 and 100, got {}", self.load_percentage),
            );
        }
        check_command(&self.command)?;
        check_env(&self.env)?;
        check_labels(&self.labels)?;
        let working_dir = match self.working_dir.as_str() {
            "" => None,
            dir if dir.contains('\0') => return invalid("working_dir", "contains a NUL byte"),
            dir if !dir.starts_with('/') => {
                return invalid(
                    "working_dir",
                    "must be an absolute path (it would be resolved against agentd's own folder)",
                );
            }
            dir => Some(PathBuf::from(dir)),
        };
        let stop_policy =
            check_stop_policy(&self.stop_signal, self.first_grace, self.second_grace)?;
        let health_policy = self.health_policy.validate()?;
        let lifecycle = self
            .lifecycle
            .validate(health_policy.heartbeat_timeout.is_some())?;
        let restarts = lifecycle.restart != RestartPolicy::Never;
        for (field, action) in [
            ("health_policy.on_stall", health_policy.on_stall),
            (
                "health_policy.on_memory_limit",
                health_policy.on_memory_limit,
            ),
            ("health_policy.on_cpu_limit", health_policy.on_cpu_limit),
        ] {
            if action == HealthAction::Restart && !restarts {
                return invalid(
                    field,
                    "a restart action needs restart_policy ON_FAILURE or ALWAYS",
                );
            }
        }
        self.resources.validate()?;
        check_len("user", &self.user, Limits::TEXT_LEN)?;
        check_len("group", &self.group, Limits::TEXT_LEN)?;
        let run_as = RunAs::resolve(&self.user, &self.group)?;
        let sandbox = self.sandbox.map(SandboxRequest::validate).transpose()?;
        let budget = self.budget.filter(|budget| !budget.is_unlimited());
        let spec = AgentSpec {
            agent_id: self.agent_id,
            request_id: self.request_id,
            parent_agent_id: self.parent_agent_id,
            agent_name: self.agent_name,
            agent_type: self.agent_type,
            model: self.model,
            load_percentage: self.load_percentage,
            command: self.command,
            env: self.env,
            working_dir,
            labels: self.labels,
            stop_policy,
            health_policy,
            lifecycle,
            resources: self.resources,
            run_as,
            sandbox,
            budget,
        };
        Ok((spec, self.prompt))
    }
}

fn invalid<T>(field: &'static str, problem: impl Into<String>) -> Result<T> {
    Err(Error::Invalid {
        field,
        problem: problem.into(),
    })
}

/// An agent id names a folder under the data folder, so it must never be able to escape it.
pub(crate) fn check_id(field: &'static str, id: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > Limits::ID_LEN || !id.chars().all(allowed) {
        return invalid(
            field,
            format!("`{id}` must be 1 to 128 characters of A-Z a-z 0-9 . _ -"),
        );
    }
    if id == "." || id == ".." {
        return invalid(field, format!("`{id}` is not a usable id"));
    }
    Ok(())
}

/// A short text that travels to the agent's environment: bounded, and without NUL.
fn check_len(field: &'static str, value: &str, max: usize) -> Result<()> {
    if value.contains('\0') {
        return invalid(field, "contains a NUL byte");
    }
    if value.len() > max {
        return invalid(
            field,
            format!("{} bytes is over the limit of {max}", value.len()),
        );
    }
    Ok(())
}

fn check_command(command: &[String]) -> Result<()> {
    match command.first() {
        None => return invalid("command", "is empty: give the program and its arguments"),
        Some(program) if program.is_empty() => {
            return invalid("command", "the program (first element) is empty");
        }
        Some(_) => {}
    }
    if command.len() > Limits::COMMAND_ARGS {
        return invalid(
            "command",
            format!(
                "{} arguments is over the limit of {}",
                command.len(),
                Limits::COMMAND_ARGS
            ),
        );
    }
    let bytes: usize = command.iter().map(String::len).sum();
    if bytes > Limits::COMMAND_BYTES {
        return invalid(
            "command",
            format!(
                "{bytes} bytes is over the limit of {}",
                Limits::COMMAND_BYTES
            ),
        );
    }
    if command.iter().any(|arg| arg.contains('\0')) {
        return invalid("command", "an argument contains a NUL byte");
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<()> {
    if env.len() > Limits::ENV_ENTRIES {
        return invalid(
            "env",
            format!(
                "{} entries is over the limit of {}",
                env.len(),
                Limits::ENV_ENTRIES
            ),
        );
    }
    let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > Limits::ENV_BYTES {
        return invalid(
            "env",
            format!("{bytes} bytes is over the limit of {}", Limits::ENV_BYTES),
        );
    }
    for (key, value) in env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return invalid(
                "env",
                format!("`{key}`: names must be non-empty without `=` or NUL, values without NUL"),
            );
        }
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > Limits::LABELS {
        return invalid(
            "labels",
            format!(
                "{} labels is over the limit of {}",
                labels.len(),
                Limits::LABELS
            ),
        );
    }
    for (key, value) in labels {
        if key.contains('\0') || value.contains('\0') {
            return invalid(
                "labels",
                format!("`{key}`: keys and values must not hold NUL"),
            );
        }
        if key.is_empty() || key.len() > Limits::ID_LEN || value.len() > Limits::TEXT_LEN {
            return invalid(
                "labels",
                format!(
                    "`{key}`: keys must be 1 to {} bytes, values at most {}",
                    Limits::ID_LEN,
                    Limits::TEXT_LEN
                ),
            );
        }
    }
    Ok(())
}

fn check_stop_policy(
    signal: &str,
    first_grace: Option<Duration>,
    second_grace: Option<Duration>,
) -> Result<StopPolicy> {
    let default = StopPolicy::default();
    let signal = match signal {
        "" => default.signal,
        name => parse_signal(name).ok_or_else(|| Error::Invalid {
            field: "stop_policy.stop_signal",
            problem: format!("`{name}` is not a signal name such as SIGTERM or SIGINT"),
        })?,
    };
    if signal == Signal::SIGKILL || signal == Signal::SIGSTOP {
        return invalid(
            "stop_policy.stop_signal",
            "SIGKILL and SIGSTOP cannot be a graceful stop signal",
        );
    }
    let first_grace = first_grace.unwrap_or(default.first_grace);
    let second_grace = second_grace.unwrap_or(default.second_grace);
    for (field, grace) in [
        ("stop_policy.first_grace", first_grace),
        ("stop_policy.second_grace", second_grace),
    ] {
        if grace > Limits::MAX_GRACE {
            return invalid(field, format!("{grace:?} is over the limit of 1 hour"));
        }
    }
    Ok(StopPolicy {
        signal,
        first_grace,
        second_grace,
    })
}

/// Accepts "SIGTERM", "TERM" and "sigterm".
fn parse_signal(name: &str) -> Option<Signal> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse().ok()
}

mod signal_name {
    use nix::sys::signal::Signal;
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(signal: &Signal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(signal.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Signal, D::Error> {
        let name = String::deserialize(d)?;
        name.parse()
            .map_err(|_| D::Error::custom(format!("unknown signal `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(command: &[&str]) -> SpawnRequest {
        SpawnRequest {
            agent_id: "a1".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..SpawnRequest::default()
        }
    }

    fn field_of(result: Result<(AgentSpec, String)>) -> &'static str {
        match result {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("expected an invalid-argument error, got {other:?}"),
        }
    }

    #[test]
    fn ids_cannot_escape_the_data_folder() {
        for id in ["", ".", "..", "../x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_id("agent_id", id).is_err(), "{id:?} was accepted");
        }
        for id in ["a", "A-1.b_c", "..a", &"x".repeat(128)] {
            assert!(check_id("agent_id", id).is_ok(), "{id:?} was rejected");
        }
    }

    #[test]
    fn bad_requests_name_the_field() {
        assert_eq!(field_of(request(&[]).validate()), "command");
        assert_eq!(field_of(request(&[""]).validate()), "command");
        let mut r = request(&["true"]);
        r.load_percentage = 101.0;
        assert_eq!(field_of(r.validate()), "load_percentage");
        let mut r = request(&["true"]);
        r.load_percentage = f64::NAN;
        assert_eq!(field_of(r.validate()), "load_percentage");
        let mut r = request(&["true"]);
        r.prompt = "x".repeat(Limits::PROMPT_BYTES + 1);
        assert_eq!(field_of(r.validate()), "prompt");
        let mut r = request(&["true"]);
        r.env.insert("A=B".into(), "1".into());
        assert_eq!(field_of(r.validate()), "env");
        let mut r = request(&["true"]);
        r.stop_signal = "SIGNOPE".into();
        assert_eq!(field_of(r.validate()), "stop_policy.stop_signal");
        let mut r = request(&["true"]);
        r.stop_signal = "KILL".into();
        assert_eq!(field_of(r.validate()), "stop_policy.stop_signal");
        let mut r = request(&["true"]);
        r.resources.memory_max_mb = Some(-1.0);
        assert_eq!(field_of(r.validate()), "resources.memory_max_mb");
        let mut r = request(&["true"]);
        r.resources.cpu_max_cores = Some(f64::NAN);
        assert_eq!(field_of(r.validate()), "resources.cpu_max_cores");
        let mut r = request(&["true"]);
        r.resources.cpus = vec![100_000];
        assert_eq!(field_of(r.validate()), "resources.cpus");
        let mut r = request(&["true"]);
        r.resources.nice = Some(20);
        assert_eq!(field_of(r.validate()), "resources.nice");
        let mut r = request(&["true"]);
        r.resources.memory_max_mb = Some(100.0);
        r.resources.memory_high_mb = Some(200.0);
        assert_eq!(field_of(r.validate()), "resources.memory_high_mb");
        let mut r = request(&["true"]);
        r.user = "no-such-user-agentd".into();
        assert_eq!(field_of(r.validate()), "user");
        let mut r = request(&["true"]);
        r.user = "root".into();
        r.group = "no-such-group-agentd".into();
        assert_eq!(field_of(r.validate()), "group");
    }

    #[test]
    fn stop_policy_defaults_to_sigterm_10s_5s_and_parses_names() {
        let (spec, _) = request(&["true"]).validate().expect("valid");
        assert_eq!(spec.stop_policy, StopPolicy::default());
        let mut r = request(&["true"]);
        r.stop_signal = "int".into();
        r.first_grace = Some(Duration::from_millis(250));
        let (spec, _) = r.validate().expect("valid");
        assert_eq!(spec.stop_policy.signal, Signal::SIGINT);
        assert_eq!(spec.stop_policy.first_grace, Duration::from_millis(250));
        assert_eq!(spec.stop_policy.second_grace, Duration::from_secs(5));
    }
}
