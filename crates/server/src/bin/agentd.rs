//! `agentd`: the per-host agent supervisor daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentd_core::{
    CgroupSetting, DaemonLimits, EventRetention, FinishedRetention, LogRotation, SandboxConfig,
    ShutdownPolicy, StoreRecovery, Supervisor, SupervisorConfig, TRACE_TARGET,
};
use agentd_proto::settings;
use agentd_server::{
    Listener, Metrics, PerAgent, Security, ServeOptions, auth, connection, gateway, notify,
    telemetry, tls,
};
use anyhow::{Context, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// Spawns AI agent processes, watches their health and stops them on request, over gRPC.
#[derive(Parser)]
#[command(name = "agentd", version)]
struct Options {
    /// Folder for the store, the agents' folders and the default socket
    /// [default: $XDG_STATE_HOME/agentd or ~/.local/state/agentd]
    #[arg(long, env = "AGENTD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket to serve on [default: DATA_DIR/agentd.sock]
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
    /// Give the Unix socket to this group with mode 0660 (else it is 0600, its owner's)
    #[arg(long, env = "AGENTD_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Also serve gRPC on this TCP address (HOST:PORT); needs --tls-cert, --tls-key and
    /// --token-file (or --insecure-listen on loopback)
    #[arg(long, env = "AGENTD_LISTEN")]
    listen: Option<String>,
    /// Serve the HTTP API (REST/JSON, server-sent events, the dashboard, /metrics, /healthz,
    /// /readyz) on this TCP address; guarded as --listen is
    #[arg(long, env = "AGENTD_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Serve only grpc.health.v1, in plaintext and without tokens, on this TCP address: for
    /// probes that cannot do TLS (Kubernetes' gRPC probe). It tells nothing but "serving"
    #[arg(long, env = "AGENTD_HEALTH_LISTEN")]
    health_listen: Option<String>,
    /// LLM providers (TOML, see README "Spend"): agentd serves their APIs to agents on
    /// loopback with a key per agent, the real keys kept here, and counts what each agent
    /// spends
    #[arg(long, env = "AGENTD_LLM_PROVIDERS")]
    llm_providers: Option<PathBuf>,
    /// The LLM gateway's address [default: 127.0.0.1 and the port it had before, else any]
    #[arg(long, env = "AGENTD_LLM_LISTEN", requires = "llm_providers")]
    llm_listen: Option<String>,
    /// PEM certificate chain for the TCP listeners (reloaded on SIGHUP)
    #[arg(long, env = "AGENTD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (reloaded on SIGHUP)
    #[arg(long, env = "AGENTD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA certificates: clients must present a certificate signed by one (mTLS)
    #[arg(long, env = "AGENTD_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Bearer tokens for the TCP listeners, one per line: `TOKEN ROLE` or `sha256:HEX ROLE`,
    /// ROLE `admin` or `read` (re-read on SIGHUP)
    #[arg(long, env = "AGENTD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Serve --listen and --http-listen without TLS or tokens, on loopback addresses only,
    /// for experiments. Only requests that name the listener (Host or :authority
    /// 127.0.0.1:PORT or localhost:PORT) are answered, and changes only without a foreign
    /// Origin and with a JSON body, so web pages cannot use it
    #[arg(long, env = "AGENTD_INSECURE_LISTEN")]
    insecure_listen: bool,
    /// Open connections per TCP listener; more are closed at once
    #[arg(long, env = "AGENTD_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Open connections per TCP listener from one client address, so that one address
    /// cannot take every place; raise it behind a proxy that connects for everyone
    /// [default: a quarter of --max-connections]
    #[arg(long, env = "AGENTD_MAX_CONNECTIONS_PER_PEER")]
    max_connections_per_peer: Option<usize>,
    /// A TCP connection with no request in flight for this long is closed (30s, 2m...); an
    /// open event stream is a request in flight. A new connection gets 10s for its TLS
    /// handshake, then at most 10s (or this, if shorter) for its first complete request
    #[arg(long, env = "AGENTD_IDLE_TIMEOUT", default_value = "60s", value_parser = settings::parse_duration)]
    idle_timeout: Duration,
    /// Watchers (WatchAgents calls and /v1/events streams) open at once
    #[arg(long, env = "AGENTD_MAX_WATCHERS", default_value_t = 1024)]
    max_watchers: usize,
    /// The largest request: a gRPC message or an HTTP body (4M, 16M...); larger ones get
    /// RESOURCE_EXHAUSTED
    #[arg(long, env = "AGENTD_MAX_REQUEST_BYTES", default_value = "4M", value_parser = settings::parse_size)]
    max_request_bytes: u64,
    /// Concurrent calls (HTTP/2 streams) per gRPC connection over TCP
    #[arg(long, env = "AGENTD_MAX_STREAMS_PER_CONNECTION", default_value_t = 128)]
    max_streams_per_connection: u32,
    /// Also export per-agent series in /metrics (agentd_agent_cpu_percent,
    /// agentd_agent_memory_bytes, agentd_agent_restarts), one set per live agent
    #[arg(long, env = "AGENTD_METRICS_PER_AGENT")]
    metrics_per_agent: bool,
    /// Agent label copied onto the per-agent series as `label_NAME`; repeatable
    #[arg(
        long = "metrics-agent-label",
        env = "AGENTD_METRICS_AGENT_LABELS",
        value_delimiter = ','
    )]
    metrics_agent_labels: Vec<String>,
    /// How often agents' CPU, memory and threads are sampled (500ms, 1s, 2s...)
    #[arg(long, env = "AGENTD_SAMPLE_INTERVAL", default_value = "1s", value_parser = settings::parse_duration)]
    sample_interval: Duration,
    /// How far back each agent's samples are kept in memory for GetAgentHistory and the
    /// dashboard's charts (10m, 1h...; 0 keeps none). A sample that changed nothing costs nothing
    #[arg(long, env = "AGENTD_HISTORY", default_value = "10m", value_parser = settings::parse_duration)]
    history: Duration,
    /// Events queued per watcher; a watcher that lets its queue fill is ended with
    /// RESOURCE_EXHAUSTED and can resume from the last sequence it got
    #[arg(long, env = "AGENTD_WATCH_BUFFER", default_value_t = 1024)]
    watch_buffer: usize,
    /// Most events kept in the log that watchers resume from
    #[arg(long, env = "AGENTD_EVENT_RETENTION_COUNT", default_value_t = 100_000)]
    event_retention_count: usize,
    /// Oldest event kept in the log (30m, 24h...)
    #[arg(long, env = "AGENTD_EVENT_RETENTION_AGE", default_value = "24h", value_parser = settings::parse_duration)]
    event_retention_age: Duration,
    /// Total declared load (`load_percentage`) of the agents this host takes
    #[arg(long, env = "AGENTD_CAPACITY", default_value_t = 100.0)]
    capacity: f64,
    /// Most agents running (or backing off to restart) at once [default: no limit]
    #[arg(long, env = "AGENTD_MAX_AGENTS")]
    max_agents: Option<usize>,
    /// On SIGTERM/SIGINT: `stop` every agent with its ladder, or `detach` and leave them
    /// running for the next agentd to adopt (upgrades without killing work)
    #[arg(long, env = "AGENTD_ON_SHUTDOWN", default_value = "stop", value_parser = ["stop", "detach"])]
    on_shutdown: String,
    /// Output an agent's stdout.log or stderr.log holds before older bytes rotate into a
    /// segment file (64M, 512K...)
    #[arg(long, env = "AGENTD_LOG_MAX_BYTES", default_value = "64M", value_parser = settings::parse_size)]
    log_max_bytes: u64,
    /// Rotated segments kept per stream
    #[arg(long, env = "AGENTD_LOG_KEEP", default_value_t = 4)]
    log_keep: usize,
    /// Agents that ended for good are removed (record, folder, output) beyond this many
    #[arg(long, env = "AGENTD_RETAIN_FINISHED_COUNT", default_value_t = 1000)]
    retain_finished_count: usize,
    /// ...and once they ended longer ago than this (7d = 168h)
    #[arg(long, env = "AGENTD_RETAIN_FINISHED_AGE", default_value = "168h", value_parser = settings::parse_duration)]
    retain_finished_age: Duration,
    /// A variable of agentd's environment to pass on to every agent (repeatable, or a comma
    /// list). Agents get only PATH, the locale (LANG, LANGUAGE, LC_ALL, LC_CTYPE), TZ, HOME,
    /// USER, LOGNAME and SHELL of the user they run as, the spawn's own `env`, and these
    #[arg(long = "pass-env", env = "AGENTD_PASS_ENV", value_delimiter = ',')]
    pass_env: Vec<String>,
    /// The users (names or uids) a spawn's `user` may name (repeatable, or a comma list).
    /// Unset: any user but root; root, uid 0 or group 0 only when listed here
    #[arg(
        long = "allow-users",
        env = "AGENTD_ALLOW_USERS",
        value_delimiter = ','
    )]
    allow_users: Vec<String>,
    /// Every agent that names no sandbox gets the default one (files: the system folders,
    /// its own folder and working dir; network PROXY with no host allowed; no capabilities;
    /// a seccomp filter). A sub-agent of a sandboxed agent always gets its parent's
    #[arg(long, env = "AGENTD_DEFAULT_SANDBOX")]
    default_sandbox: bool,
    /// NAME=ADDR: sandboxed agents' proxies answer NAME with ADDR (an IP address) without
    /// DNS, and may reach it even on loopback or a private network (repeatable, or a comma
    /// list), like curl's --resolve
    #[arg(
        long = "egress-resolve",
        env = "AGENTD_EGRESS_RESOLVE",
        value_delimiter = ','
    )]
    egress_resolve: Vec<String>,
    /// `auto`: each agent gets its own cgroup where the host allows (stops reach every
    /// descendant, limits, freezing); `off`: process groups and setrlimit only
    #[arg(long, env = "AGENTD_CGROUPS", default_value = "auto", value_parser = ["auto", "off"])]
    cgroups: String,
    /// agentd's cgroup, a path inside the hierarchy, for agentd alone [default: a child of
    /// agentd's own cgroup where it is delegated, else /agentd/<data folder, escaped>]
    #[arg(long, env = "AGENTD_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Start on an agent store that cannot be trusted (unreadable, empty while agents exist,
    /// older than its last flush), which agentd otherwise refuses: `rebuild` moves it aside
    /// to DATA_DIR/store.damaged-TIME and rebuilds each agent's record from its folder and
    /// the keeper, adopting the agents that run. A trusted store is used as it is. No
    /// environment variable: it is for one start
    #[arg(long, value_parser = ["rebuild"])]
    recover_store: Option<String>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
    /// Log lines as text, or as one JSON object per line for log shippers
    #[arg(long, env = "AGENTD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    match start() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // One line that says what to change, not a stack trace (with RUST_BACKTRACE set,
        // anyhow's report would add one).
        Err(error) => {
            eprintln!("agentd: {}", settings::error_text(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    // agentd starts its keeper (the parent of every agent) by running this binary again.
    let mut args = std::env::args_os().skip(1);
    if args
        .next()
        .is_some_and(|arg| arg == agentd_core::KEEPER_ARG)
    {
        let data_dir = PathBuf::from(args.next().context("the keeper needs a data folder")?);
        return agentd_core::run_keeper(&data_dir).context("running the keeper");
    }
    // One thread runs every task: RPCs, the supervisor, watchers. No request or event then
    // crosses threads, which measured status at 0.09 ms against 0.13 ms on the
    // multi-threaded runtime and exit events 0.1 ms sooner (BENCHMARKS.md); the sampler and
    // sled keep their own threads, and nothing on this one blocks for longer than a spawn.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(daemon(Options::parse()))
}

async fn daemon(options: Options) -> anyhow::Result<()> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // The log leaves out the spans made for traces: it reads the same with tracing on or off.
    let filter = tracing_subscriber::EnvFilter::try_new(&options.log_level)
        .with_context(|| format!("invalid --log-level `{}`", options.log_level))?
        .add_directive(format!("{TRACE_TARGET}=off").parse()?);
    let log = match options.log_format.as_str() {
        "json" => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    };
    // Traces only when the standard OTEL_* variables ask for them: agentd's own spans, and
    // warnings and errors as events of the span they happen in.
    let (provider, tracer) = match telemetry::wanted() {
        true => {
            let (provider, tracer) = telemetry::provider()?;
            (Some(provider), Some(tracer))
        }
        false => (None, None),
    };
    let mut layers = vec![log.with_filter(filter).boxed()];
    if let Some(tracer) = tracer {
        let wanted = tracing_subscriber::filter::Targets::new()
            .with_target(TRACE_TARGET, tracing::Level::INFO)
            .with_default(tracing::Level::WARN);
        // Without the source location, thread, target and busy/idle attributes on every
        // span, nor an OpenTelemetry context made current on every entry: nothing reads them.
        let traces = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(wanted);
        layers.push(traces.boxed());
    }
    // A list rather than an `Option` layer: an absent one would count as wanting everything,
    // and the spans made for traces would then be made (and every debug event tested) with
    // tracing off.
    tracing_subscriber::registry().with(layers).init();
    let result = serve(options).await;
    if let Some(provider) = provider
        && let Err(error) = provider.shutdown()
    {
        tracing::warn!(%error, "flushing the last spans");
    }
    result
}

async fn serve(options: Options) -> anyhow::Result<()> {
    if options.sample_interval < Duration::from_millis(10) {
        bail!("--sample-interval must be at least 10ms");
    }
    let security = security(&options).await?;
    // Every TCP address first: one that is taken fails the start before anything is made
    // (cgroups, the keeper, the socket).
    let (tcp_listeners, tcp_serving) = bind_tcp(&options, &security).await?;

    let data_dir = options.data_dir.unwrap_or_else(settings::default_data_dir);
    let socket = options
        .socket
        .unwrap_or_else(|| settings::socket_in(&data_dir));
    let mut config = SupervisorConfig::new(data_dir.clone());
    config.sample_interval = options.sample_interval;
    config.history = options.history;
    if !(options.capacity.is_finite() && options.capacity >= 0.0) {
        bail!("--capacity must be a non-negative number");
    }
    config.limits = DaemonLimits {
        capacity: options.capacity,
        max_agents: options.max_agents,
        on_shutdown: match options.on_shutdown.as_str() {
            "detach" => ShutdownPolicy::Detach,
            _ => ShutdownPolicy::Stop,
        },
    };
    config.log_rotation = LogRotation {
        max_bytes: options.log_max_bytes.max(4096),
        keep: options.log_keep,
    };
    config.finished_retention = FinishedRetention {
        max_count: options.retain_finished_count,
        max_age: options.retain_finished_age,
    };
    config.event_retention = EventRetention {
        max_events: options.event_retention_count.max(1),
        max_age: options.event_retention_age,
    };
    config.cgroups = CgroupSetting {
        off: options.cgroups == "off",
        root: options.cgroup_root,
    };
    config.pass_env = options.pass_env;
    config.allow_users = options.allow_users;
    config.sandbox = SandboxConfig {
        default_on: options.default_sandbox,
        egress_resolve: options.egress_resolve,
        private: vec![socket.clone()],
    };
    config.recover_store = options
        .recover_store
        .as_deref()
        .map(|_| StoreRecovery::Rebuild);
    let metrics = Arc::new(Metrics::new(PerAgent {
        enabled: options.metrics_per_agent,
        labels: options.metrics_agent_labels,
    }));
    prepare_socket_path(&socket)?;
    let gateway = match &options.llm_providers {
        Some(path) => {
            let providers = gateway::load_providers(path)?;
            let listener = gateway::bind(&data_dir, options.llm_listen.as_deref()).await?;
            config.gateway = Some(gateway::env(listener.local_addr()?, &providers));
            Some((providers, listener))
        }
        None => None,
    };
    let supervisor = Supervisor::start(config, metrics.clone())
        .with_context(|| format!("starting the supervisor in `{}`", data_dir.display()))?;
    let containment = supervisor.summary().await?.containment_detail;

    let mut listeners = vec![Listener::Unix(bind_unix(
        &socket,
        options.socket_group.as_deref(),
        &data_dir,
    )?)];
    listeners.extend(tcp_listeners);
    let mut serving = format!("unix://{}{tcp_serving}", socket.display());
    let gateway = match gateway {
        Some((providers, listener)) => {
            gateway::remember(&data_dir, &listener)?;
            serving += &format!(
                ", LLM gateway on http://{} ({})",
                listener.local_addr()?,
                gateway::names(&providers)
            );
            let spending = supervisor.spending().await?;
            let gateway =
                gateway::Gateway::new(providers, spending, supervisor.clone(), metrics.clone())?;
            tokio::spawn(gateway.clone().serve(listener));
            Some(gateway)
        }
        None => None,
    };
    reload_on_hangup(&security, gateway)?;
    println!(
        "agentd {} ready on {serving} (pid {}, data {}, agents in {containment})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        data_dir.display()
    );
    notify::notify(&format!(
        "READY=1\nSTATUS=serving on {serving}\nMAINPID={}",
        std::process::id()
    ));
    notify::keep_watchdog(supervisor.clone());

    let serve = ServeOptions {
        watch_buffer: options.watch_buffer.max(1),
        max_watchers: options.max_watchers.max(1),
        max_request_bytes: usize::try_from(options.max_request_bytes.max(1024))
            .unwrap_or(usize::MAX),
        security,
    };
    let shutdown = shutdown_signal()?;
    let shutdown = async {
        shutdown.await;
        notify::notify("STOPPING=1");
    };
    let result = agentd_server::run(listeners, supervisor, serve, metrics, shutdown).await;
    remove_socket(&socket);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds `--listen`, `--http-listen` and `--health-listen`; returns them and what the ready
/// line says of them.
async fn bind_tcp(
    options: &Options,
    security: &Security,
) -> anyhow::Result<(Vec<Listener>, String)> {
    let scheme = if security.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let bind = async |address: &str, what: &str| {
        tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("{what} `{address}`"))
    };
    let mut listeners = Vec::new();
    let mut serving = String::new();
    if let Some(address) = &options.listen {
        let listener = bind(address, "--listen").await?;
        serving += &format!(" and {scheme}://{}", listener.local_addr()?);
        listeners.push(Listener::Tcp(listener));
    }
    if let Some(address) = &options.http_listen {
        let listener = bind(address, "--http-listen").await?;
        let url = format!("{scheme}://{}", listener.local_addr()?);
        serving += &format!(", HTTP API on {url} (dashboard: {url}/)");
        listeners.push(Listener::Http(listener));
    }
    if let Some(address) = &options.health_listen {
        let listener = bind(address, "--health-listen").await?;
        serving += &format!(", health probes on {}", listener.local_addr()?);
        listeners.push(Listener::Health(listener));
    }
    Ok((listeners, serving))
}

/// How the TCP listeners are guarded. Whoever can call Spawn runs any command as agentd's
/// user: a TCP listener needs TLS and tokens, or `--insecure-listen` on loopback.
async fn security(options: &Options) -> anyhow::Result<Security> {
    let tcp: Vec<(&str, &String)> = [
        ("--listen", &options.listen),
        ("--http-listen", &options.http_listen),
    ]
    .into_iter()
    .filter_map(|(flag, address)| address.as_ref().map(|a| (flag, a)))
    .collect();
    let tls = match (&options.tls_cert, &options.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::Tls::load(tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: options.tls_client_ca.clone(),
        })?)),
        _ => None,
    };
    let guard = match &options.token_file {
        Some(path) => Some(Arc::new(auth::Guard::load(path)?)),
        None => None,
    };
    if options.insecure_listen {
        if tls.is_some() || guard.is_some() {
            bail!(
                "--insecure-listen is for experiments without TLS and tokens: drop it, or drop --tls-cert, --tls-key and --token-file"
            );
        }
        for (flag, address) in &tcp {
            let resolved: Vec<_> = tokio::net::lookup_host(address.as_str())
                .await
                .with_context(|| format!("{flag} `{address}`: not a HOST:PORT"))?
                .collect();
            if resolved.is_empty() || resolved.iter().any(|a| !a.ip().is_loopback()) {
                bail!(
                    "{flag} `{address}` is not a loopback address: --insecure-listen serves \
                     only 127.0.0.1 or [::1]; for any other address give --tls-cert, --tls-key \
                     and --token-file"
                );
            }
            tracing::warn!(
                "{flag} {address}: serving without TLS or tokens (--insecure-listen): anyone \
                 who can connect to it can run any command as this user"
            );
        }
    } else if let Some((flag, address)) = tcp.first()
        && (tls.is_none() || guard.is_none())
    {
        bail!(
            "{flag} {address} would serve agentd's control API, which runs any command as this \
             user, over TCP {}: give --tls-cert CERT.pem --tls-key KEY.pem (TLS) and \
             --token-file TOKENS (one `TOKEN admin|read` per line), see README, \"Security\"; \
             for a loopback experiment, --insecure-listen",
            match (tls.is_some(), guard.is_some()) {
                (false, false) => "without TLS or tokens",
                (false, true) => "without TLS (tokens would cross the network in clear)",
                _ => "without tokens",
            }
        );
    }
    Ok(Security {
        tls,
        guard,
        connections: connection::Limits {
            max_connections: options.max_connections.max(1),
            max_per_peer: options
                .max_connections_per_peer
                .unwrap_or(options.max_connections / 4)
                .max(1),
            idle_timeout: options.idle_timeout.max(Duration::from_millis(100)),
        },
        max_streams: options.max_streams_per_connection.max(1),
    })
}

/// On SIGHUP: the certificate, key and client CA, and the token file, read again. A file
/// that does not load leaves what is in use, and says why in the log.
fn reload_on_hangup(
    security: &Security,
    gateway: Option<Arc<gateway::Gateway>>,
) -> anyhow::Result<()> {
    let mut hangups = signal(SignalKind::hangup()).context("listening for SIGHUP")?;
    let security = security.clone();
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            if let Some(gateway) = &gateway {
                gateway::reload_keys(gateway);
            }
            if security.tls.is_none() && security.guard.is_none() && gateway.is_none() {
                tracing::info!("SIGHUP: no TLS files or token file to read again");
            }
            if let Some(tls) = &security.tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                    Err(error) => tracing::error!(
                        "SIGHUP: TLS files not reloaded, the old ones stay: {error:#}"
                    ),
                }
            }
            if let Some(guard) = &security.guard {
                match guard.reload() {
                    Ok(count) => tracing::info!("SIGHUP: token file reloaded ({count} tokens)"),
                    Err(error) => tracing::error!(
                        "SIGHUP: token file not reloaded, the old tokens stay: {error:#}"
                    ),
                }
            }
        }
    });
    Ok(())
}

/// Before anything starts: the socket's folder must be agentd's user's (or root's), closed
/// to others' writes all the way up (they could move the socket away and put their own in
/// its place), and nothing but a stale socket may stand at its path: that one is removed,
/// anything else is left as it is and refused.
fn prepare_socket_path(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
    let parent = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .with_context(|| format!("creating `{}`", parent.display()))?;
    let parent = std::fs::canonicalize(parent)
        .with_context(|| format!("resolving `{}`", parent.display()))?;
    agentd_core::check_folder(&parent, true)
        .map_err(|problem| anyhow::anyhow!("refusing the socket's folder: {problem}"))?;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "`{}` exists and is not a socket: agentd does not replace it; remove it yourself \
                 or give --socket another path",
                path.display()
            );
        }
        if let Ok(stream) = std::os::unix::net::UnixStream::connect(path) {
            let pid =
                nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
                    .map(|peer| format!(" (pid {})", peer.pid()))
                    .unwrap_or_default();
            bail!(
                "another agentd{pid} runs and serves on `{}`: stop it first, or give this one \
                 another --socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket `{}`", path.display()))?;
    }
    Ok(())
}

/// Binds the Unix socket (see [`prepare_socket_path`]) with mode 0600, or 0660 and the group
/// with `--socket-group`.
fn bind_unix(
    path: &Path,
    group: Option<&str>,
    data_dir: &Path,
) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let parent = path.parent().unwrap_or(Path::new("."));
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding socket `{}`", path.display()))?;
    let mode = match group {
        None => 0o600,
        Some(name) => {
            let group = nix::unistd::Group::from_name(name)
                .with_context(|| format!("--socket-group `{name}`: looking it up"))?
                .with_context(|| format!("--socket-group `{name}`: no such group"))?;
            nix::unistd::chown(path, None, Some(group.gid))
                .with_context(|| format!("giving socket `{}` to group `{name}`", path.display()))?;
            // The data folder is private: the group must be able to pass through it (not
            // list it) to reach the socket.
            if std::fs::canonicalize(parent).ok() == std::fs::canonicalize(data_dir).ok() {
                std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711))
                    .with_context(|| {
                        format!("letting group `{name}` reach `{}`", path.display())
                    })?;
            }
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of socket `{}`", path.display()))?;
    Ok(listener)
}

/// Removes the socket at shutdown, if a socket still stands there.
fn remove_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// Completes on the first SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}
