//! `agentctl`: the command-line client of agentd.

mod client;
mod describe;
mod list;
mod logs;
mod names;
mod output;
mod pause;
mod rm;
mod run;
mod spawn;
mod spend;
mod status;
mod stop;
mod summary;
mod top;
mod wait;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use agentd_proto::settings;
use clap::{Parser, Subcommand};

use crate::output::{Output, one_line};

#[derive(Parser)]
#[command(
    name = "agentctl",
    version,
    about = "Talk to a running agentd",
    after_help = "Exit status: 0 success; 1 an error from agentd (its gRPC code and message on \
                  stderr) or from reaching it; 2 a usage error. `wait` and `run` exit with the \
                  agent's own status: its exit code, 128 + the signal that killed it, 1 for an \
                  agent that was lost or could not start, 124 when `--timeout` passes first, \
                  130 when `run --detach-on-interrupt` is interrupted."
)]
struct Options {
    /// agentd's Unix socket [default: DATA_DIR/agentd.sock, as agentd chooses it]
    #[arg(long, env = "AGENTD_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// agentd's TCP address instead of the socket: https://HOST:PORT (TLS), or
    /// http://127.0.0.1:PORT for a daemon started with --insecure-listen
    #[arg(long, env = "AGENTD_ADDR", global = true)]
    addr: Option<String>,
    /// CA certificate (PEM) that agentd's TLS certificate chains to, for https://
    #[arg(long, env = "AGENTD_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Client certificate chain (PEM) to present over https://, for an agentd started with
    /// --tls-client-ca (mTLS); needs --client-key
    #[arg(
        long,
        alias = "tls-cert",
        env = "AGENTD_CLIENT_CERT",
        global = true,
        requires = "client_key"
    )]
    client_cert: Option<PathBuf>,
    /// Private key (PEM) of --client-cert
    #[arg(
        long,
        alias = "tls-key",
        env = "AGENTD_CLIENT_KEY",
        global = true,
        requires = "client_cert"
    )]
    client_key: Option<PathBuf>,
    /// Bearer token sent with every call (from agentd's --token-file)
    #[arg(long, env = "AGENTD_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print each answer as the proto3 JSON of its response message (the HTTP API's JSON):
    /// `status` an AgentStatus, `list` a ListAgentsResponse, `watch` one AgentEvent per line
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Start an agent: agentctl spawn [OPTIONS] -- PROGRAM [ARGS...]
    Spawn(Box<spawn::SpawnArgs>),
    /// Start an agent, copy its stdout and stderr to ours as they are written, and exit with
    /// its status once it has ended: agentctl run [OPTIONS] -- PROGRAM [ARGS...]. Ctrl-C stops
    /// it with its ladder, a second Ctrl-C kills it
    Run(Box<run::RunArgs>),
    /// Wait until agents have ended for good (not while a restart is pending); exit with the
    /// agent's status (with several, the first that did not succeed)
    Wait {
        #[arg(required = true)]
        agent_ids: Vec<String>,
        /// Give up after this long (exit 124), leaving the agents running
        #[arg(long, value_parser = settings::parse_duration)]
        timeout: Option<Duration>,
    },
    /// Everything about one agent: identity, process, health, limits, lifecycle, output,
    /// children
    Describe { agent_id: String },
    /// A full-screen live view of every agent: sort (c cpu, m memory, r runtime, e state,
    /// i id), t tree, f states, / filter, j/k move, the selected agent's output; s stop,
    /// K kill, R restart, d remove (y confirms), p pause or resume; q quit
    Top {
        /// Only agents whose id, name, type or model holds this text, or with this label
        /// (KEY=VALUE)
        #[arg(long)]
        filter: Option<String>,
    },
    /// Print a shell completion script: agentctl completions bash > /etc/bash_completion.d/agentctl
    Completions { shell: clap_complete::Shell },
    /// Show one agent
    Status { agent_id: String },
    /// List agents
    List(list::ListArgs),
    /// Stop agents with the stop ladder (or SIGKILL with --force)
    Stop(stop::StopArgs),
    /// Counts, resource use and declared load of all agents
    Summary,
    /// Print an agent's output (both streams unless --stdout or --stderr)
    Logs(logs::LogsArgs),
    /// Delete agents that have ended: record, folder and output
    Rm {
        #[arg(required = true)]
        agent_ids: Vec<String>,
    },
    /// Freeze running agents, every process of each
    Pause {
        #[arg(required = true)]
        agent_ids: Vec<String>,
    },
    /// Thaw paused agents
    Resume {
        #[arg(required = true)]
        agent_ids: Vec<String>,
    },
    /// Stop agents with their ladder and start them again: same id, spec, folder and prompt
    /// (an agent that ended starts again; a pending backoff restart happens now)
    Restart {
        #[arg(required = true)]
        agent_ids: Vec<String>,
    },
    /// Print events as they happen
    Watch(watch::WatchArgs),
    /// Replace a sandboxed agent's allowed hosts (UpdateSandbox); its proxy applies them to
    /// the next connection. No --allow-host: nothing allowed
    Sandbox {
        agent_id: String,
        /// HOST[:PORT] (or *.DOMAIN[:PORT]) it may reach; repeatable
        #[arg(long = "allow-host", value_name = "HOST[:PORT]")]
        allow_hosts: Vec<String>,
    },
    /// Replace an agent's budget (SetBudget), which covers its whole tree; no limit given:
    /// no budget. A tree paused at its budget resumes once the new one has room
    Budget {
        agent_id: String,
        #[command(flatten)]
        budget: spend::BudgetArgs,
    },
    /// What agents spent through agentd's LLM gateway: requests, tokens, dollars, their
    /// trees' totals and budgets
    Spend {
        /// Only this agent and its descendants
        #[arg(long)]
        tree: Option<String>,
    },
}

/// Parses a `KEY=VALUE` option.
fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    // Like other Unix tools, end quietly when the reader goes away (`agentctl list | head`)
    // instead of panicking on the failed write: Rust ignores SIGPIPE by default.
    // SAFETY: setting a signal back to its default action installs no handler.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    match run(Options::parse()).await {
        Ok(status) => std::process::ExitCode::from(status),
        Err(error) => {
            match error.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!(
                    "agentctl: {} ({:?})",
                    one_line(status.message()),
                    status.code()
                ),
                None => eprintln!(
                    "agentctl: {}",
                    one_line(&settings::error_text(error.as_ref()))
                ),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one command; returns agentctl's exit status.
async fn run(options: Options) -> anyhow::Result<u8> {
    if let Action::Completions { shell } = options.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut Options::command(),
            "agentctl",
            &mut std::io::stdout(),
        );
        return Ok(0);
    }
    // Relative paths mean what they mean in a shell, when agentd runs on this host.
    let here = client::is_local(&options)
        .then(std::env::current_dir)
        .and_then(Result::ok);
    let mut client = client::connect(&options).await?;
    let client = &mut client;
    let out = Output { json: options.json };
    match options.command {
        // Answered above, before connecting.
        Action::Completions { .. } => {}
        Action::Run(args) => return run::run_command(client, *args, here.as_deref()).await,
        Action::Wait { agent_ids, timeout } => {
            return wait::wait_command(client, &agent_ids, timeout, out).await;
        }
        Action::Top { filter } => return top::top(client.clone(), filter).await,
        Action::Describe { agent_id } => describe::describe(client, agent_id, out).await?,
        Action::Spawn(args) => spawn::spawn(client, *args, here.as_deref(), out).await?,
        Action::Status { agent_id } => status::status(client, agent_id, out).await?,
        Action::List(args) => list::list(client, args, out).await?,
        Action::Stop(args) => stop::stop(client, args, out).await?,
        Action::Logs(args) => logs::logs(client, args).await?,
        Action::Rm { agent_ids } => rm::rm(client, agent_ids, out).await?,
        Action::Pause { agent_ids } => pause::pause(client, agent_ids, out).await?,
        Action::Resume { agent_ids } => pause::resume(client, agent_ids, out).await?,
        Action::Restart { agent_ids } => pause::restart(client, agent_ids, out).await?,
        Action::Sandbox {
            agent_id,
            allow_hosts,
        } => pause::update_sandbox(client, agent_id, allow_hosts, out).await?,
        Action::Budget { agent_id, budget } => {
            spend::set_budget(client, agent_id, budget, out).await?
        }
        Action::Spend { tree } => spend::spend(client, tree, out).await?,
        Action::Summary => summary::summary(client, out).await?,
        Action::Watch(args) => watch::watch(client, args, out).await?,
    }
    Ok(0)
}
