//! `agentctl`: the command-line client of agentd.

mod describe;
mod ending;
mod top;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentd_proto::v1 as pb;
use agentd_server::settings;
use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use pb::agent_supervisor_client::AgentSupervisorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

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
    Spawn(Box<SpawnArgs>),
    /// Start an agent, copy its stdout and stderr to ours as they are written, and exit with
    /// its status once it has ended: agentctl run [OPTIONS] -- PROGRAM [ARGS...]. Ctrl-C stops
    /// it with its ladder, a second Ctrl-C kills it
    Run(Box<RunArgs>),
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
    /// i id), t tree, f states, / filter, the selected agent's output, s stop, k kill, q quit
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
    List {
        /// Only agents in this state (running, completed, failed...); repeatable
        #[arg(long = "state")]
        states: Vec<String>,
        /// Only children of this parent
        #[arg(long)]
        parent: Option<String>,
        /// Only agents with this label, KEY=VALUE; repeatable
        #[arg(long = "label", value_parser = key_value)]
        labels: Vec<(String, String)>,
        /// Only this agent and its descendants
        #[arg(long)]
        subtree: Option<String>,
    },
    /// Stop agents with the stop ladder (or SIGKILL with --force)
    Stop {
        agent_ids: Vec<String>,
        /// Stop every agent
        #[arg(long, conflicts_with = "agent_ids")]
        all: bool,
        /// SIGKILL the process group at once
        #[arg(long)]
        force: bool,
        /// Also stop every descendant agent, children first
        #[arg(long)]
        cascade: bool,
    },
    /// Counts, resource use and declared load of all agents
    Summary,
    /// Print an agent's output (both streams unless --stdout or --stderr)
    Logs {
        agent_id: String,
        /// Keep printing new output until the agent has ended
        #[arg(short, long)]
        follow: bool,
        /// Start at the last N lines of each stream
        #[arg(long, default_value_t = 0)]
        tail: u32,
        #[arg(long, conflicts_with = "stderr")]
        stdout: bool,
        #[arg(long)]
        stderr: bool,
    },
    /// Delete agents that have ended: record, folder and output
    Rm { agent_ids: Vec<String> },
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
    Watch {
        /// Only this agent; repeatable
        #[arg(long = "agent")]
        agent_ids: Vec<String>,
        /// Only children of this parent
        #[arg(long)]
        parent: Option<String>,
        /// Only this kind (spawned, exited, failed, stopping, killed, health, progress...);
        /// repeatable
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// First print the current status of every matching agent
        #[arg(long, conflicts_with = "after")]
        snapshot: bool,
        /// Resume: first replay the retained events after this sequence
        #[arg(long)]
        after: Option<u64>,
        /// With --after: end after the replay instead of going on live
        #[arg(long, requires = "after")]
        replay_only: bool,
        /// At most one health sample per agent per interval (0 for none)
        #[arg(long, value_parser = settings::parse_duration)]
        health_interval: Option<Duration>,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// On Ctrl-C leave the agent running and exit 130, instead of stopping it
    #[arg(long)]
    detach_on_interrupt: bool,
    #[command(flatten)]
    spawn: SpawnArgs,
}

#[derive(clap::Args)]
struct SpawnArgs {
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
    #[arg(long = "env", value_parser = key_value)]
    env: Vec<(String, String)>,
    /// KEY=VALUE label; repeatable
    #[arg(long = "label", value_parser = key_value)]
    labels: Vec<(String, String)>,
    /// Working directory [default: the agent's folder]
    #[arg(long)]
    cwd: Option<String>,
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
    /// Restart policy: never, on-failure or always
    #[arg(long, default_value = "never")]
    restart: String,
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
    /// The program and its arguments
    #[arg(required = true, last = true)]
    command: Vec<String>,
}

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
                None => eprintln!("agentctl: {}", one_line(&format!("{error:#}"))),
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
    let mut client = connect(&options).await?;
    let json = options.json;
    match options.command {
        // Answered above, before connecting.
        Action::Completions { .. } => {}
        Action::Run(args) => {
            let request = spawn_request(args.spawn)?;
            return ending::run(&mut client, request, args.detach_on_interrupt).await;
        }
        Action::Wait { agent_ids, timeout } => {
            let Some(statuses) = ending::wait(&mut client, &agent_ids, timeout).await? else {
                eprintln!(
                    "agentctl: still running after {:?}",
                    timeout.unwrap_or_default()
                );
                return Ok(ending::TIMED_OUT);
            };
            for status in &statuses {
                match json {
                    true => print_json(status, false),
                    false => println!(
                        "{}: {}",
                        status.agent_id,
                        one_line(&ending::how_it_ended(status))
                    ),
                }
            }
            return Ok(ending::first_failure(&statuses));
        }
        Action::Top { filter } => return top::top(client, filter).await,
        Action::Describe { agent_id } => describe::describe(&mut client, agent_id, json).await?,
        Action::Spawn(args) => {
            let request = spawn_request(*args)?;
            let response = client.spawn(request).await?.into_inner();
            if json {
                print_json(&response, true);
            } else {
                print_statuses(response.status.as_slice());
            }
        }
        Action::Status { agent_id } => {
            let request = pb::StatusRequest { agent_id };
            let response = client.status(request).await?.into_inner();
            match (json, response.status) {
                (true, Some(status)) => print_json(&status, true),
                (_, status) => print_statuses(status.as_slice()),
            }
        }
        Action::List {
            states,
            parent,
            labels,
            subtree,
        } => {
            let states = states
                .iter()
                .map(|s| parse_enum(s, "AGENT_STATE_", pb::AgentState::from_str_name))
                .collect::<anyhow::Result<_>>()?;
            let mut request = pb::ListAgentsRequest {
                states,
                parent_agent_id: parent.unwrap_or_default(),
                labels: labels.into_iter().collect(),
                subtree_of: subtree.unwrap_or_default(),
                page_size: 0,
                page_token: String::new(),
            };
            // Every page, printed as one answer.
            let mut all = pb::ListAgentsResponse::default();
            loop {
                let page = client.list_agents(request.clone()).await?.into_inner();
                all.agents.extend(page.agents);
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
            if json {
                print_json(&all, true);
            } else {
                print_statuses(&all.agents);
            }
        }
        Action::Stop {
            agent_ids,
            all,
            force,
            cascade,
        } => {
            let request = pb::CleanupRequest {
                agent_ids,
                all,
                force,
                cascade,
            };
            let response = client.cleanup(request).await?.into_inner();
            if json {
                print_json(&response, true);
            } else {
                print_stop_results(&response.results);
            }
        }
        Action::Logs {
            agent_id,
            follow,
            tail,
            stdout,
            stderr,
        } => {
            let stream = match (stdout, stderr) {
                (true, _) => pb::LogStream::Stdout,
                (_, true) => pb::LogStream::Stderr,
                _ => pb::LogStream::Unspecified,
            };
            let request = pb::StreamLogsRequest {
                agent_id,
                stream: stream.into(),
                tail,
                follow,
                ..Default::default()
            };
            let mut chunks = client.stream_logs(request).await?.into_inner();
            use std::io::Write;
            while let Some(chunk) = chunks.message().await? {
                // Raw bytes: output need not be UTF-8.
                let written = if chunk.stream == pb::LogStream::Stderr as i32 {
                    std::io::stderr().write_all(&chunk.data)
                } else {
                    std::io::stdout().write_all(&chunk.data)
                };
                if written.is_err() {
                    break;
                }
            }
        }
        Action::Rm { agent_ids } => {
            for agent_id in agent_ids {
                let response = client
                    .remove(pb::RemoveRequest {
                        agent_id: agent_id.clone(),
                    })
                    .await?
                    .into_inner();
                if json {
                    print_json(&response, false);
                } else {
                    println!("removed {agent_id}");
                }
            }
        }
        Action::Pause { agent_ids } => {
            let request = pb::PauseRequest { agent_ids };
            let response = client.pause(request).await?.into_inner();
            if json {
                print_json(&response, true);
            } else {
                print_statuses(&response.statuses);
            }
        }
        Action::Resume { agent_ids } => {
            let request = pb::ResumeRequest { agent_ids };
            let response = client.resume(request).await?.into_inner();
            if json {
                print_json(&response, true);
            } else {
                print_statuses(&response.statuses);
            }
        }
        Action::Restart { agent_ids } => {
            let request = pb::RestartRequest { agent_ids };
            let response = client.restart(request).await?.into_inner();
            if json {
                print_json(&response, true);
            } else {
                print_statuses(&response.statuses);
            }
        }
        Action::Summary => {
            let summary = client
                .get_summary(pb::GetSummaryRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&summary, true);
            } else {
                print_summary(&summary);
            }
        }
        Action::Watch {
            agent_ids,
            parent,
            kinds,
            snapshot,
            after,
            replay_only,
            health_interval,
        } => {
            let kinds = kinds
                .iter()
                .map(|k| parse_enum(k, "EVENT_KIND_", pb::EventKind::from_str_name))
                .collect::<anyhow::Result<_>>()?;
            let request = pb::WatchAgentsRequest {
                agent_ids,
                parent_agent_id: parent.unwrap_or_default(),
                kinds,
                include_snapshot: snapshot,
                after_sequence: after,
                health_interval: health_interval.map(Into::into),
                replay_only,
            };
            let mut events = client.watch_agents(request).await?.into_inner();
            while let Some(event) = events.message().await? {
                if json {
                    print_json(&event, false);
                } else {
                    print_event(&event);
                }
            }
        }
    }
    Ok(0)
}

pub type Client = AgentSupervisorClient<InterceptedService<Channel, Token>>;

/// Adds `authorization: Bearer TOKEN` to every call when a token is given.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// TLS to `address` (HOST:PORT), trusting the CA in `ca`, presenting `identity` (a
/// certificate and its key) when given.
async fn tls_channel(
    target: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> anyhow::Result<Channel> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let authority = target
        .strip_prefix("https://")
        .unwrap_or(target)
        .trim_end_matches('/')
        .to_string();
    let host = match authority.rsplit_once(':') {
        Some((host, _)) => host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        None => bail!("`{target}`: give https://HOST:PORT"),
    };
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("--ca-cert `{}`", ca.display()))?
    {
        roots
            .add(cert.with_context(|| format!("--ca-cert `{}`", ca.display()))?)
            .with_context(|| format!("--ca-cert `{}`", ca.display()))?;
    }
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|error| anyhow::anyhow!("--client-cert `{}`: {error}", cert.display()))?;
            if chain.is_empty() {
                bail!("--client-cert `{}` holds no certificate", cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(key).map_err(|error| {
                anyhow::anyhow!(
                    "--client-key `{}`: no private key read ({error})",
                    key.display()
                )
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .context("--client-cert and --client-key do not make a usable pair")?
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = ServerName::try_from(host.clone())
        .with_context(|| format!("`{host}` is not a host name or address"))?;
    let channel = Endpoint::from_shared(format!("http://{authority}"))?
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, authority, name) = (connector.clone(), authority.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(authority).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("connecting to agentd at {target} over TLS"))?;
    Ok(channel)
}

async fn connect(options: &Options) -> anyhow::Result<Client> {
    let target = match (&options.addr, &options.socket) {
        (Some(addr), _) => addr.clone(),
        (None, Some(socket)) => format!("unix://{}", socket.display()),
        (None, None) => {
            let data_dir = std::env::var_os("AGENTD_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(settings::default_data_dir);
            format!("unix://{}", settings::socket_in(&data_dir).display())
        }
    };
    let channel = match (target.starts_with("https://"), &options.ca_cert) {
        (true, Some(ca)) => {
            let identity = options
                .client_cert
                .as_deref()
                .zip(options.client_key.as_deref());
            tls_channel(&target, ca, identity).await?
        }
        (true, None) => {
            bail!("--addr {target}: give --ca-cert CA.pem (the CA of agentd's certificate)")
        }
        (false, _) => Endpoint::from_shared(target.clone())
            .with_context(|| format!("`{target}` is not a usable address"))?
            .connect()
            .await
            .with_context(|| format!("connecting to agentd at {target} (is it running?)"))?,
    };
    let token = options
        .token
        .as_deref()
        .map(|token| {
            format!("Bearer {token}")
                .parse()
                .context("--token holds characters a header cannot")
        })
        .transpose()?;
    Ok(AgentSupervisorClient::with_interceptor(
        channel,
        Token(token),
    ))
}

fn spawn_request(args: SpawnArgs) -> anyhow::Result<pb::SpawnRequest> {
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
        working_dir: args.cwd.unwrap_or_default(),
        labels: args.labels.into_iter().collect(),
        stop_policy,
        health_policy: Some(health_policy),
        restart_policy: parse_enum(
            &args.restart,
            "RESTART_POLICY_",
            pb::RestartPolicy::from_str_name,
        )?,
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
    })
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

/// Accepts `running`, `RUNNING` or the full `AGENT_STATE_RUNNING`.
fn parse_enum<E: Into<i32>>(
    text: &str,
    prefix: &str,
    parse: fn(&str) -> Option<E>,
) -> anyhow::Result<i32> {
    let upper = text.to_ascii_uppercase().replace('-', "_");
    let full = if upper.starts_with(prefix) {
        upper
    } else {
        format!("{prefix}{upper}")
    };
    match parse(&full) {
        Some(value) => Ok(value.into()),
        None => bail!(
            "`{text}` is not a known {}",
            prefix.trim_end_matches('_').to_lowercase()
        ),
    }
}

/// `AGENT_STATE_RUNNING` -> `running`.
fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_lowercase()
}

fn state_name(value: i32) -> String {
    pb::AgentState::try_from(value)
        .map(|s| enum_name(s.as_str_name(), "AGENT_STATE_"))
        .unwrap_or_else(|_| value.to_string())
}

fn health_name(value: i32) -> String {
    pb::Health::try_from(value)
        .map(|h| enum_name(h.as_str_name(), "HEALTH_"))
        .unwrap_or_else(|_| value.to_string())
}

/// Prints a message in the proto3 JSON mapping, the same JSON the HTTP API answers with.
fn print_json(message: &impl serde::Serialize, pretty: bool) {
    let printed = if pretty {
        serde_json::to_string_pretty(message)
    } else {
        serde_json::to_string(message)
    };
    match printed {
        Ok(text) => println!("{text}"),
        Err(error) => eprintln!("agentctl: cannot print JSON: {error}"),
    }
}

/// Text an agent or the daemon chose, made safe for a terminal: control characters (a
/// script's newlines, an escape sequence planted in a name or a log) written as escapes, so
/// nothing an agent writes can move the cursor, retitle the window or fake a line.
pub fn one_line(text: &str) -> String {
    // Bidirectional overrides and isolates would reorder what follows them on the line.
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    text.chars()
        .flat_map(|c| match unsafe_char(c) {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}

/// One line per row, whatever the cells hold (see [`one_line`]), and a line wider than the terminal (or `COLUMNS`) has
/// its last column cut with `…`.
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(
            rows.iter()
                .map(|row| row.iter().map(|c| one_line(c)).collect()),
        )
        .collect();
    let mut widths: Vec<usize> = vec![0; header.len()];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let columns = terminal_width();
    for row in rows {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        let line = padded.join("  ");
        let line = line.trim_end();
        match columns {
            Some(columns) if line.chars().count() > columns => {
                let cut: String = line.chars().take(columns.saturating_sub(1)).collect();
                println!("{cut}…");
            }
            _ => println!("{line}"),
        }
    }
}

/// `COLUMNS` if set, else the width of the terminal on stdout; `None` when stdout is not a
/// terminal (a pipe gets whole lines).
fn terminal_width() -> Option<usize> {
    use std::io::IsTerminal;
    if let Some(columns) = std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()) {
        return Some(columns);
    }
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given.
    let read = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut size) };
    (read == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

fn exit_text(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (_, Some(signal)) => format!("signal {signal}"),
        (Some(code), None) => code.to_string(),
        (None, None) => "-".into(),
    }
}

fn print_statuses(statuses: &[pb::AgentStatus]) {
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|s| {
            vec![
                s.agent_id.clone(),
                state_name(s.state),
                health_name(s.health),
                s.pid.to_string(),
                format!("{:.1}", s.cpu_percent),
                format!("{:.1}", s.memory_mb),
                s.num_threads.to_string(),
                format!("{:.0}s", s.runtime_seconds),
                format!("{:.0}%", s.progress),
                exit_text(s.exit_code, s.exit_signal),
                s.cmdline.join(" "),
            ]
        })
        .collect();
    print_table(
        &[
            "AGENT", "STATE", "HEALTH", "PID", "CPU%", "MEM_MB", "THREADS", "RUNTIME", "PROGRESS",
            "EXIT", "COMMAND",
        ],
        &rows,
    );
}

fn print_stop_results(results: &[pb::StopResult]) {
    let outcome = |value: i32| {
        pb::StopOutcome::try_from(value)
            .map(|o| enum_name(o.as_str_name(), "STOP_OUTCOME_"))
            .unwrap_or_else(|_| value.to_string())
    };
    let seconds = |d: Option<&pbjson_types::Duration>| {
        d.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
    };
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.agent_id.clone(),
                outcome(r.outcome),
                exit_text(r.exit_code, r.exit_signal),
                format!("{:.3}s", seconds(r.duration.as_ref())),
            ]
        })
        .collect();
    print_table(&["AGENT", "OUTCOME", "EXIT", "TOOK"], &rows);
}

fn print_summary(s: &pb::GetSummaryResponse) {
    // The proto3 JSON field names, one per line, then the unhealthy agents.
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(s) {
        for (name, value) in fields.iter().filter(|(name, _)| *name != "unhealthy") {
            println!("{name:<22} {value}");
        }
    }
    for report in &s.unhealthy {
        println!(
            "unhealthy: {} {}: {}",
            report.agent_id,
            health_name(report.health),
            one_line(&report.reason)
        );
    }
}

fn print_event(event: &pb::AgentEvent) {
    let kind = pb::EventKind::try_from(event.kind)
        .map(|k| enum_name(k.as_str_name(), "EVENT_KIND_"))
        .unwrap_or_else(|_| event.kind.to_string());
    let status = event.status.clone().unwrap_or_default();
    println!(
        "#{} {:<9} {} state={} pid={} cpu={:.1}% mem={:.1}MB exit={} {}",
        event.sequence,
        kind,
        event.agent_id,
        state_name(status.state),
        status.pid,
        status.cpu_percent,
        status.memory_mb,
        exit_text(status.exit_code, status.exit_signal),
        one_line(&event.message)
    );
}
