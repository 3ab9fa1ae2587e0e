//! A daemon per test, helpers that keep each test a few lines, and cleanup that really
//! kills everything a test started, even when it fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
pub use pb::agent_supervisor_client::AgentSupervisorClient;
use tonic::transport::{Channel, Endpoint};

mod needs;
pub use needs::{Need, requires, requires_in_part};

pub type Client = AgentSupervisorClient<Channel>;

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Set to 1 to start every daemon in a systemd scope of its own (`Daemon::launch`).
pub const SCOPE_VAR: &str = "AGENTD_TEST_SCOPE";

pub struct Daemon {
    child: Option<Child>,
    /// Holds the data folder and the socket; removed on drop.
    pub dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    /// agentd's cgroup root (`/agentd/...`) as its ready line says, when agents get cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// `HOST:PORT` of the HTTP API, when started with `--http-listen`.
    pub http_address: Option<String>,
    /// `http://HOST:PORT` of gRPC over TCP, when started with `--listen`.
    pub grpc_address: Option<String>,
    /// `HOST:PORT` of the health probes, when started with `--health-listen`.
    pub health_address: Option<String>,
}

/// How to start a daemon: `Daemon::builder().options(&[..]).start().await`.
#[derive(Default)]
pub struct DaemonBuilder {
    dir: Option<tempfile::TempDir>,
    options: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<(u32, u32)>,
}

impl DaemonBuilder {
    /// An existing folder (a restart keeps the data); a new temp folder otherwise.
    pub fn dir(mut self, dir: tempfile::TempDir) -> DaemonBuilder {
        self.dir = Some(dir);
        self
    }

    /// Extra command-line options.
    pub fn options(mut self, options: &[&str]) -> DaemonBuilder {
        self.options
            .extend(options.iter().map(|option| option.to_string()));
        self
    }

    /// Extra environment variables.
    pub fn env(mut self, env: &[(&str, &str)]) -> DaemonBuilder {
        self.env
            .extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// Runs agentd as another user (the test must be root), in a folder that user owns.
    pub fn run_as(mut self, uid: u32, gid: u32) -> DaemonBuilder {
        self.user = Some((uid, gid));
        self
    }

    /// Starts agentd and waits for its ready line.
    pub async fn start(self) -> Daemon {
        let dir = self.dir.unwrap_or_else(|| {
            tempfile::Builder::new()
                .prefix("agentd-e2e-")
                .tempdir()
                .expect("temp dir")
        });
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown the folder");
        }
        let options: Vec<&str> = self.options.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Daemon::launch(dir, &options, &env, self.user).await
    }
}

impl Daemon {
    /// A daemon with the defaults, in a new temp folder.
    pub async fn start() -> Daemon {
        Daemon::builder().start().await
    }

    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// `AGENTD_TEST_SCOPE=1`: start each daemon in a systemd scope with `Delegate=yes`.
    async fn launch(
        dir: tempfile::TempDir,
        options: &[&str],
        env: &[(&str, &str)],
        user: Option<(u32, u32)>,
    ) -> Daemon {
        use std::os::unix::process::CommandExt;
        let data_dir = dir.path().join("data");
        let chosen = |flag: &str| {
            let at = options.iter().position(|option| *option == flag)?;
            options.get(at + 1).map(PathBuf::from)
        };
        let socket = chosen("--socket").unwrap_or_else(|| dir.path().join("agentd.sock"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("agentd.log"))
            .expect("daemon log");
        let agentd = env!("CARGO_BIN_EXE_agentd");
        let mut command = match (std::env::var_os(SCOPE_VAR).is_some_and(|v| v == "1"), user) {
            // Under systemd (the VM tests), each daemon in a delegated scope of its own, as
            // `deploy/agentd.service` gives it one. systemd-run execs agentd in its own place.
            (true, None) => {
                let mut command = Command::new("systemd-run");
                command
                    .args([
                        "--scope",
                        "--quiet",
                        "--collect",
                        "-p",
                        "Delegate=yes",
                        "--",
                    ])
                    .arg(agentd);
                command
            }
            _ => Command::new(agentd),
        };
        if let Some((uid, gid)) = user {
            command.uid(uid).gid(gid).env("HOME", dir.path());
        }
        let mut child = command
            .arg("--data-dir")
            .arg(&data_dir)
            .args(match options.contains(&"--socket") {
                true => vec![],
                false => vec!["--socket".as_ref(), socket.as_os_str()],
            })
            .args(["--log-level", "info"])
            .args(match options.contains(&"--sample-interval") {
                true => &[][..],
                false => &["--sample-interval", "100ms"],
            })
            .args(options)
            // A TCP listener without TLS and tokens is refused unless asked for: tests that
            // do not test security listen on loopback without them.
            .args(
                (options
                    .iter()
                    .any(|o| *o == "--listen" || *o == "--http-listen")
                    && !options.contains(&"--token-file"))
                .then_some("--insecure-listen"),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start agentd");
        let stdout = child.stdout.take().expect("stdout");
        let (ready_tx, ready) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let _ = ready_tx.send(line);
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            data_dir,
            socket,
            cgroup_root: None,
            http_address: None,
            grpc_address: None,
            health_address: None,
        };
        match ready.recv_timeout(DEADLINE) {
            Ok(line) if line.contains("ready") => {
                daemon.cgroup_root = line
                    .split_once(", root ")
                    .and_then(|(_, rest)| rest.split(',').next())
                    .map(PathBuf::from);
                let after = |marker: &str| {
                    ["http://", "https://"].iter().find_map(|scheme| {
                        line.split_once(&format!("{marker}{scheme}"))
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                            .map(|address| address.trim_end_matches(',').to_string())
                    })
                };
                daemon.http_address = after("HTTP API on ");
                daemon.grpc_address = after(" and ").map(|address| format!("http://{address}"));
                daemon.health_address = line
                    .split_once("health probes on ")
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .map(|address| address.trim_end_matches(',').to_string());
                daemon
            }
            other => {
                let log = daemon.log();
                daemon.kill();
                panic!("agentd did not become ready: {other:?}\n{log}");
            }
        }
    }

    pub fn log(&self) -> String {
        log_in(self.dir.path())
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub async fn client(&self) -> Client {
        let channel = Endpoint::from_shared(format!("unix://{}", self.socket.display()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to agentd");
        AgentSupervisorClient::new(channel)
    }

    /// A client of the HTTP API (the daemon must run with `--http-listen`).
    pub fn http(&self) -> Http {
        Http::new(
            self.http_address
                .as_deref()
                .expect("started with --http-listen"),
        )
    }

    /// SIGKILLs the daemon if it still runs, leaving its agents running, and hands over
    /// the folder for a restart.
    pub fn crash(mut self) -> tempfile::TempDir {
        self.kill();
        // The next daemon in the folder takes over the cgroups too.
        self.cgroup_root = None;
        let placeholder = tempfile::Builder::new().tempdir().expect("placeholder dir");
        self.data_dir = placeholder.path().join("data");
        std::mem::replace(&mut self.dir, placeholder)
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        kill(Pid::from_raw(self.pid()), Signal::SIGTERM).expect("SIGTERM agentd");
        self.wait_exit("on SIGTERM").await
    }

    /// Waits for the daemon to exit on its own.
    pub async fn wait_exit(&mut self, why: &str) -> ExitStatus {
        let dir = self.dir.path().to_path_buf();
        let child = self.child.as_mut().expect("daemon running");
        let exit = eventually(&format!("agentd exits {why}"), async || {
            match child.try_wait().expect("wait agentd") {
                Some(exit) => Ok(exit),
                None => Err(Shown(log_in(&dir))),
            }
        })
        .await;
        self.child = None;
        exit
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    /// Kills the daemon, then every process that still carries this test's agent folder in
    /// its environment (agents, their children, orphans), so no test leaves anything behind.
    /// A failing test shows the end of the daemon's log with its failure.
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = log_in(self.dir.path());
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("--- the end of agentd.log ---\n{}", tail.join("\n"));
        }
        kill_agents_under(&self.data_dir);
        if let Some(root) = &self.cgroup_root {
            remove_cgroups(root);
        }
    }
}

/// The daemon's log in its folder.
fn log_in(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agentd.log")).unwrap_or_default()
}

/// The folders of a cgroup path in every hierarchy mounted under /sys/fs/cgroup (the v2
/// one and any v1 ones), where it exists.
pub fn cgroup_dirs(cgroup: &Path) -> Vec<PathBuf> {
    let rel = cgroup.strip_prefix("/").unwrap_or(cgroup);
    let base = Path::new("/sys/fs/cgroup");
    std::iter::once(base.to_path_buf())
        .chain(
            std::fs::read_dir(base)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path()),
        )
        .map(|hierarchy| hierarchy.join(rel))
        .filter(|dir| dir.join("cgroup.procs").exists())
        .collect()
}

/// Kills whatever is left in a daemon's cgroups and removes them, children first; then the
/// `agentd` folder above, unless another test's daemon still uses it.
pub fn remove_cgroups(root: &Path) {
    for dir in cgroup_dirs(root) {
        let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        let mut dirs: Vec<PathBuf> = walk_dirs(&dir);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            let deadline = Instant::now() + DEADLINE;
            // A killed process leaves its cgroup a moment after the signal.
            while std::fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                let _ = std::fs::write(dir.join("cgroup.kill"), "1");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if let Some(parent) = dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.extend(walk_dirs(&entry.path()));
        }
    }
    dirs
}

pub fn kill_agents_under(data_dir: &Path) {
    for pid in processes_under(data_dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Live processes that carry an agent folder under `data_dir` in their environment (agents,
/// their children, orphans), and the keeper of `data_dir`.
pub fn processes_under(data_dir: &Path) -> Vec<i32> {
    let mut processes = agents_under(data_dir);
    processes.extend(keeper_of(data_dir));
    processes
}

/// The keeper of `data_dir`, if one runs.
pub fn keeper_of(data_dir: &Path) -> Option<i32> {
    let marker = format!("{}={}", agentd_core::KEEPER_DIR_VAR, data_dir.display());
    with_environment(|var| var == marker.as_bytes())
        .into_iter()
        .next()
}

/// Live processes that carry an agent folder under `data_dir` in their environment.
pub fn agents_under(data_dir: &Path) -> Vec<i32> {
    let marker = format!("AGENTD_AGENT_DIR={}/", data_dir.display());
    with_environment(|var| var.starts_with(marker.as_bytes()))
}

fn with_environment(wanted: impl Fn(&[u8]) -> bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|environ| environ.split(|&b| b == 0).any(&wanted))
        })
        .filter(|&pid| process_exists(pid))
        .collect()
}

pub fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

pub fn spawn_request(agent_id: &str, command: Vec<String>) -> pb::SpawnRequest {
    pb::SpawnRequest {
        agent_id: agent_id.into(),
        command,
        ..Default::default()
    }
}

/// A ladder short enough for tests: signal, 300 ms, signal, 300 ms, SIGKILL.
pub fn quick_ladder() -> Option<pb::StopPolicy> {
    Some(pb::StopPolicy {
        stop_signal: String::new(),
        first_grace: Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
        second_grace: Some(pbjson_types::Duration {
            seconds: 0,
            nanos: 300_000_000,
        }),
    })
}

pub async fn spawn(client: &mut Client, agent_id: &str, command: Vec<String>) -> pb::AgentStatus {
    spawn_with(client, spawn_request(agent_id, command)).await
}

pub async fn spawn_with(client: &mut Client, request: pb::SpawnRequest) -> pb::AgentStatus {
    client
        .spawn(request)
        .await
        .expect("spawn")
        .into_inner()
        .status
        .expect("status in spawn response")
}

pub async fn status(client: &mut Client, agent_id: &str) -> pb::AgentStatus {
    client
        .status(pb::StatusRequest {
            agent_id: agent_id.into(),
        })
        .await
        .expect("status")
        .into_inner()
        .status
        .expect("status in response")
}

/// Polls the agent's status until `done` holds, failing after [`DEADLINE`].
pub async fn wait_for(
    client: &mut Client,
    agent_id: &str,
    what: &str,
    done: impl Fn(&pb::AgentStatus) -> bool,
) -> pb::AgentStatus {
    eventually(&format!("agent {agent_id} is {what}"), async || {
        let status = status(client, agent_id).await;
        if done(&status) {
            Ok(status)
        } else {
            Err(status)
        }
    })
    .await
}

pub async fn wait_for_state(
    client: &mut Client,
    agent_id: &str,
    state: pb::AgentState,
) -> pb::AgentStatus {
    wait_for(client, agent_id, state.as_str_name(), |s| {
        s.state == state as i32
    })
    .await
}

pub async fn stop(client: &mut Client, agent_ids: &[&str], force: bool) -> Vec<pb::StopResult> {
    client
        .cleanup(pb::CleanupRequest {
            agent_ids: agent_ids.iter().map(|s| s.to_string()).collect(),
            force,
            ..Default::default()
        })
        .await
        .expect("cleanup")
        .into_inner()
        .results
}

/// SIGKILLs every agent at once and waits until they are gone.
pub async fn kill_all(client: &mut Client) -> Vec<pb::StopResult> {
    client
        .cleanup(pb::CleanupRequest {
            all: true,
            force: true,
            ..Default::default()
        })
        .await
        .expect("cleanup all")
        .into_inner()
        .results
}

/// The next event of a watch, failing after [`DEADLINE`].
pub async fn next_event(events: &mut tonic::Streaming<pb::AgentEvent>) -> pb::AgentEvent {
    tokio::time::timeout(DEADLINE, events.message())
        .await
        .expect("an event within the deadline")
        .expect("stream healthy")
        .expect("stream still open")
}

/// The one way a test waits for something: polls `probe` until it settles, failing after
/// [`DEADLINE`] with `what` it waited for and the last thing it saw. A probe answers a `bool`,
/// an `Option` (the value once there) or a `Result` (`Err` carries what was seen meanwhile).
pub async fn eventually<S: Settled>(what: &str, mut probe: impl AsyncFnMut() -> S) -> S::Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match probe().await.settled() {
            Ok(value) => return value,
            Err(seen) => assert!(
                Instant::now() < deadline,
                "timed out after {DEADLINE:?} waiting until {what}; last seen: {seen}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a probe of [`eventually`] answers.
pub trait Settled {
    type Value;
    /// The value once settled; what was seen while not.
    fn settled(self) -> Result<Self::Value, String>;
}

impl Settled for bool {
    type Value = ();
    fn settled(self) -> Result<(), String> {
        self.then_some(()).ok_or_else(|| "false".into())
    }
}

impl<T> Settled for Option<T> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing yet".into())
    }
}

impl<T, E: std::fmt::Debug> Settled for Result<T, E> {
    type Value = T;
    fn settled(self) -> Result<T, String> {
        self.map_err(|seen| format!("{seen:#?}"))
    }
}

/// Text that a failure message shows as it is (its `Debug` adds no quotes or escapes).
pub struct Shown(pub String);

impl std::fmt::Debug for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn process_exists(pid: i32) -> bool {
    // Bytes, not text: the kernel may cut a process name in the middle of a character.
    std::fs::read(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat_field(&String::from_utf8_lossy(&stat), 3) != Some("Z"))
}

/// Field `n` (1-based, as in proc(5)) of a `/proc/PID/stat` line.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n - 3)
}

/// `(pid, state)` of every child of `parent`.
pub fn children_of(parent: i32) -> Vec<(i32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read(entry.path().join("stat")).ok()?;
            let stat = String::from_utf8_lossy(&stat);
            (stat_field(&stat, 4)?.parse::<i32>().ok()? == parent)
                .then(|| (pid, stat_field(&stat, 3).unwrap_or("?").to_string()))
        })
        .collect()
}

pub fn seconds(duration: Option<&pbjson_types::Duration>) -> f64 {
    duration.map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9)
}

/// A protobuf Timestamp as wall time.
pub fn system_time(timestamp: Option<&agentd_proto::Timestamp>) -> std::time::SystemTime {
    let timestamp = timestamp.expect("timestamp");
    let seconds = u64::try_from(timestamp.seconds).expect("after 1970");
    std::time::UNIX_EPOCH
        + Duration::from_secs(seconds)
        + Duration::from_nanos(u64::try_from(timestamp.nanos).expect("nanos"))
}

/// A keep-alive HTTP/1.1 client of agentd's HTTP API.
#[derive(Clone)]
pub struct Http {
    base: String,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<hyper::body::Bytes>,
    >,
}

/// An answer read whole.
pub struct HttpAnswer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "not JSON ({error}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Http {
    pub fn new(address: &str) -> Http {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Http {
            base: format!("http://{address}"),
            client,
        }
    }

    /// Sends a request and returns the response as it starts, its body unread.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
    ) -> hyper::Response<hyper::body::Incoming> {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = body.map_or_else(Vec::new, |b| serde_json::to_vec(b).expect("json"));
        let request = request
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .expect("request");
        tokio::time::timeout(DEADLINE, self.client.request(request))
            .await
            .expect("answer in time")
            .expect("HTTP request")
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> HttpAnswer {
        use http_body_util::BodyExt;
        let response = self.send(method, path, &[], body).await;
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(DEADLINE, body.collect())
            .await
            .expect("body in time")
            .expect("body")
            .to_bytes()
            .to_vec();
        HttpAnswer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&self, path: &str) -> HttpAnswer {
        self.call("GET", path, None).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> HttpAnswer {
        self.call("POST", path, Some(&body)).await
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }

    pub fn sequence(&self) -> u64 {
        self.id.as_deref().expect("id").parse().expect("numeric id")
    }
}

/// Reads a `text/event-stream` body as a browser's EventSource does: fields per line,
/// an event per blank line, comments ignored.
pub struct SseReader {
    body: hyper::body::Incoming,
    buffer: String,
}

impl SseReader {
    pub fn new(response: hyper::Response<hyper::body::Incoming>) -> SseReader {
        assert_eq!(response.status(), 200, "event stream status");
        let content_type = response.headers()["content-type"].to_str().expect("type");
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        SseReader {
            body: response.into_body(),
            buffer: String::new(),
        }
    }

    /// The next event, or `None` once the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    id: None,
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "" => continue,
                        "id" => event.id = Some(value.into()),
                        "event" => event.event = value.into(),
                        "data" => {
                            if any {
                                event.data.push('\n');
                            }
                            event.data.push_str(value);
                            any = true;
                        }
                        _ => {}
                    }
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            let frame = tokio::time::timeout(DEADLINE, self.body.frame())
                .await
                .expect("an event in time")?
                .expect("event stream");
            if let Ok(data) = frame.into_data() {
                self.buffer
                    .push_str(std::str::from_utf8(&data).expect("UTF-8"));
            }
        }
    }

    /// Reads events until one matches; fails at the deadline.
    pub async fn until(&mut self, wanted: impl Fn(&SseEvent) -> bool) -> Vec<SseEvent> {
        let mut seen = Vec::new();
        loop {
            let event = self.next().await.expect("stream open");
            let done = wanted(&event);
            seen.push(event);
            if done {
                return seen;
            }
        }
    }
}

/// The `google.rpc.ErrorInfo` reason a status carries, if any.
pub fn reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
}

/// The `agentctl` binary: it is its own crate, so Cargo gives no `CARGO_BIN_EXE_agentctl`
/// here; it sits beside `agentd`, in the same target folder and profile. `cargo test
/// --workspace` builds it (the agentctl crate's own tests want it); when it is missing or
/// older than its sources (`cargo test -p agentd-server`, or an edit since), it is built
/// here, once per test run, with `cargo build -p agentctl`. A build that fails fails the
/// test that asked, saying how to build it by hand.
pub fn agentctl_path() -> &'static Path {
    static AGENTCTL: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    let found = AGENTCTL.get_or_init(|| {
        let agentd = Path::new(env!("CARGO_BIN_EXE_agentd"));
        let agentctl = agentd.with_file_name("agentctl");
        let built_at = |path: &Path| path.metadata().and_then(|m| m.modified()).ok();
        // The workspace root, from this package's folder (`crates/server`).
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let sources = [
            "crates/agentctl/src",
            "crates/agentctl/Cargo.toml",
            "crates/proto",
            "proto",
            "build.rs",
            "Cargo.toml",
            "Cargo.lock",
        ];
        let newest_source = sources
            .iter()
            .filter_map(|source| newest_modified(&root.join(source)))
            .max();
        let fresh = match (built_at(&agentctl), newest_source) {
            (Some(built), Some(newest)) => built >= newest,
            (built, None) => built.is_some(),
            (None, Some(_)) => false,
        };
        if fresh {
            return Ok(agentctl);
        }
        let by_hand = "build it with `cargo build -p agentctl` (with the profile of the tests)";
        // `target/<profile>/agentd`: the same target folder and profile for agentctl.
        let profile_dir = agentd.parent().ok_or("agentd has no folder")?;
        let target_dir = profile_dir
            .parent()
            .ok_or("agentd's folder has no parent")?;
        let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cargo
            .args(["build", "-p", "agentctl", "--manifest-path"])
            .arg(root.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", target_dir);
        match profile_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(profile) => {
                cargo.args(["--profile", profile]);
            }
            None => return Err(format!("agentd's folder has no name: {by_hand}")),
        }
        eprintln!("agentctl is missing or older than its sources: {cargo:?}");
        match cargo.status() {
            Ok(status) if status.success() && agentctl.exists() => Ok(agentctl),
            Ok(status) => Err(format!(
                "`cargo build -p agentctl` ended with {status} and left no {}: {by_hand}",
                agentctl.display()
            )),
            Err(error) => Err(format!("running cargo: {error}: {by_hand}")),
        }
    });
    match found {
        Ok(path) => path,
        Err(why) => panic!("no agentctl binary beside agentd: {why}"),
    }
}

/// The newest modification time of a file, or of any file under a folder.
fn newest_modified(path: &Path) -> Option<std::time::SystemTime> {
    let metadata = path.metadata().ok()?;
    if !metadata.is_dir() {
        return metadata.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| newest_modified(&entry.path()))
        .max()
}
