//! Every workload of the benchmark (BENCHMARKS.md), driven from a Rust gRPC client against a
//! release `agentd` on a temporary socket and data folder. Each workload starts its own daemon.
//! Prints a table, or one JSON object of rows with `--json` (which `tests/bench/compare.py`
//! shows as the "agentd (Rust)" column next to the Python-driven peers).
//!
//! ```sh
//! cargo bench -p agentd-server --bench agentd                 # N=200,1000, 1000 and 10k idle,
//!                                                              # 10 rounds of 1000 short agents
//! cargo bench -p agentd-server --bench agentd -- --smoke      # tiny N, a few seconds
//! AGENTD_BENCH_BINARY=/path/to/older/agentd cargo bench ...   # the same rows, another build
//! ```
//!
//! Nothing here asserts a timing; it only fails when agentd does something wrong (an RPC
//! error, a lost event, an agent that did not run).

#![allow(clippy::disallowed_methods)] // it waits for the daemons it starts

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentd_proto::v1 as pb;
use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use pb::agent_supervisor_client::AgentSupervisorClient;
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

type Client = AgentSupervisorClient<Channel>;

#[derive(Parser)]
struct Options {
    /// Agent counts for the spawn, status, list and stop rows.
    #[arg(long, value_delimiter = ',', default_value = "200,1000")]
    n: Vec<usize>,
    /// Sequential spawns for the one-in-flight latency rows.
    #[arg(long, default_value_t = 200)]
    latency_spawns: usize,
    /// Status calls for the status rows.
    #[arg(long, default_value_t = 5000)]
    status_calls: usize,
    /// Exit-visibility trials.
    #[arg(long, default_value_t = 100)]
    trials: usize,
    /// Agents that ignore SIGTERM, stopped with a 2 s grace.
    #[arg(long, default_value_t = 100)]
    stubborn: usize,
    /// Agent counts for the idle-cost rows.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    idle: Vec<usize>,
    #[arg(long, default_value_t = 30.0)]
    idle_seconds: f64,
    /// Watchers for the fan-out rows.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Agents spawned and stopped while the watchers watch.
    #[arg(long, default_value_t = 1000)]
    fanout: usize,
    /// Agents per round of the memory-under-churn rows.
    #[arg(long, default_value_t = 1000)]
    churn: usize,
    /// Rounds of the memory-under-churn rows; RSS is reported after rounds 1, 5 and 10.
    #[arg(long, default_value_t = 10)]
    churn_rounds: usize,
    /// Requests in flight for the wall-time rows.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Sandboxed agents (each its own namespaces and proxy) run at once for the sandboxed
    /// fleet rows.
    #[arg(long, default_value_t = 1000)]
    sandboxed: usize,
    /// Print the rows as one JSON object.
    #[arg(long)]
    json: bool,
    /// Tiny sizes, so CI can check that the program still works.
    #[arg(long)]
    smoke: bool,
    /// Accepted for `cargo bench`, which passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// A release `agentd` on its own temporary socket and data folder, killed on drop.
struct Daemon {
    process: Child,
    socket: PathBuf,
    /// The HTTP API's `HOST:PORT`.
    http: Option<String>,
    data_dir: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// A daemon that keeps every event, so a fan-out watcher can never be told it fell behind,
    /// with its HTTP API.
    async fn start() -> Result<Daemon> {
        Daemon::start_with(&[
            "--event-retention-count",
            "1000000",
            "--http-listen",
            "127.0.0.1:0",
            "--insecure-listen",
        ])
        .await
    }

    async fn start_with(options: &[&str]) -> Result<Daemon> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("agentd.sock");
        // Another agentd (an earlier build) to measure against: `AGENTD_BENCH_BINARY`.
        let binary = std::env::var_os("AGENTD_BENCH_BINARY")
            .map_or_else(|| env!("CARGO_BIN_EXE_agentd").into(), PathBuf::from);
        let mut process = Command::new(binary)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--socket")
            .arg(&socket)
            .args(["--log-level", "warn"])
            .args(options)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting agentd")?;
        // Ready once it says so: the socket file exists a moment before it accepts.
        let stdout = process.stdout.take().context("agentd's stdout")?;
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                .map(|_| line)
        });
        let data_dir = dir.path().join("data");
        let mut daemon = Daemon {
            process,
            socket,
            http: None,
            data_dir,
            _dir: dir,
        };
        let line = tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .context("agentd did not become ready")???;
        ensure!(line.contains("ready"), "agentd did not start: {line:?}");
        daemon.http = line
            .split_once("HTTP API on http://")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(|address| address.trim_end_matches(',').to_string());
        Ok(daemon)
    }

    async fn client(&self) -> Result<Client> {
        let channel = Endpoint::from_shared(format!("unix://{}", self.socket.display()))?
            .connect()
            .await?;
        Ok(AgentSupervisorClient::new(channel).max_decoding_message_size(256 << 20))
    }

    /// The keeper agentd started (the parent of every agent), found by the variable in its
    /// environment.
    fn keeper(&self) -> Result<u32> {
        let marker = format!(
            "{}={}",
            agentd_core::KEEPER_DIR_VAR,
            std::fs::canonicalize(&self.data_dir)?.display()
        );
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ
                .split(|&b| b == 0)
                .any(|var| var == marker.as_bytes())
            {
                return Ok(pid);
            }
        }
        bail!("no keeper runs for {}", self.data_dir.display())
    }

    /// Asks agentd to shut down: it stops what is left, and its exit ends every stream.
    fn terminate(&self) -> Result<()> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.process.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(())
    }

    /// Stops every agent at once and waits for agentd to exit.
    async fn close(mut self) -> Result<()> {
        stop_all(&mut self.client().await?, true).await?;
        self.terminate()?;
        self.process.wait()?;
        Ok(())
    }
}

/// One Cleanup of every agent (with the ladder, or SIGKILL when `force`); returns how long
/// it took to answer, which is once every agent has ended.
async fn stop_all(client: &mut Client, force: bool) -> Result<Duration> {
    let started = Instant::now();
    client
        .cleanup(pb::CleanupRequest {
            all: true,
            force,
            ..Default::default()
        })
        .await?;
    Ok(started.elapsed())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn sleeper(agent_id: String) -> pb::SpawnRequest {
    pb::SpawnRequest {
        agent_id,
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

fn ms(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}

fn pct(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() as f64 * p / 100.0) as usize).min(values.len() - 1)]
}

/// Adds the rows "{what} p50 (ms){context}" and "{what} p99 (ms){context}".
fn insert_percentiles(rows: &mut Rows, what: &str, context: &str, values: &mut [f64]) {
    for p in [50, 99] {
        rows.insert(
            format!("{what} p{p} (ms){context}"),
            pct(values, f64::from(p)),
        );
    }
}

/// Spawns with `in_flight` requests outstanding; returns the wall time until every Spawn
/// answered, which agentd does once the agent is RUNNING.
async fn spawn_all(
    client: &Client,
    requests: Vec<pb::SpawnRequest>,
    in_flight: usize,
) -> Result<Duration> {
    let permits = Arc::new(Semaphore::new(in_flight));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for request in requests {
        let permit = permits.clone().acquire_owned().await?;
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let answer = client.spawn(request).await;
            drop(permit);
            answer
        }));
    }
    for task in tasks {
        let status = task.await??.into_inner().status.unwrap_or_default();
        ensure!(
            status.state == pb::AgentState::Running as i32,
            "agent {} is {:?}, not running",
            status.agent_id,
            status.state()
        );
    }
    Ok(started.elapsed())
}

/// One-in-flight spawn latencies in milliseconds.
async fn spawn_latencies(client: &mut Client, prefix: &str, count: usize) -> Result<Vec<f64>> {
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let started = Instant::now();
        client.spawn(sleeper(format!("{prefix}-{i}"))).await?;
        latencies.push(ms(started.elapsed()));
    }
    Ok(latencies)
}

type Rows = BTreeMap<String, f64>;

async fn spawn_status_list_stop(options: &Options, n: usize, rows: &mut Rows) -> Result<()> {
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let wall = spawn_all(
        &client,
        (0..n).map(|i| sleeper(format!("s-{i}"))).collect(),
        options.in_flight,
    )
    .await?;
    rows.insert(
        format!(
            "spawn {n} until running, wall (s), {} in flight",
            options.in_flight
        ),
        wall.as_secs_f64(),
    );
    // gRPC Status and HTTP GET /v1/agents/{id} take turns, each on a kept-alive connection.
    let http = HttpClient::new(daemon.http.as_deref().context("no HTTP API")?);
    let mut status = Vec::with_capacity(options.status_calls);
    let mut http_status = Vec::with_capacity(options.status_calls);
    for i in 0..options.status_calls {
        let agent_id = format!("s-{}", i % n);
        let started = Instant::now();
        client
            .status(pb::StatusRequest {
                agent_id: agent_id.clone(),
            })
            .await?;
        status.push(ms(started.elapsed()));
        let started = Instant::now();
        let body = http.get(&format!("/v1/agents/{agent_id}")).await?;
        http_status.push(ms(started.elapsed()));
        ensure!(
            body.starts_with(b"{\"agentId\""),
            "HTTP status answered {body:?}"
        );
    }
    insert_percentiles(rows, "status", &format!(", {n} agents"), &mut status);
    insert_percentiles(
        rows,
        "status via HTTP GET /v1/agents/{id}",
        &format!(", {n} agents"),
        &mut http_status,
    );
    let started = Instant::now();
    let listed = client
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents
        .len();
    rows.insert(
        format!("list all {n} with status (ms)"),
        ms(started.elapsed()),
    );
    ensure!(listed == n, "listed {listed} of {n} agents");
    let stopped = stop_all(&mut client, false).await?;
    rows.insert(
        format!("stop {n} obeying SIGTERM (s)"),
        stopped.as_secs_f64(),
    );
    daemon.close().await
}

/// The same daemon options with a cgroup per agent (where the host has cgroups) and
/// without: the row suffix, and the options.
const CONTAINMENTS: [(&str, &[&str]); 2] = [("", &[]), (", no cgroups", &["--cgroups", "off"])];

/// Spawn latency with a cgroup per agent and without: one daemon each, spawns taking turns
/// between them, so that the disk's flush latency (which varies by milliseconds from one
/// minute to the next on this VM) weighs on both alike.
async fn spawn_latency(options: &Options, rows: &mut Rows) -> Result<()> {
    let mut daemons = Vec::new();
    for (suffix, flags) in CONTAINMENTS {
        let daemon = Daemon::start_with(flags).await?;
        let client = daemon.client().await?;
        daemons.push((
            suffix,
            daemon,
            client,
            Vec::with_capacity(options.latency_spawns),
        ));
    }
    for i in 0..options.latency_spawns {
        for (_, _, client, latencies) in &mut daemons {
            let started = Instant::now();
            client.spawn(sleeper(format!("l-{i}"))).await?;
            latencies.push(ms(started.elapsed()));
        }
    }
    // Each spawn with a cgroup against the one without that followed it: the cgroup's own
    // cost, with less of the disk's noise than the difference of two medians.
    let mut differences: Vec<f64> = daemons[0]
        .3
        .iter()
        .zip(&daemons[1].3)
        .map(|(with, without)| with - without)
        .collect();
    differences.sort_by(f64::total_cmp);
    rows.insert(
        "spawn: with a cgroup minus without, median of pairs (ms)".into(),
        differences
            .get(differences.len() / 2)
            .copied()
            .unwrap_or(0.0),
    );
    for (suffix, daemon, _, mut latencies) in daemons {
        insert_percentiles(
            rows,
            "spawn",
            &format!(", 1 in flight{suffix}"),
            &mut latencies,
        );
        daemon.close().await?;
    }
    Ok(())
}

/// Spawn latency of sandboxed agents (the default sandbox: Landlock, mount and network
/// namespaces, seccomp, and a proxy served into each namespace) against plain ones, taking
/// turns on one daemon; then the time to stop all of them (the namespaces torn down). Needs
/// root; without it the rows are left out and a line says so.
async fn sandbox_cost(options: &Options, rows: &mut Rows) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("sandbox rows left out: sandboxes need agentd to run as root");
        return Ok(());
    }
    let daemon = Daemon::start_with(&[]).await?;
    let mut client = daemon.client().await?;
    let (mut plain, mut boxed) = (Vec::new(), Vec::new());
    for i in 0..options.latency_spawns {
        let started = Instant::now();
        client.spawn(sleeper(format!("plain-{i}"))).await?;
        plain.push(ms(started.elapsed()));
        let started = Instant::now();
        client
            .spawn(pb::SpawnRequest {
                sandbox: Some(pb::Sandbox::default()),
                ..sleeper(format!("boxed-{i}"))
            })
            .await?;
        boxed.push(ms(started.elapsed()));
    }
    let mut differences: Vec<f64> = boxed.iter().zip(&plain).map(|(b, p)| b - p).collect();
    differences.sort_by(f64::total_cmp);
    rows.insert(
        "spawn: default sandbox (PROXY) minus none, median of pairs (ms)".into(),
        differences
            .get(differences.len() / 2)
            .copied()
            .unwrap_or(0.0),
    );
    insert_percentiles(rows, "spawn", ", 1 in flight, default sandbox", &mut boxed);
    let stopped = stop_all(&mut client, true).await?;
    rows.insert(
        format!(
            "stop: {} sandboxed and {} plain agents, SIGKILL (ms)",
            options.latency_spawns, options.latency_spawns
        ),
        ms(stopped),
    );
    daemon.close().await
}

/// The agent stamps the wall clock in nanoseconds and exits; the delay runs from that stamp
/// until the EXITED event reaches the client.
async fn exit_visible(options: &Options, rows: &mut Rows) -> Result<()> {
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let stamps = tempfile::tempdir()?;
    let mut delays = Vec::with_capacity(options.trials);
    for i in 0..options.trials {
        let agent_id = format!("exit-{i}");
        let stamp = stamps.path().join(&agent_id);
        let mut events = client
            .watch_agents(pb::WatchAgentsRequest {
                agent_ids: vec![agent_id.clone()],
                kinds: vec![pb::EventKind::Exited as i32],
                ..Default::default()
            })
            .await?
            .into_inner();
        client
            .spawn(pb::SpawnRequest {
                agent_id,
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("date +%s%N > {}", stamp.display()),
                ],
                ..Default::default()
            })
            .await?;
        events.message().await?.context("the watch ended")?;
        let seen = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let stamped: u128 = std::fs::read_to_string(&stamp)?.trim().parse()?;
        delays.push(seen.saturating_sub(stamped) as f64 / 1e6);
    }
    insert_percentiles(rows, "exit visible", "", &mut delays);
    daemon.close().await
}

async fn stop_stubborn(options: &Options, rows: &mut Rows) -> Result<()> {
    let daemon = Daemon::start().await?;
    let mut client = daemon.client().await?;
    let requests = (0..options.stubborn)
        .map(|i| pb::SpawnRequest {
            agent_id: format!("stubborn-{i}"),
            command: vec![
                "sh".into(),
                "-c".into(),
                "trap '' TERM; exec sleep 3600".into(),
            ],
            stop_policy: Some(pb::StopPolicy {
                first_grace: Some(pbjson_types::Duration {
                    seconds: 2,
                    nanos: 0,
                }),
                second_grace: Some(pbjson_types::Duration::default()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    spawn_all(&client, requests, options.in_flight).await?;
    let stopped = stop_all(&mut client, false).await?;
    rows.insert(
        format!("stop {} ignoring SIGTERM, 2 s grace (s)", options.stubborn),
        stopped.as_secs_f64(),
    );
    daemon.close().await
}

/// User plus system CPU seconds of a process, and its resident memory in MB.
fn cpu_and_rss(pid: u32) -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("odd /proc stat")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    // CLK_TCK is 100 on every Linux this runs on; sysconf would say the same.
    Ok((ticks / 100.0, rss_kb / 1024.0))
}

/// The host's busy and total CPU time so far, in ticks (`/proc/stat`; idle and iowait are
/// not busy).
fn host_cpu() -> Result<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .take(8) // guest time is counted in user time already
        .map(str::parse::<f64>)
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(ticks.len() >= 5, "short cpu line in /proc/stat");
    let total: f64 = ticks.iter().sum();
    Ok((total - ticks[3] - ticks[4], total))
}

/// This benchmark's own user plus system CPU seconds.
fn own_cpu() -> Result<f64> {
    Ok(cpu_and_rss(std::process::id())?.0)
}

async fn idle_cost(
    options: &Options,
    n: usize,
    (suffix, flags): (&str, &[&str]),
    rows: &mut Rows,
) -> Result<()> {
    let daemon = Daemon::start_with(flags).await?;
    let mut client = daemon.client().await?;
    let (pid, keeper) = (daemon.process.id(), daemon.keeper()?);
    let (agentd_before, keeper_before) = (cpu_and_rss(pid)?.0, cpu_and_rss(keeper)?.0);
    let (host_before, own_before) = (host_cpu()?, own_cpu()?);
    let took = spawn_all(
        &client,
        (0..n).map(|i| sleeper(format!("idle-{i}"))).collect(),
        options.in_flight,
    )
    .await?;
    let (host_after, own_after) = (host_cpu()?, own_cpu()?);
    let label = format!("{n} idle agents{suffix}");
    let spawn = format!("{label}: spawn, {} in flight", options.in_flight);
    rows.insert(format!("{spawn} (s)"), took.as_secs_f64());
    // Whether the storm is bound by the CPU, and whose: per spawn, in CPU milliseconds.
    let per_spawn = |seconds: f64| seconds * 1000.0 / n as f64;
    rows.insert(
        format!("{spawn}: host CPU busy (% of all cores)"),
        (host_after.0 - host_before.0) / (host_after.1 - host_before.1) * 100.0,
    );
    rows.insert(
        format!("{spawn}: agentd CPU per spawn (ms)"),
        per_spawn(cpu_and_rss(pid)?.0 - agentd_before),
    );
    rows.insert(
        format!("{spawn}: keeper CPU per spawn (ms)"),
        per_spawn(cpu_and_rss(keeper)?.0 - keeper_before),
    );
    rows.insert(
        format!("{spawn}: bench client CPU per spawn (ms)"),
        per_spawn(own_after - own_before),
    );
    idle_rows(&daemon, &label, options, rows).await?;
    let stopped = stop_all(&mut client, false).await?;
    rows.insert(
        format!("{label}: stop all, SIGTERM (s)"),
        stopped.as_secs_f64(),
    );
    daemon.close().await
}

/// The supervisor's and the keeper's RSS and CPU over `--idle-seconds`, as rows named
/// `label: ...`.
async fn idle_rows(daemon: &Daemon, label: &str, options: &Options, rows: &mut Rows) -> Result<()> {
    let (pid, keeper) = (daemon.process.id(), daemon.keeper()?);
    let (before, _) = cpu_and_rss(pid)?;
    let (keeper_before, _) = cpu_and_rss(keeper)?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(options.idle_seconds)).await;
    let (after, rss) = cpu_and_rss(pid)?;
    let (keeper_after, keeper_rss) = cpu_and_rss(keeper)?;
    let seconds = started.elapsed().as_secs_f64();
    rows.insert(format!("{label}: supervisor RSS (MB)"), rss);
    rows.insert(
        format!("{label}: supervisor CPU (% of a core)"),
        (after - before) / seconds * 100.0,
    );
    rows.insert(format!("{label}: keeper RSS (MB)"), keeper_rss);
    rows.insert(
        format!("{label}: keeper CPU (% of a core)"),
        (keeper_after - keeper_before) / seconds * 100.0,
    );
    Ok(())
}

/// `--sandboxed` agents with the default sandbox (each its own mount and network namespace,
/// and a proxy served into it) at once: the wall time to spawn them, agentd's cost while they
/// idle, and the time to stop them all. Needs root.
async fn sandboxed_fleet(options: &Options, rows: &mut Rows) -> Result<()> {
    let n = options.sandboxed;
    if n == 0 || !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let daemon = Daemon::start_with(&[]).await?;
    let mut client = daemon.client().await?;
    let requests = (0..n).map(|i| pb::SpawnRequest {
        sandbox: Some(pb::Sandbox::default()),
        ..sleeper(format!("boxed-{i}"))
    });
    let took = spawn_all(&client, requests.collect(), options.in_flight).await?;
    let label = format!("{n} sandboxed agents");
    rows.insert(
        format!("{label}: spawn, {} in flight (ms)", options.in_flight),
        ms(took),
    );
    idle_rows(&daemon, &format!("{label}, idle"), options, rows).await?;
    rows.insert(
        format!("{label}: stop all, SIGKILL (ms)"),
        ms(stop_all(&mut client, true).await?),
    );
    daemon.close().await
}

/// Rounds of short agents spawned and stopped, default retention: agentd's resident memory
/// must level off, not grow with every agent it has ever run. RSS is read once retention has
/// brought the agents it keeps back to its limit, so every round is measured holding the same
/// number of agents.
async fn churn(options: &Options, rows: &mut Rows) -> Result<()> {
    let daemon = Daemon::start_with(&[]).await?;
    let mut client = daemon.client().await?;
    let pid = daemon.process.id();
    rows.insert(
        "churn: RSS of a fresh daemon (MB)".into(),
        cpu_and_rss(pid)?.1,
    );
    let n = options.churn;
    for round in 1..=options.churn_rounds {
        let agents = (0..n).map(|i| sleeper(format!("churn-{round}-{i}")));
        spawn_all(&client, agents.collect(), options.in_flight).await?;
        stop_all(&mut client, false).await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .get_summary(pb::GetSummaryRequest {})
            .await?
            .into_inner()
            .total as usize
            > RETAINED_FINISHED.max(n)
        {
            ensure!(
                Instant::now() < deadline,
                "retention never removed old agents"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if [1, 5, 10].contains(&round) {
            let rss = cpu_and_rss(pid)?.1;
            rows.insert(format!("churn: RSS after {round} x {n} agents (MB)"), rss);
        }
    }
    daemon.close().await
}

/// agentd's default `--retain-finished-count`.
const RETAINED_FINISHED: usize = 1000;

/// What one watcher received: every sequence number in order, and when each arrived.
type Watched = Vec<(u64, Instant)>;

async fn watch_everything(mut client: Client) -> Result<tokio::task::JoinHandle<Watched>> {
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest::default())
        .await?
        .into_inner();
    Ok(tokio::spawn(async move {
        let mut watched = Vec::new();
        while let Ok(Some(event)) = events.message().await {
            watched.push((event.sequence, Instant::now()));
        }
        watched
    }))
}

/// An SSE client of `/v1/events`: the `id:` of every event, as a browser reads them.
async fn follow_events(http: HttpClient) -> Result<tokio::task::JoinHandle<Watched>> {
    use http_body_util::BodyExt;
    let mut body = http.open("/v1/events").await?;
    Ok(tokio::spawn(async move {
        let mut watched = Vec::new();
        let mut partial = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            partial.extend_from_slice(&data);
            let complete = partial
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let now = Instant::now();
            for line in partial[..complete].split(|&b| b == b'\n') {
                let id = line
                    .strip_prefix(b"id: ")
                    .and_then(|id| std::str::from_utf8(id).ok());
                if let Some(sequence) = id.and_then(|id| id.parse().ok()) {
                    watched.push((sequence, now));
                }
            }
            partial.drain(..complete);
        }
        watched
    }))
}

/// What a set of watchers received between `started` and the last arrival: events per
/// second over the whole run and over its last part (from `stopping`, when every agent is
/// stopped at once and events come faster than during the spawns), and events lost (a
/// watcher of everything sees sequences go up by one).
async fn tally(
    watchers: Vec<tokio::task::JoinHandle<Watched>>,
    started: Instant,
    stopping: Instant,
) -> Result<(f64, f64, u64)> {
    let (mut delivered, mut delivered_stopping, mut lost, mut finished) = (0, 0, 0, started);
    for watcher in watchers {
        let watched = tokio::time::timeout(Duration::from_secs(120), watcher)
            .await
            .context("a watcher never finished")??;
        let (Some(&(first, _)), Some(&(last, arrived))) = (watched.first(), watched.last()) else {
            bail!("a watcher received nothing");
        };
        lost += (last - first + 1) - watched.len() as u64;
        delivered += watched.len();
        delivered_stopping += watched.iter().filter(|(_, at)| *at >= stopping).count();
        finished = finished.max(arrived);
    }
    let rate = |count: usize, since: Instant| count as f64 / (finished - since).as_secs_f64();
    Ok((
        rate(delivered, started),
        rate(delivered_stopping, stopping),
        lost,
    ))
}

/// Spawn latency with and without watchers, then `fanout` agents spawned and stopped while
/// every watcher watches every event: delivery rate, and a check that nobody missed one.
/// Once with gRPC watchers alone, once with as many SSE clients of `/v1/events` beside them.
async fn fan_out(options: &Options, rows: &mut Rows) -> Result<()> {
    let subscribers = options.subscribers;
    for with_sse in [false, true] {
        let daemon = Daemon::start().await?;
        let mut client = daemon.client().await?;
        if !with_sse {
            let mut alone = spawn_latencies(&mut client, "alone", options.latency_spawns).await?;
            insert_percentiles(rows, "fan-out: spawn", ", no watchers", &mut alone);
            stop_all(&mut client, true).await?;
        }
        let mut watchers = Vec::with_capacity(subscribers);
        let mut followers = Vec::new();
        for _ in 0..subscribers {
            watchers.push(watch_everything(daemon.client().await?).await?);
        }
        let context = match with_sse {
            false => format!(", {subscribers} watchers"),
            true => {
                let http = HttpClient::new(daemon.http.as_deref().context("no HTTP API")?);
                for _ in 0..subscribers {
                    followers.push(follow_events(http.clone()).await?);
                }
                format!(", {subscribers} gRPC watchers + {subscribers} SSE clients")
            }
        };
        if !with_sse {
            let mut watched =
                spawn_latencies(&mut client, "watched", options.latency_spawns).await?;
            insert_percentiles(rows, "fan-out: spawn", &context, &mut watched);
        }
        let started = Instant::now();
        spawn_all(
            &client,
            (0..options.fanout)
                .map(|i| sleeper(format!("burst-{i}")))
                .collect(),
            options.in_flight,
        )
        .await?;
        let stopping = Instant::now();
        stop_all(&mut client, false).await?;
        let over = started.elapsed();
        let (_, rss) = cpu_and_rss(daemon.process.id())?;
        daemon.terminate()?;
        let what = format!("{} spawned and stopped{context}", options.fanout);
        rows.insert(
            format!("fan-out: spawns and stops took (s), {what}"),
            over.as_secs_f64(),
        );
        rows.insert(
            format!("fan-out: supervisor RSS at the end (MB), {what}"),
            rss,
        );
        let mut record = |to: &str, (rate, rate_stopping, lost): (f64, f64, u64)| {
            rows.insert(
                format!("fan-out: events/s delivered to the {to}, {what}"),
                rate,
            );
            rows.insert(
                format!("fan-out: events/s delivered to the {to} while all stop, {what}"),
                rate_stopping,
            );
            rows.insert(
                format!("fan-out: events lost by the {to}, {what}"),
                lost as f64,
            );
            lost
        };
        let lost = record("gRPC watchers", tally(watchers, started, stopping).await?);
        ensure!(lost == 0, "gRPC watchers missed {lost} events");
        if with_sse {
            let lost = record("SSE clients", tally(followers, started, stopping).await?);
            ensure!(lost == 0, "SSE clients missed {lost} events");
        }
    }
    Ok(())
}

/// A kept-alive HTTP/1.1 client of agentd's HTTP API.
#[derive(Clone)]
struct HttpClient {
    base: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<hyper::body::Bytes>,
    >,
}

impl HttpClient {
    fn new(address: &str) -> HttpClient {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        HttpClient {
            base: format!("http://{address}"),
            client,
        }
    }

    async fn open(&self, path: &str) -> Result<hyper::body::Incoming> {
        let uri: hyper::Uri = format!("{}{path}", self.base).parse()?;
        let response = self.client.get(uri).await?;
        ensure!(
            response.status() == 200,
            "GET {path}: {}",
            response.status()
        );
        Ok(response.into_body())
    }

    async fn get(&self, path: &str) -> Result<hyper::body::Bytes> {
        use http_body_util::BodyExt;
        Ok(self.open(path).await?.collect().await?.to_bytes())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut options = Options::parse();
    if options.smoke {
        options.n = vec![5];
        options.latency_spawns = 5;
        options.status_calls = 20;
        options.trials = 3;
        options.stubborn = 2;
        options.idle = vec![5];
        options.idle_seconds = 0.5;
        options.subscribers = 3;
        options.fanout = 5;
        options.churn = 5;
        options.sandboxed = 5;
    }
    let mut rows = Rows::new();
    spawn_latency(&options, &mut rows).await?;
    sandbox_cost(&options, &mut rows).await?;
    sandboxed_fleet(&options, &mut rows).await?;
    for &n in &options.n {
        spawn_status_list_stop(&options, n, &mut rows).await?;
    }
    exit_visible(&options, &mut rows).await?;
    stop_stubborn(&options, &mut rows).await?;
    fan_out(&options, &mut rows).await?;
    for &n in &options.idle {
        for containment in CONTAINMENTS {
            idle_cost(&options, n, containment, &mut rows).await?;
        }
    }
    churn(&options, &mut rows).await?;
    if options.json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        let width = rows.keys().map(String::len).max().unwrap_or(0);
        for (row, value) in &rows {
            println!("{row:<width$}  {value:>10.3}");
        }
    }
    Ok(())
}
