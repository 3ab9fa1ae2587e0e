//! `agentd`: the per-host agent supervisor daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use agentd_core::{
    CgroupSetting, DaemonLimits, EventRetention, FinishedRetention, LogRotation, ShutdownPolicy,
    Supervisor, SupervisorConfig,
};
use agentd_server::{Listener, Metrics, PerAgent, ServeOptions, settings};
use anyhow::{Context, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

/// Spawns AI agent processes, watches their health and stops them on request, over gRPC.
#[derive(Parser)]
#[command(version)]
struct Options {
    /// Folder for the store, the agents' folders and the default socket
    /// [default: $XDG_STATE_HOME/agentd or ~/.local/state/agentd]
    #[arg(long, env = "AGENTD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Unix socket to serve on [default: DATA_DIR/agentd.sock]
    #[arg(long, env = "AGENTD_SOCKET")]
    socket: Option<PathBuf>,
    /// Also serve on this TCP address (HOST:PORT), without authentication
    #[arg(long, env = "AGENTD_LISTEN")]
    listen: Option<String>,
    /// Serve the HTTP API (REST/JSON, server-sent events, /metrics, /healthz, /readyz) on
    /// this loopback address (127.0.0.1:PORT or [::1]:PORT); it has no authentication yet
    #[arg(long, env = "AGENTD_HTTP_LISTEN")]
    http_listen: Option<String>,
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
    /// `auto`: each agent gets its own cgroup where the host allows (stops reach every
    /// descendant, limits, freezing); `off`: process groups and setrlimit only
    #[arg(long, env = "AGENTD_CGROUPS", default_value = "auto", value_parser = ["auto", "off"])]
    cgroups: String,
    /// agentd's cgroup, a path inside the hierarchy, for agentd alone [default: a child of
    /// agentd's own cgroup where it is delegated, else /agentd/<data folder, escaped>]
    #[arg(long, env = "AGENTD_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive list
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> anyhow::Result<()> {
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&options.log_level)
                .with_context(|| format!("invalid --log-level `{}`", options.log_level))?,
        )
        .with_writer(std::io::stderr)
        .init();
    if options.sample_interval < Duration::from_millis(10) {
        bail!("--sample-interval must be at least 10ms");
    }

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
    if let Some(address) = &options.http_listen {
        only_loopback(address).await?;
    }
    let metrics = Arc::new(Metrics::new(PerAgent {
        enabled: options.metrics_per_agent,
        labels: options.metrics_agent_labels,
    }));
    let supervisor = Supervisor::start(config, metrics.clone())
        .with_context(|| format!("starting the supervisor in `{}`", data_dir.display()))?;
    let containment = supervisor.summary().await?.containment_detail;

    let mut listeners = vec![Listener::Unix(bind_unix(&socket)?)];
    let mut serving = format!("unix://{}", socket.display());
    if let Some(address) = &options.listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on `{address}`"))?;
        serving += &format!(" and http://{}", listener.local_addr()?);
        listeners.push(Listener::Tcp(listener));
    }
    if let Some(address) = &options.http_listen {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening for HTTP on `{address}`"))?;
        serving += &format!(", HTTP API on http://{}", listener.local_addr()?);
        listeners.push(Listener::Http(listener));
    }
    println!(
        "agentd {} ready on {serving} (pid {}, data {}, agents in {containment})",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        data_dir.display()
    );

    let serve = ServeOptions {
        watch_buffer: options.watch_buffer.max(1),
    };
    let result =
        agentd_server::run(listeners, supervisor, serve, metrics, shutdown_signal()?).await;
    let _ = std::fs::remove_file(&socket);
    result?;
    tracing::info!("stopped");
    Ok(())
}

/// The HTTP API has no authentication yet: it may listen on loopback addresses only.
async fn only_loopback(address: &str) -> anyhow::Result<()> {
    let resolved: Vec<_> = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("--http-listen `{address}`: not a HOST:PORT"))?
        .collect();
    if resolved.is_empty() || resolved.iter().any(|a| !a.ip().is_loopback()) {
        bail!(
            "--http-listen `{address}` is not a loopback address: the HTTP API has no \
             authentication yet, so it serves only 127.0.0.1 or [::1] (reach it from \
             elsewhere through an SSH tunnel or a proxy that authenticates)"
        );
    }
    Ok(())
}

/// Binds the Unix socket with mode 0600, replacing a stale socket but never a live one.
fn bind_unix(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("another agentd is already serving on `{}`", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket `{}`", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating `{}`", parent.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding socket `{}`", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting socket `{}` to its owner", path.display()))?;
    Ok(listener)
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
