//! The keeper: one small process per data folder that starts every agent, so it is every
//! agent's parent, and outlives agentd. It reaps its children and keeps each exit until agentd
//! acknowledges it, so a daemon that was killed and started again still learns how every agent
//! ended, including those that ended while it was down (containerd keeps a shim per container
//! for this; one keeper per host costs one process). It is also a subreaper, so orphaned
//! descendants of agents are reaped by it rather than left to an init that may never reap.
//!
//! agentd starts it by running its own binary with [`KEEPER_ARG`], handing over the bound
//! listening socket (`keeper.sock` in the data folder) as file descriptor 3, so there is no
//! window in which a client could reach nothing. The keeper exits once no agentd is
//! connected, no child runs and no exit is left unacknowledged, or when its data folder is
//! gone.
//!
//! The protocol is one JSON object per line on a Unix stream socket. agentd keeps three
//! connections: `control` (hello and ack at start; request and reply), `orders` (spawns,
//! pipelined: `orders.rs`) and `watch` (exits, pushed as they are reaped).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use crate::cgroup::Joins;
use crate::files;
use crate::launch::{self, ProcessSetup};
use crate::process;
use crate::sandbox::Network;
use crate::spec::Resources;
use crate::state::Exit;

mod orders;

pub(crate) use orders::{SpawnDone, connection_lost};

/// The argument that makes the agentd binary run as the keeper.
pub const KEEPER_ARG: &str = "--run-as-keeper";
/// The keeper's protocol version: 1 starts agents in cgroups (`SpawnOrder::joins`), 2
/// remembers which children agentd has a record of on disk (`Request::Recorded`). A
/// keeper left running by an older agentd would ignore the cgroups it is given, and close
/// the connection on a request it does not know. 3 confines sandboxed agents
/// (`ProcessSetup::confine`): an older keeper would start them unconfined.
const VERSION: u32 = 3;
const CONFINE_VERSION: u32 = 3;
const CGROUPS_VERSION: u32 = 1;
const RECORDED_VERSION: u32 = 2;

/// What the keeper says when agentd connects.
pub(crate) struct Hello {
    pub children: Vec<KeptChild>,
    pub exits: Vec<KeptExit>,
    /// It starts agents in the cgroups it is given.
    pub cgroups: bool,
    /// It remembers which children are recorded (`AckSink::recorded`).
    pub records: bool,
    /// It confines sandboxed agents.
    pub confines: bool,
}

/// The keeper's socket, in the data folder.
pub(crate) const SOCKET: &str = "keeper.sock";
/// Set in the keeper's own environment (never in an agent's), so it can be found.
pub const KEEPER_DIR_VAR: &str = "AGENTD_KEEPER_DIR";

/// How one child of the keeper ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct KeptExit {
    pub agent_id: String,
    pub pid: i32,
    pub start_ticks: Option<u64>,
    pub exit: Exit,
    /// From the spawn to the reaping, on the keeper's monotonic clock.
    pub ran_for: Duration,
    /// When it was reaped.
    pub at: SystemTime,
}

/// A child of the keeper that still runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct KeptChild {
    pub agent_id: String,
    pub pid: i32,
    pub start_ticks: Option<u64>,
    /// agentd said a record of this run was on disk: a store without it lost it.
    #[serde(default)]
    pub recorded: bool,
}

/// What to start: everything is explicit, the environment included, so an agent's
/// environment is agentd's (and the spawn's), never the keeper's.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SpawnOrder {
    /// Kept with the child, so an exit names its agent even if agentd never learned the pid.
    pub agent_id: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: PathBuf,
    /// Opened for appending (created if missing).
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// What the agent may use; agentd turns it into cgroup limits and `setup`.
    #[serde(skip)]
    pub resources: Resources,
    /// Its cgroups: the v2 one it is created in, and v1 ones it joins.
    #[serde(default)]
    pub joins: Option<Joins>,
    #[serde(default)]
    pub setup: ProcessSetup,
    /// A sandboxed agent's network; agentd makes its namespace (`setup.confine.net_ns`).
    #[serde(skip)]
    pub network: Option<Network>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Request {
    /// The children that run and the exits not yet acknowledged.
    Hello,
    Spawn(Box<SpawnOrder>),
    /// Turns this connection into a stream of exits; acks may then arrive on it.
    Watch,
    Ack(Vec<i32>),
    /// These children's records are on disk (sent on the watch connection, no answer).
    Recorded(Vec<i32>),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Reply {
    State {
        children: Vec<KeptChild>,
        exits: Vec<KeptExit>,
        /// What the keeper knows how to do; absent from a keeper older than cgroups.
        #[serde(default)]
        version: u32,
    },
    Spawned {
        pid: i32,
        start_ticks: Option<u64>,
    },
    Failed {
        errno: Option<i32>,
        message: String,
    },
    Acked,
    Exited(KeptExit),
}

/// agentd's side: the control connection (`None` once a call failed: a reply that came late
/// would answer the next question, so the connection is never used again) and the orders.
pub(crate) struct KeeperClient {
    control: Mutex<Option<BufReader<UnixStream>>>,
    orders: orders::Orders,
    socket: PathBuf,
}

/// How long the keeper may take to answer; it answers in microseconds unless it is stuck.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

impl KeeperClient {
    /// Connects to the keeper of `data_dir`, starting one (`program` with [`KEEPER_ARG`]) if
    /// none answers, and opens the exit stream. A keeper that was just leaving (its last
    /// agentd gone, nothing to keep) may drop the connection: then a new one is started.
    pub fn reach(
        data_dir: &Path,
        program: &Path,
    ) -> io::Result<(KeeperClient, ExitStream, AckSink)> {
        let socket = data_dir.join(SOCKET);
        let attempt = |fresh: bool| {
            let stream = match UnixStream::connect(&socket) {
                Ok(stream) if !fresh => stream,
                _ => {
                    start(data_dir, &socket, program)?;
                    UnixStream::connect(&socket)?
                }
            };
            same_user(&stream)?;
            stream.set_read_timeout(Some(ANSWER_WITHIN))?;
            let orders = UnixStream::connect(&socket)?;
            same_user(&orders)?;
            let client = KeeperClient {
                control: Mutex::new(Some(BufReader::new(stream))),
                orders: orders::Orders::start(orders)?,
                socket: socket.clone(),
            };
            let (exits, acks) = client.watch()?;
            Ok::<_, io::Error>((client, exits, acks))
        };
        attempt(false).or_else(|error| {
            tracing::warn!(%error, "the keeper did not answer; starting a new one");
            attempt(true)
        })
    }

    /// The children that still run and the exits not yet acknowledged. Ask after
    /// [`KeeperClient::watch`], so that no exit falls in between (one may come both ways).
    pub fn hello(&self) -> io::Result<Hello> {
        match self.call(&Request::Hello)? {
            Reply::State {
                children,
                exits,
                version,
            } => Ok(Hello {
                children,
                exits,
                cgroups: version >= CGROUPS_VERSION,
                records: version >= RECORDED_VERSION,
                confines: version >= CONFINE_VERSION,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a process through the keeper; `done` gets the answer later, from the orders'
    /// reader task.
    pub fn spawn(&self, order: SpawnOrder, done: SpawnDone) {
        self.orders.send(order, done);
    }

    /// The keeper may forget these exits: agentd has them on disk.
    pub fn ack(&self, pids: Vec<i32>) -> io::Result<()> {
        match self.call(&Request::Ack(pids))? {
            Reply::Acked => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// A second connection on which the keeper pushes every exit it reaps from now on, and
    /// on which agentd acknowledges them. Must be called inside the tokio runtime.
    fn watch(&self) -> io::Result<(ExitStream, AckSink)> {
        use std::io::Read;
        let mut stream = UnixStream::connect(&self.socket)?;
        same_user(&stream)?;
        let mut line = serde_json::to_vec(&Request::Watch).map_err(io::Error::other)?;
        line.push(b'\n');
        stream.write_all(&line)?;
        // The keeper confirms once it pushes exits here. Read only that line: exits may
        // follow it at once, and they belong to the stream. A keeper that does not answer
        // in time is replaced (`reach`).
        stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        let mut confirmation = Vec::new();
        let mut byte = [0u8];
        while byte[0] != b'\n' {
            stream.read_exact(&mut byte)?;
            confirmation.push(byte[0]);
        }
        match serde_json::from_slice(&confirmation).map_err(io::Error::other)? {
            Reply::Acked => {}
            other => return Err(unexpected(&other)),
        }
        stream.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(stream)?.into_split();
        Ok((
            ExitStream {
                lines: tokio::io::BufReader::new(read).lines(),
            },
            AckSink { write },
        ))
    }

    fn call(&self, request: &Request) -> io::Result<Reply> {
        let mut control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(connection) = control.as_mut() else {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the keeper stopped answering earlier; restart agentd",
            ));
        };
        let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut answer = String::new();
        let exchanged = connection
            .get_mut()
            .write_all(&line)
            .and_then(|()| connection.read_line(&mut answer));
        match exchanged {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the keeper closed the connection",
            )),
            Ok(_) => serde_json::from_str(&answer).map_err(io::Error::other),
            Err(error) => Err(error),
        }
        .inspect_err(|_| *control = None)
    }
}

/// The exits the keeper reaps, as it reaps them.
pub(crate) struct ExitStream {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>>,
}

impl ExitStream {
    /// The next exit; `None` once the keeper is gone.
    pub async fn next(&mut self) -> Option<KeptExit> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            match serde_json::from_str(&line) {
                Ok(Reply::Exited(exit)) => return Some(exit),
                Ok(_) => {}
                Err(error) => tracing::error!(%error, "unreadable message from the keeper"),
            }
        }
    }
}

/// Where agentd tells the keeper which exits it has on disk.
pub(crate) struct AckSink {
    write: tokio::net::unix::OwnedWriteHalf,
}

impl AckSink {
    pub async fn ack(&mut self, pids: Vec<i32>) -> io::Result<()> {
        self.send(&Request::Ack(pids)).await
    }

    /// Tells the keeper these children's records are on disk (only to a keeper whose
    /// `Hello` said `records`).
    pub async fn recorded(&mut self, pids: Vec<i32>) -> io::Result<()> {
        self.send(&Request::Recorded(pids)).await
    }

    async fn send(&mut self, request: &Request) -> io::Result<()> {
        let mut line = serde_json::to_vec(request).map_err(io::Error::other)?;
        line.push(b'\n');
        self.write.write_all(&line).await
    }
}

fn unexpected(reply: &Reply) -> io::Error {
    io::Error::other(format!("unexpected answer from the keeper: {reply:?}"))
}

/// Binds the socket and starts the keeper on it.
fn start(data_dir: &Path, socket: &Path, program: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(socket) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(socket)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("`{}` is not a socket: remove it", socket.display()),
            ));
        }
        Err(_) => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    }
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(data_dir.join("keeper.log"))?
    };
    let listener_fd = listener.as_raw_fd();
    // Under systemd, in a delegated scope of its own (`cgroup::keeper_in_scope`);
    // systemd-run registers the scope and execs the keeper in its own place.
    let mut command = if crate::cgroup::keeper_in_scope() {
        let mut command = std::process::Command::new("systemd-run");
        command
            .args(["--scope", "--quiet", "--collect", "-p", "Delegate=yes"])
            .args(["--slice", "system.slice", "--unit"])
            .arg(crate::cgroup::keeper_scope(data_dir))
            .arg("--")
            .arg(program);
        command
    } else {
        std::process::Command::new(program)
    };
    command
        .arg(KEEPER_ARG)
        .arg(data_dir)
        .env(KEEPER_DIR_VAR, data_dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        // Its own group: a Ctrl-C meant for agentd does not reach it.
        .process_group(0);
    // SAFETY: between fork and exec only `dup2`, which is async-signal-safe, runs; it puts
    // the listening socket on descriptor 3 without close-on-exec.
    unsafe {
        command.pre_exec(move || {
            let done = if listener_fd == 3 {
                nix::libc::fcntl(3, nix::libc::F_SETFD, 0)
            } else {
                nix::libc::dup2(listener_fd, 3)
            };
            if done < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The keeper is our child only until we exit; it is never waited for here (the reaper
    // collects it if it dies first).
    drop(command.spawn()?);
    Ok(())
}

/// The keeper's state, shared by its connections and its reaper (all on one thread).
#[derive(Default)]
struct Kept {
    children: HashMap<i32, Child>,
    exits: HashMap<i32, KeptExit>,
    watchers: Vec<mpsc::UnboundedSender<KeptExit>>,
    connections: usize,
}

struct Child {
    agent_id: String,
    start_ticks: Option<u64>,
    spawned: Instant,
    recorded: bool,
}

type Shared = Arc<Mutex<Kept>>;

fn lock(kept: &Shared) -> std::sync::MutexGuard<'_, Kept> {
    kept.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The keeper's main: serves the listening socket on descriptor 3 until there is nothing
/// left to keep.
pub fn run_keeper(data_dir: &Path) -> io::Result<()> {
    process::become_subreaper()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(data_dir))
}

async fn serve(data_dir: &Path) -> io::Result<()> {
    // SAFETY: agentd put the bound listening socket on descriptor 3 for us, and nothing else
    // in this process owns it.
    let listener = unsafe { std::os::unix::net::UnixListener::from_raw_fd(3) };
    // Nothing of the keeper's reaches an agent: the listener, and any descriptor agentd was
    // itself started with, close on exec (agents start with 0, 1 and 2 only).
    close_on_exec_from(3)?;
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let socket = data_dir.join(SOCKET);
    let kept: Shared = Arc::default();
    let mut sigchld = signal(SignalKind::child())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let (closed_tx, mut closed) = mpsc::unbounded_channel::<()>();
    let every = Duration::from_secs(5);
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                if let Err(refused) = same_user(&stream) {
                    eprintln!("agentd keeper: {refused}");
                    continue;
                }
                lock(&kept).connections += 1;
                let (kept, closed) = (kept.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    if let Err(error) = connection(stream, kept.clone()).await {
                        eprintln!("agentd keeper: connection: {error}");
                    }
                    lock(&kept).connections -= 1;
                    let _ = closed.send(());
                });
            }
            Some(()) = sigchld.recv() => reap(&kept),
            Some(()) = closed.recv() => {
                let kept = lock(&kept);
                if kept.connections == 0 && kept.children.is_empty() && kept.exits.is_empty() {
                    // Nothing left to keep: the next agentd starts a keeper of its own.
                    let _ = std::fs::remove_file(&socket);
                    return Ok(());
                }
            }
            _ = sigterm.recv() => return Ok(()),
            _ = check.tick() => {
                if !socket.exists() {
                    eprintln!("agentd keeper: {} is gone; exiting", socket.display());
                    return Ok(());
                }
            }
        }
    }
}

/// Marks every descriptor from `first` on close-on-exec (`close_range`, Linux 5.11; before
/// that, one `fcntl` per possible descriptor).
fn close_on_exec_from(first: u32) -> io::Result<()> {
    use nix::libc;
    // SAFETY: plain integers; the kernel only sets a flag on descriptors of this process.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if marked == 0 {
        return Ok(());
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a pointer to a live rlimit.
    let open_max = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => limit.rlim_cur.min(1 << 20) as i32,
        _ => 1024,
    };
    for fd in first as i32..open_max {
        // SAFETY: plain integers; EBADF for a descriptor that is not open is expected.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Only processes of one user talk over the keeper's socket, both ways: the socket's mode
/// and its folder's say so too, but a descriptor can be passed on and a mode changed.
fn same_user(stream: &impl std::os::fd::AsFd) -> io::Result<()> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let peer = getsockopt(stream, PeerCredentials)?;
    let own = nix::unistd::geteuid().as_raw();
    if peer.uid() != own {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "refused a peer with uid {} (pid {}) on the keeper's socket: only uid {own} may use it",
                peer.uid(),
                peer.pid()
            ),
        ));
    }
    Ok(())
}

/// Reaps every exited child; agents' exits are kept, orphans are dropped.
fn reap(kept: &Shared) {
    let mut kept = lock(kept);
    while let Some((pid, exit)) = process::reap_one() {
        let Some(child) = kept.children.remove(&pid) else {
            continue;
        };
        let exit = KeptExit {
            agent_id: child.agent_id,
            pid,
            start_ticks: child.start_ticks,
            exit,
            ran_for: child.spawned.elapsed(),
            at: SystemTime::now(),
        };
        kept.exits.insert(pid, exit.clone());
        kept.watchers
            .retain(|watcher| watcher.send(exit.clone()).is_ok());
    }
}

async fn connection(stream: tokio::net::UnixStream, kept: Shared) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut exits: Option<mpsc::UnboundedReceiver<KeptExit>> = None;
    loop {
        let line = tokio::select! {
            line = lines.next_line() => match line? {
                Some(line) => line,
                None => return Ok(()),
            },
            Some(exit) = recv(&mut exits) => {
                send(&mut write, &Reply::Exited(exit)).await?;
                continue;
            }
        };
        let request: Request = serde_json::from_str(&line).map_err(io::Error::other)?;
        let reply = match request {
            Request::Hello => {
                let kept = lock(&kept);
                Reply::State {
                    children: kept
                        .children
                        .iter()
                        .map(|(&pid, child)| KeptChild {
                            agent_id: child.agent_id.clone(),
                            pid,
                            start_ticks: child.start_ticks,
                            recorded: child.recorded,
                        })
                        .collect(),
                    exits: kept.exits.values().cloned().collect(),
                    version: VERSION,
                }
            }
            Request::Spawn(order) => spawn(*order, &kept),
            Request::Watch => {
                let (sender, receiver) = mpsc::unbounded_channel();
                lock(&kept).watchers.push(sender);
                exits = Some(receiver);
                Reply::Acked
            }
            Request::Ack(pids) => {
                let mut kept = lock(&kept);
                for pid in pids {
                    kept.exits.remove(&pid);
                }
                if exits.is_some() {
                    continue;
                }
                Reply::Acked
            }
            Request::Recorded(pids) => {
                let mut kept = lock(&kept);
                for pid in pids {
                    if let Some(child) = kept.children.get_mut(&pid) {
                        child.recorded = true;
                    }
                }
                if exits.is_some() {
                    continue;
                }
                Reply::Acked
            }
        };
        send(&mut write, &reply).await?;
    }
}

async fn recv(exits: &mut Option<mpsc::UnboundedReceiver<KeptExit>>) -> Option<KeptExit> {
    match exits {
        Some(exits) => exits.recv().await,
        None => std::future::pending().await,
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, reply: &Reply) -> io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await
}

fn spawn(order: SpawnOrder, kept: &Shared) -> Reply {
    // The agent's user owns its folder: what stands there is opened with care, and an
    // output file made again here is the agent's.
    let owner = order.setup.run_as.as_ref().map(|user| (user.uid, user.gid));
    let options = files::no_follow().create(true).append(true).clone();
    let open = |path: &Path| files::open_for_writing(&options, path, owner);
    let started = open(&order.stdout)
        .and_then(|stdout| Ok((stdout, open(&order.stderr)?)))
        .and_then(|(stdout, stderr)| {
            launch::spawn(launch::Launch {
                command: &order.command,
                env: &order.env,
                working_dir: &order.working_dir,
                stdout,
                stderr,
                joins: order.joins.as_ref(),
                setup: &order.setup,
            })
        });
    match started {
        Ok(started) => {
            let child = Child {
                agent_id: order.agent_id,
                start_ticks: started.start_ticks,
                spawned: Instant::now(),
                recorded: false,
            };
            lock(kept).children.insert(started.pid, child);
            Reply::Spawned {
                pid: started.pid,
                start_ticks: started.start_ticks,
            }
        }
        Err(error) => Reply::Failed {
            errno: error.raw_os_error(),
            message: error.to_string(),
        },
    }
}
