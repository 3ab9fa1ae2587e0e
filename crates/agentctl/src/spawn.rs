//! `spawn`: start an agent from a command line of options, and `SpawnArgs`, which `run`
//! shares.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd_proto::settings;
use agentd_proto::v1 as pb;
use anyhow::Context;

use crate::client::Client;
use crate::names::enum_arg;
use crate::output::{Output, print_rows};

pub async fn spawn(
    client: &mut Client,
    args: SpawnArgs,
    here: Option<&Path>,
    out: Output,
) -> anyhow::Result<()> {
    let response = client.spawn(request(args, here)?).await?.into_inner();
    out.answer(&response, |response| print_rows(response.status.as_slice()));
    Ok(())
}

#[derive(clap::Args)]
pub struct SpawnArgs {
    /// Agent id [default: generated]
    #[arg(long = "id")]
    agent_id: Option<String>,
    #[arg(long)]
    parent: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long = "type")]
    agent_type: Option<String>,
    #[arg(long)]
    model: Option<String>,
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Declared share of the host, 0-100
    #[arg(long, default_value_t = 0.0)]
    load: f64,
    /// KEY=VALUE added to the environment; repeatable
    #[arg(long = "env", value_parser = crate::key_value)]
    env: Vec<(String, String)>,
    /// KEY=VALUE label; repeatable
    #[arg(long = "label", value_parser = crate::key_value)]
    labels: Vec<(String, String)>,
    /// Working directory [default: where agentctl runs; the agent's own folder for a
    /// sandboxed agent, which may write beneath its working directory, or a remote agentd]
    #[arg(long, conflicts_with = "in_agent_folder")]
    cwd: Option<PathBuf>,
    /// Work in the agent's own folder (DATA_DIR/agents/ID), not where agentctl runs
    #[arg(long)]
    in_agent_folder: bool,
    /// Idempotency key: repeating it returns the same agent
    #[arg(long)]
    request_id: Option<String>,
    /// Graceful stop signal [default: SIGTERM]
    #[arg(long)]
    stop_signal: Option<String>,
    /// Wait after the first stop signal [default: 10s]
    #[arg(long, value_parser = settings::parse_duration)]
    grace: Option<Duration>,
    /// Wait after the second stop signal [default: 5s]
    #[arg(long, value_parser = settings::parse_duration)]
    second_grace: Option<Duration>,
    /// The agent must heartbeat (ReportProgress or its status file) at least this often
    #[arg(long, value_parser = settings::parse_duration)]
    heartbeat_timeout: Option<Duration>,
    /// Memory limit of the agent's process tree, in MiB
    #[arg(long)]
    memory_limit_mb: Option<f64>,
    /// CPU limit of the agent's process tree, in percent of one core (3 samples in a row)
    #[arg(long)]
    cpu_limit: Option<f64>,
    /// Stop the agent (instead of only reporting) when it stalls or crosses a limit
    #[arg(long)]
    stop_when_unhealthy: bool,
    /// When to start the agent again after it ends
    #[arg(long, default_value = "never", value_parser = enum_arg("RESTART_POLICY_", pb::RestartPolicy::as_str_name))]
    restart: i32,
    /// Give up (FAILED) after this many restarts [default: no limit]
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Stop the agent (TIMED_OUT) when one run lasts longer than this
    #[arg(long, value_parser = settings::parse_duration)]
    max_runtime: Option<Duration>,
    /// Stop this agent too when its parent agent ends for good
    #[arg(long)]
    stop_with_parent: bool,
    /// Hard memory limit in MiB: the OOM killer ends the agent above it
    #[arg(long, value_name = "MB")]
    memory_max: Option<f64>,
    /// Memory in MiB above which the agent is throttled (cgroup v2 only)
    #[arg(long, value_name = "MB")]
    memory_high: Option<f64>,
    /// CPU limit in cores: 0.5 is half of one core
    #[arg(long, value_name = "CORES")]
    cpu_max: Option<f64>,
    /// Most processes and threads in the agent's tree
    #[arg(long)]
    pids_max: Option<u32>,
    /// CPUs to run on, such as 0,2 or 0-3
    #[arg(long, value_parser = cpu_list)]
    cpus: Option<CpuList>,
    /// Scheduling priority, -20 to 19
    #[arg(long, allow_hyphen_values = true)]
    nice: Option<i32>,
    /// Most open files per process (RLIMIT_NOFILE)
    #[arg(long)]
    open_files: Option<u32>,
    /// Run as this user (name or id; agentd must run as root)
    #[arg(long)]
    user: Option<String>,
    /// Run with this group (name or id) [default: the user's]
    #[arg(long)]
    group: Option<String>,
    /// Confine the agent (the default sandbox: system folders read-only, its own folder and
    /// working dir writable, network through agentd's proxy with no host allowed, no
    /// capabilities, a seccomp filter). Implied by --read, --write, --net and --allow-host
    #[arg(long)]
    sandbox: bool,
    /// A path the sandboxed agent may also read beneath; repeatable
    #[arg(long = "read", value_name = "PATH")]
    read_paths: Vec<String>,
    /// A path the sandboxed agent may also write beneath; repeatable
    #[arg(long = "write", value_name = "PATH")]
    write_paths: Vec<String>,
    /// The sandboxed agent's network: host, none, or proxy [default: proxy]
    #[arg(long = "net", value_parser = enum_arg("NETWORK_MODE_", pb::NetworkMode::as_str_name))]
    network: Option<i32>,
    /// HOST[:PORT] (or *.DOMAIN[:PORT]) the sandboxed agent may reach through its proxy;
    /// repeatable
    #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
    allow_hosts: Vec<String>,
    #[command(flatten)]
    budget: crate::spend::BudgetArgs,
    /// The program and its arguments; a relative program (./job.sh) is relative to where
    /// agentctl runs, and so are relative paths in the arguments unless --cwd or a sandbox
    /// gives the agent another working directory
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

/// The request the options ask for. `here` is where agentctl runs when agentd runs on this
/// host (over its socket or loopback); there relative paths mean what they mean in a shell:
/// the program, `--cwd`, `--read` and `--write` are resolved against it, and the agent works
/// in it unless it is sandboxed (a sandbox lets its agent write beneath its working
/// directory: that stays the agent's own folder unless `--cwd` says otherwise). The API
/// itself takes absolute paths only.
pub fn request(mut args: SpawnArgs, here: Option<&Path>) -> anyhow::Result<pb::SpawnRequest> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(prompt), _) => prompt.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading prompt file `{}`", file.display()))?,
        (None, None) => String::new(),
    };
    let stop_policy = (args.stop_signal.is_some()
        || args.grace.is_some()
        || args.second_grace.is_some())
    .then(|| pb::StopPolicy {
        stop_signal: args.stop_signal.unwrap_or_default(),
        first_grace: args.grace.map(Into::into),
        second_grace: args.second_grace.map(Into::into),
    });
    let sandboxed = args.sandbox
        || args.network.is_some()
        || !args.allow_hosts.is_empty()
        || !args.read_paths.is_empty()
        || !args.write_paths.is_empty();
    let working_dir = match (&args.cwd, here) {
        (Some(dir), Some(here)) => resolve(here, dir),
        (Some(dir), None) => dir.clone(),
        (None, Some(here)) if !sandboxed && !args.in_agent_folder => here.to_path_buf(),
        (None, _) => PathBuf::new(),
    };
    if let (Some(here), Some(program)) = (here, args.command.first_mut())
        && program.contains('/')
        && Path::new(program.as_str()).is_relative()
    {
        *program = resolve(here, Path::new(program.as_str()))
            .to_string_lossy()
            .into_owned();
    }
    let action = if args.stop_when_unhealthy {
        pb::HealthAction::Stop
    } else {
        pb::HealthAction::Report
    } as i32;
    let health_policy = pb::HealthPolicy {
        heartbeat_timeout: args.heartbeat_timeout.map(Into::into),
        on_stall: action,
        memory_limit_mb: args.memory_limit_mb.unwrap_or(0.0),
        on_memory_limit: action,
        cpu_limit_percent: args.cpu_limit.unwrap_or(0.0),
        cpu_limit_samples: 0,
        on_cpu_limit: action,
    };
    Ok(pb::SpawnRequest {
        request_id: args.request_id.unwrap_or_default(),
        agent_id: args.agent_id.unwrap_or_default(),
        parent_agent_id: args.parent.unwrap_or_default(),
        agent_name: args.name.unwrap_or_default(),
        agent_type: args.agent_type.unwrap_or_default(),
        model: args.model.unwrap_or_default(),
        prompt,
        load_percentage: args.load,
        command: args.command,
        env: args.env.into_iter().collect(),
        working_dir: working_dir.to_string_lossy().into_owned(),
        labels: args.labels.into_iter().collect(),
        stop_policy,
        health_policy: Some(health_policy),
        restart_policy: args.restart,
        restart_backoff: None,
        max_restarts: args.max_restarts.unwrap_or(0),
        max_runtime: args.max_runtime.map(Into::into),
        startup_timeout: None,
        on_parent_exit: if args.stop_with_parent {
            pb::ParentExitPolicy::Stop
        } else {
            pb::ParentExitPolicy::Keep
        } as i32,
        resources: Some(pb::Resources {
            memory_max_mb: args.memory_max.unwrap_or(0.0),
            memory_high_mb: args.memory_high.unwrap_or(0.0),
            cpu_max_cores: args.cpu_max.unwrap_or(0.0),
            pids_max: args.pids_max.unwrap_or(0),
            cpus: args.cpus.map(|list| list.0).unwrap_or_default(),
            nice: args.nice,
            open_files_max: args.open_files.unwrap_or(0),
        }),
        user: args.user.unwrap_or_default(),
        group: args.group.unwrap_or_default(),
        sandbox: sandbox(
            sandboxed,
            args.network,
            args.allow_hosts,
            args.read_paths,
            args.write_paths,
        )?,
        budget: args.budget.budget()?,
    })
}

/// `path` relative to `here` (as it is when absolute), without its `.` components.
fn resolve(here: &Path, path: &Path) -> PathBuf {
    here.join(path)
        .components()
        .filter(|part| *part != std::path::Component::CurDir)
        .collect()
}

/// The sandbox the options ask for; `None` unless `asked`.
fn sandbox(
    asked: bool,
    network: Option<i32>,
    allow_hosts: Vec<String>,
    read_paths: Vec<String>,
    write_paths: Vec<String>,
) -> anyhow::Result<Option<pb::Sandbox>> {
    if !asked {
        return Ok(None);
    }
    let absolute = |paths: Vec<String>| -> anyhow::Result<Vec<String>> {
        paths
            .into_iter()
            .map(|path| {
                std::path::absolute(&path)
                    .map(|path| path.to_string_lossy().into_owned())
                    .with_context(|| format!("making `{path}` absolute"))
            })
            .collect()
    };
    Ok(Some(pb::Sandbox {
        network: network.unwrap_or(pb::NetworkMode::Unspecified as i32),
        allow_hosts,
        read_paths: absolute(read_paths)?,
        write_paths: absolute(write_paths)?,
        allow_namespaces: false,
    }))
}

#[derive(Clone)]
struct CpuList(Vec<u32>);

/// Parses `0,2,4-7`.
fn cpu_list(text: &str) -> Result<CpuList, String> {
    let number = |part: &str| {
        part.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{part}` is not a CPU number (a list looks like 0,2,4-7)"))
    };
    let mut cpus = Vec::new();
    for part in text.split(',') {
        match part.split_once('-') {
            Some((first, last)) => cpus.extend(number(first)?..=number(last)?),
            None => cpus.push(number(part)?),
        }
    }
    Ok(CpuList(cpus))
}
