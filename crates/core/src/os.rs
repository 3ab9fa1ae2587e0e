//! Every effect the supervisor has on the operating system: starting a process in its own
//! group (and cgroup) through the keeper, signalling, freezing, reaping children, reading
//! `/proc` (`process`). The supervisor task reaches them only through the [`Os`] trait;
//! [`System`] is the host, with the cgroups it found at start (`cgroup`) or, without them,
//! process groups and `setrlimit`. The driver's unit tests put a fake in its place.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::cgroup::{Cgroups, Controller, Detected};
use crate::error::{Error, Result};
use crate::keeper::{KeeperClient, SpawnDone, SpawnOrder};
use crate::launch::{ProcessSetup, Rlimit, Started};
use crate::netns;
use crate::process::{
    GroupProbe, MarkedLeader, ProcStat, marked_leaders, pidfd_open, proc_stat, proc_units,
    reap_one, signal_group, signal_process, uptime,
};
use crate::sandbox::{Network, SandboxSupport};
use crate::spec::{AgentSpec, Resources};
use crate::state::Containment;
use crate::state::Exit;
use crate::state::Hold;
use crate::trace;

/// What the supervisor task asks of the operating system.
pub(crate) trait Os: Send + Sync {
    /// How new agents are held, and a line that says what the host offers.
    fn containment(&self) -> (Containment, String);
    /// Refuses limits (and a user) this host cannot enforce for a new agent.
    fn check_spec(&self, spec: &AgentSpec) -> Result<()>;
    /// What this host offers for sandboxes.
    fn sandbox_support(&self) -> SandboxSupport;
    /// The proxy's listener again, inside the network namespace of a running agent.
    fn proxy_listener(&self, pid: i32) -> io::Result<std::net::TcpListener>;
    /// The LLM gateway's listener again inside it, when agentd runs a gateway.
    fn gateway_listener(&self, pid: i32) -> io::Result<Option<std::net::TcpListener>>;
    /// Starts a leader process in its own group (and cgroup), as a child of the keeper,
    /// which reports its exit. `done` gets the outcome exactly once, on any thread, perhaps
    /// before this returns.
    fn spawn(&self, order: SpawnOrder, done: SpawnDone);
    /// Sends a signal to every process held; `Ok(false)`: none is left.
    fn signal_group(&self, hold: Hold<'_>, signal: Signal) -> io::Result<bool>;
    /// Sends a signal to one process; `Ok(false)`: it is gone.
    fn signal_process(&self, pid: i32, signal: Signal) -> io::Result<bool>;
    /// Freezes (or thaws) every process held.
    fn freeze(&self, hold: Hold<'_>, frozen: bool) -> io::Result<()>;
    /// Reaps one exited child, if there is one.
    fn reap_one(&self) -> Option<(i32, Exit)>;
    /// Is a process that is not a zombie still held?
    fn group_alive(&self, hold: Hold<'_>) -> bool;
    /// The processes held: the cgroup's members, or the process group's.
    fn held_processes(&self, hold: Hold<'_>) -> Vec<i32>;
    /// Which of these process groups still have a member that is not a zombie (one scan for
    /// all).
    fn live_groups(&self, pgids: &[i32]) -> HashSet<i32>;
    /// Did the kernel's OOM killer kill a member of this cgroup in its current run?
    fn oom_killed(&self, cgroup: &Path) -> bool;
    /// `cgroup.events` of a cgroup, to watch for it becoming empty.
    fn cgroup_events(&self, cgroup: &Path) -> Option<PathBuf>;
    /// Removes an agent's cgroup; fails while a process is in it.
    fn remove_cgroup(&self, cgroup: &Path) -> io::Result<()>;
    /// Every agent cgroup under agentd's root, by agent id, with its members.
    fn agent_cgroups(&self) -> Vec<(String, PathBuf, Vec<i32>)>;
    /// Removes agentd's cgroup root once it is empty (at shutdown).
    fn remove_cgroup_root(&self);
    fn proc_stat(&self, pid: i32) -> Option<ProcStat>;
    /// How long the process has run, from its start time and the boot clock.
    fn running_for(&self, stat: &ProcStat) -> Option<Duration>;
    /// A descriptor that becomes readable when a process that is not our child exits.
    fn pidfd_open(&self, pid: i32) -> io::Result<OwnedFd>;
    /// Leaders that carry an agent folder under `agents_dir` in their environment.
    fn marked_leaders(&self, agents_dir: &Path) -> Vec<MarkedLeader>;
    /// Clock ticks per second and bytes per page, the units of `/proc/PID/stat`.
    fn proc_units(&self) -> (u64, u64);
}

/// The host itself, with the keeper that starts the agents and the cgroups found at start.
pub(crate) struct System {
    units: (u64, u64),
    keeper: KeeperClient,
    cgroups: Option<Arc<Cgroups>>,
    described: String,
    root: bool,
    sandbox: SandboxSupport,
    /// Network namespaces made ahead, from the first sandboxed spawn on.
    nets: std::sync::OnceLock<Arc<netns::NetPool>>,
    /// The LLM gateway's port, served inside `PROXY` agents' namespaces too.
    gateway_port: Option<u16>,
}

impl System {
    pub fn new(
        keeper: KeeperClient,
        detected: Detected,
        sandbox: SandboxSupport,
        gateway_port: Option<u16>,
    ) -> System {
        let described = detected.describe();
        System {
            units: proc_units(),
            keeper,
            cgroups: match detected {
                Detected::Cgroups(cgroups) => Some(Arc::new(cgroups)),
                Detected::None(_) => None,
            },
            described,
            root: nix::unistd::geteuid().is_root(),
            sandbox,
            nets: std::sync::OnceLock::new(),
            gateway_port,
        }
    }

    pub fn keeper(&self) -> &KeeperClient {
        &self.keeper
    }

    /// What stands in for a limit the host has no cgroup controller for, and a line for
    /// each such limit that says how it is enforced instead.
    fn fallbacks(&self, resources: &Resources) -> (ProcessSetup, Vec<String>) {
        let has = |controller| self.cgroups.as_ref().is_some_and(|c| c.has(controller));
        let mut setup = ProcessSetup {
            nice: resources.nice,
            ..ProcessSetup::default()
        };
        if let Some(files) = resources.open_files_max {
            setup.rlimits.push((Rlimit::OpenFiles, u64::from(files)));
        }
        let mut notes = Vec::new();
        if let Some(bytes) = resources.memory_max_bytes()
            && !has(Controller::Memory)
        {
            setup.rlimits.push((Rlimit::AddressSpace, bytes));
            notes.push(
                "memory_max_mb: RLIMIT_AS, a limit on each process's address space, not on \
                 resident memory; allocations fail instead of an OOM kill"
                    .to_string(),
            );
        }
        if let Some(pids) = resources.pids_max
            && !has(Controller::Pids)
        {
            setup.rlimits.push((Rlimit::Processes, u64::from(pids)));
            notes.push(
                "pids_max: RLIMIT_NPROC, which counts every process of the agent's user and \
                 does not bind root"
                    .to_string(),
            );
        }
        if !resources.cpus.is_empty() && !has(Controller::Cpuset) {
            setup.cpus = resources.cpus.clone();
            notes.push(
                "cpus: sched_setaffinity, which a process of the agent may widen again".to_string(),
            );
        }
        (setup, notes)
    }
}

impl Os for System {
    fn containment(&self) -> (Containment, String) {
        let containment = self
            .cgroups
            .as_ref()
            .map_or(Containment::ProcessGroup, |c| c.containment);
        (containment, self.described.clone())
    }

    fn check_spec(&self, spec: &AgentSpec) -> Result<()> {
        let resources = &spec.resources;
        let unsupported = |field, problem: String| Err(Error::Unsupported { field, problem });
        if spec.run_as.is_some() && !self.root {
            return unsupported(
                "user",
                "agentd does not run as root, so it cannot start an agent as another user".into(),
            );
        }
        if let Some(sandbox) = &spec.sandbox {
            self.sandbox.check(sandbox)?;
        }
        let has = |controller| self.cgroups.as_ref().is_some_and(|c| c.has(controller));
        let v2_memory = self
            .cgroups
            .as_ref()
            .is_some_and(|c| c.v2(Controller::Memory));
        if resources.memory_high_mb.is_some() && !v2_memory {
            return unsupported(
                "resources.memory_high_mb",
                format!(
                    "needs the memory controller of cgroup v2, and this host offers {}",
                    self.described
                ),
            );
        }
        if resources.cpu_max_cores.is_some() && !has(Controller::Cpu) {
            return unsupported(
                "resources.cpu_max_cores",
                format!(
                    "needs a cgroup cpu controller (setrlimit cannot share a CPU), and this \
                     host offers {}",
                    self.described
                ),
            );
        }
        Ok(())
    }

    fn sandbox_support(&self) -> SandboxSupport {
        let listening = self.sandbox.syscall_denials;
        self.sandbox.clone().reporting(listening)
    }

    fn proxy_listener(&self, pid: i32) -> io::Result<std::net::TcpListener> {
        netns::listen_in(pid, netns::PROXY_PORT)
    }

    fn gateway_listener(&self, pid: i32) -> io::Result<Option<std::net::TcpListener>> {
        self.gateway_port
            .map(|port| netns::listen_in(pid, port))
            .transpose()
    }

    fn spawn(&self, mut order: SpawnOrder, done: SpawnDone) {
        let (setup, fallbacks) = self.fallbacks(&order.resources);
        order.setup = ProcessSetup {
            run_as: order.setup.run_as.take(),
            confine: order.setup.confine.take(),
            ..setup
        };
        // Its own network: made here, joined by the child through this process's descriptor
        // (the keeper runs as agentd's user and opens it by path), held until it has.
        let nets = || {
            self.nets
                .get_or_init(|| netns::NetPool::start(self.gateway_port))
        };
        let net = match order.network {
            Some(Network::None) => nets().take(false).map(Some),
            Some(Network::Proxy) => nets().take(true).map(Some),
            Some(Network::Host) | None => Ok(None),
        };
        let mut net = match net {
            Ok(net) => net,
            Err(error) => return done(Err(error)),
        };
        if let (Some(net), Some(confine)) = (&net, &mut order.setup.confine) {
            confine.net_ns = Some(PathBuf::from(format!(
                "/proc/{}/fd/{}",
                std::process::id(),
                net.ns.as_raw_fd()
            )));
        }
        let cgroups = self.cgroups.clone();
        let cgroup = match &cgroups {
            Some(cgroups) => {
                let rel = cgroups.path_of(&order.agent_id);
                let _span =
                    tracing::info_span!(target: trace::TARGET, "agentd.spawn.cgroup").entered();
                match cgroups.prepare(&rel, &order.resources) {
                    Ok(joins) => order.joins = Some(joins),
                    Err(error) => return done(Err(error)),
                }
                Some(rel)
            }
            None => None,
        };
        // From the order to the keeper's answer, which comes later (`keeper/orders.rs`).
        let span = tracing::info_span!(target: trace::TARGET, "agentd.spawn.keeper");
        self.keeper.spawn(
            order,
            Box::new(move |started| {
                drop(span);
                if let (Err(_), Some(cgroups), Some(rel)) = (&started, &cgroups, &cgroup) {
                    let _ = cgroups.remove(rel);
                }
                done(started.map(|started| Started {
                    cgroup,
                    fallbacks,
                    proxy: net.as_mut().and_then(|net| net.listener.take()),
                    gateway: net.and_then(|net| net.gateway),
                    ..started
                }));
            }),
        );
    }

    fn signal_group(&self, hold: Hold<'_>, signal: Signal) -> io::Result<bool> {
        match (&self.cgroups, hold.cgroup) {
            (Some(cgroups), Some(cgroup)) => cgroups.signal(cgroup, signal),
            _ => signal_group(hold.pgid, signal),
        }
    }

    fn freeze(&self, hold: Hold<'_>, frozen: bool) -> io::Result<()> {
        match (&self.cgroups, hold.cgroup) {
            (Some(cgroups), Some(cgroup)) => cgroups.freeze(cgroup, frozen),
            _ => {
                let signal = if frozen {
                    Signal::SIGSTOP
                } else {
                    Signal::SIGCONT
                };
                signal_group(hold.pgid, signal).map(drop)
            }
        }
    }

    fn oom_killed(&self, cgroup: &Path) -> bool {
        self.cgroups
            .as_ref()
            .is_some_and(|cgroups| cgroups.oom_kills(cgroup) > 0)
    }

    fn cgroup_events(&self, cgroup: &Path) -> Option<PathBuf> {
        Some(self.cgroups.as_ref()?.events_file(cgroup))
    }

    fn remove_cgroup(&self, cgroup: &Path) -> io::Result<()> {
        match &self.cgroups {
            Some(cgroups) => cgroups.remove(cgroup),
            None => Ok(()),
        }
    }

    fn agent_cgroups(&self) -> Vec<(String, PathBuf, Vec<i32>)> {
        let Some(cgroups) = &self.cgroups else {
            return Vec::new();
        };
        cgroups
            .agent_cgroups()
            .into_iter()
            .map(|id| {
                let rel = cgroups.path_of(&id);
                let members = cgroups.members(&rel);
                (id, rel, members)
            })
            .collect()
    }

    fn remove_cgroup_root(&self) {
        if let Some(cgroups) = &self.cgroups {
            cgroups.remove_root();
        }
    }

    fn signal_process(&self, pid: i32, signal: Signal) -> io::Result<bool> {
        signal_process(pid, signal)
    }

    fn reap_one(&self) -> Option<(i32, Exit)> {
        reap_one()
    }

    fn held_processes(&self, hold: Hold<'_>) -> Vec<i32> {
        match (&self.cgroups, hold.cgroup) {
            (Some(cgroups), Some(cgroup)) => cgroups.members(cgroup),
            _ => crate::process::all_processes()
                .filter(|(_, stat)| stat.pgrp == hold.pgid)
                .map(|(pid, _)| pid)
                .collect(),
        }
    }

    fn group_alive(&self, hold: Hold<'_>) -> bool {
        match (&self.cgroups, hold.cgroup) {
            (Some(cgroups), Some(cgroup)) => cgroups.populated(cgroup),
            _ => GroupProbe::default().alive(hold.pgid),
        }
    }

    fn live_groups(&self, pgids: &[i32]) -> HashSet<i32> {
        let mut probe = GroupProbe::default();
        pgids
            .iter()
            .copied()
            .filter(|&pgid| probe.alive(pgid))
            .collect()
    }

    fn proc_stat(&self, pid: i32) -> Option<ProcStat> {
        proc_stat(pid)
    }

    fn running_for(&self, stat: &ProcStat) -> Option<Duration> {
        let started = stat.start_ticks as f64 / self.units.0 as f64;
        Some(Duration::from_secs_f64((uptime()? - started).max(0.0)))
    }

    fn pidfd_open(&self, pid: i32) -> io::Result<OwnedFd> {
        pidfd_open(pid)
    }

    fn marked_leaders(&self, agents_dir: &Path) -> Vec<MarkedLeader> {
        marked_leaders(agents_dir)
    }

    fn proc_units(&self) -> (u64, u64) {
        self.units
    }
}

/// Tells which watched files were modified: `cgroup.events` of cgroups whose emptying a
/// stop waits for. Clones share one inotify descriptor.
#[derive(Clone)]
pub(crate) struct ChangeWatch {
    inotify: std::sync::Arc<AsyncFd<crate::logs::InotifyFd>>,
}

impl ChangeWatch {
    pub fn new() -> io::Result<ChangeWatch> {
        use nix::sys::inotify::{InitFlags, Inotify};
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the inotify descriptor is valid and owned by `InotifyFd`, which the
        // `AsyncFd` owns until it is dropped.
        let inotify = unsafe {
            AsyncFd::register_with_interest(crate::logs::InotifyFd(inotify), Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(ChangeWatch {
            inotify: std::sync::Arc::new(inotify),
        })
    }

    pub fn add(&self, path: &Path) -> io::Result<WatchDescriptor> {
        use nix::sys::inotify::AddWatchFlags;
        Ok(self
            .inotify
            .get_ref()
            .0
            .add_watch(path, AddWatchFlags::IN_MODIFY)?)
    }

    pub fn remove(&self, watch: WatchDescriptor) {
        // Fails only when the file is already gone, which removed the watch.
        let _ = self.inotify.get_ref().0.rm_watch(watch);
    }

    /// Waits for changes; returns the watches whose file changed.
    pub async fn changed(&self) -> io::Result<Vec<WatchDescriptor>> {
        loop {
            let mut ready = self.inotify.readable().await?;
            match ready.get_inner().0.read_events() {
                Ok(events) => return Ok(events.into_iter().map(|event| event.wd).collect()),
                Err(Errno::EAGAIN) => ready.clear_ready(),
                Err(errno) => return Err(errno.into()),
            }
        }
    }
}

pub(crate) use nix::sys::inotify::WatchDescriptor;
