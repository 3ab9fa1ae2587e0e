//! Starting one agent process, in the keeper: the leader of a new process group, in its
//! cgroups from its first instruction, with its limits, priority, affinity and user set
//! before it runs the agent's command.
//!
//! With a v2 cgroup the process is created inside it (`clone3` with `CLONE_INTO_CGROUP`):
//! moving a process into a cgroup afterwards waits for an RCU grace period (about 0.45 ms
//! here), being born there costs nothing. Between clone and exec the child makes only
//! system calls on values prepared before, as after a `fork`. Without a cgroup (or on a
//! kernel before 5.7) std's `Command` starts it, joining cgroups in `pre_exec`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::libc;
use serde::{Deserialize, Serialize};

use crate::cgroup::Joins;
use crate::confine::{Confinement, Prepared};
use crate::process::proc_stat;
use crate::spec::RunAs;

/// What to start and where its output goes.
pub struct Launch<'a> {
    pub command: &'a [String],
    /// The whole environment: nothing is inherited.
    pub env: &'a [(String, String)],
    pub working_dir: &'a Path,
    pub stdout: File,
    pub stderr: File,
    /// Where it runs: its v2 cgroup (it is cloned into it) and v1 ones (it joins them).
    pub joins: Option<&'a Joins>,
    pub setup: &'a ProcessSetup,
}

/// A resource limit set with `setrlimit` (soft and hard).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rlimit {
    AddressSpace,
    Processes,
    OpenFiles,
}

/// What a new process sets up for itself between `fork` and `exec`, after joining its
/// cgroups: limits, priority, affinity, and last its user.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessSetup {
    pub rlimits: Vec<(Rlimit, u64)>,
    pub nice: Option<i32>,
    /// `sched_setaffinity`, where no cpuset controller holds the agent.
    pub cpus: Vec<u32>,
    pub run_as: Option<RunAs>,
    /// Sandboxed: its namespaces, files and system calls (see `confine.rs`).
    pub confine: Option<Confinement>,
}

/// [`ProcessSetup`] turned into plain values before the fork, so the child only makes
/// system calls.
struct ChildSetup {
    cgroup_fds: Vec<i32>,
    rlimits: Vec<(libc::__rlimit_resource_t, libc::rlimit)>,
    nice: Option<i32>,
    cpus: Option<libc::cpu_set_t>,
    run_as: Option<(u32, u32, Vec<libc::gid_t>)>,
    /// agentd runs as root, so it can empty the bounding set of an agent with a user.
    privileged: bool,
    /// The confinement and the working folder to enter once its mounts are in place.
    confine: Option<(Prepared, CString)>,
}

impl ChildSetup {
    fn new(setup: &ProcessSetup, cgroup_fds: Vec<i32>, cwd: &Path) -> io::Result<ChildSetup> {
        let confine = match &setup.confine {
            Some(confinement) => Some((
                Prepared::new(confinement)?,
                c_string(cwd.as_os_str().as_bytes())?,
            )),
            None => None,
        };
        let rlimits = setup
            .rlimits
            .iter()
            .map(|&(which, value)| {
                let resource = match which {
                    Rlimit::AddressSpace => libc::RLIMIT_AS,
                    Rlimit::Processes => libc::RLIMIT_NPROC,
                    Rlimit::OpenFiles => libc::RLIMIT_NOFILE,
                };
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                (resource, limit)
            })
            .collect();
        let cpus = (!setup.cpus.is_empty()).then(|| {
            // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET sets one bit of it, for
            // CPUs within its size (1024) only.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                let bits = 8 * std::mem::size_of::<libc::cpu_set_t>();
                for &cpu in setup.cpus.iter().filter(|&&cpu| (cpu as usize) < bits) {
                    libc::CPU_SET(cpu as usize, &mut set);
                }
                set
            }
        });
        Ok(ChildSetup {
            cgroup_fds,
            rlimits,
            nice: setup.nice,
            cpus,
            run_as: setup
                .run_as
                .as_ref()
                .map(|run_as| (run_as.uid, run_as.gid, run_as.groups.clone())),
            privileged: nix::unistd::geteuid().is_root(),
            confine,
        })
    }

    /// The agent runs in a PID namespace of its own (see `confine.rs`).
    fn pid_namespace(&self) -> bool {
        self.confine
            .as_ref()
            .is_some_and(|(confine, _)| confine.pid_namespace)
    }

    /// Runs in the child between `fork` and `exec`: system calls only, no allocation.
    fn apply(&self) -> io::Result<()> {
        let check = |result: libc::c_int| {
            if result < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        crate::cgroup::join_self(&self.cgroup_fds)?;
        if let Some((confine, cwd)) = &self.confine {
            confine.enter(cwd)?;
        }
        for (resource, limit) in &self.rlimits {
            // SAFETY: a valid resource and a pointer to a live rlimit.
            check(unsafe { libc::setrlimit(*resource, limit) })?;
        }
        if let Some(nice) = self.nice {
            // SAFETY: plain integers.
            check(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) })?;
        }
        if let Some(set) = &self.cpus {
            // SAFETY: a pointer to a live cpu_set_t and its size.
            check(unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) })?;
        }
        if let Some((uid, gid, groups)) = &self.run_as {
            // SAFETY: a pointer to the groups and their count, then plain ids; groups first,
            // then the group, then the user (after which nothing else could be changed).
            check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
            check(unsafe { libc::setgid(*gid) })?;
            if self.privileged {
                drop_bounding_set()?;
            }
            check(unsafe { libc::setuid(*uid) })?;
            drop_capabilities()?;
        }
        if let Some((confine, _)) = &self.confine {
            // No capabilities, even for an agent that runs as root.
            if self.run_as.is_none() {
                if self.privileged {
                    drop_bounding_set()?;
                }
                drop_capabilities()?;
            }
            confine.restrict()?;
        }
        Ok(())
    }
}

/// Empties the capability bounding set, so nothing the agent runs can gain a capability
/// (not even a program run as uid 0). Needs CAP_SETPCAP: before `setuid`.
fn drop_bounding_set() -> io::Result<()> {
    for capability in 0..64 {
        // SAFETY: plain integers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability, 0, 0, 0) } < 0 {
            let error = io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if error.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(error);
        }
    }
    Ok(())
}

/// No capability in any set, and none to be gained through `execve` (`no_new_privs`: setuid
/// and file capabilities no longer raise anything).
fn drop_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let none = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    let check = |result: libc::c_long| {
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain integers, and pointers to a live header and its two data words.
    unsafe {
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
        )?;
        check(libc::syscall(libc::SYS_capset, &header, none.as_ptr()))?;
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into())
    }
}

/// Whether a sandboxed agent must get a PID namespace of its own (see `confine.rs`).
fn setup_needs_pid_namespace(setup: &ProcessSetup) -> bool {
    setup.confine.is_some() && crate::confine::landlock_abi() < crate::confine::LANDLOCK_SCOPES_ABI
}

/// Starts the command as the leader of a new process group, in its cgroups from its first
/// instruction on. The child is never waited for here: the keeper's reaper collects its exit.
pub fn spawn(launch: Launch<'_>) -> io::Result<Started> {
    if launch.command.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
    }
    // Open until the child exists: it writes itself into each.
    let v1_files = launch
        .joins
        .map_or(&[][..], |joins| &joins.v1_procs[..])
        .iter()
        .map(|path| std::fs::OpenOptions::new().write(true).open(path))
        .collect::<io::Result<Vec<File>>>()?;
    let v1_fds = v1_files.iter().map(AsRawFd::as_raw_fd).collect();
    let pid = match launch.joins {
        Some(joins) => {
            let setup = ChildSetup::new(launch.setup, v1_fds, launch.working_dir)?;
            match clone_into(&launch, Some(&joins.v2), setup)? {
                Some(pid) => pid,
                // clone3 or CLONE_INTO_CGROUP unknown to this kernel (or refused by a seccomp
                // profile agentd runs under): join after the fork, but never without a PID
                // namespace the sandbox needs.
                None if setup_needs_pid_namespace(launch.setup) => {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "clone3 is not available, and this sandbox needs a PID namespace of its \
                         own (Landlock below ABI 6)",
                    ));
                }
                None => {
                    let mut files = v1_files
                        .iter()
                        .map(File::try_clone)
                        .collect::<io::Result<Vec<File>>>()?;
                    files.push(
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(joins.v2.join("cgroup.procs"))?,
                    );
                    let fds = files.iter().map(AsRawFd::as_raw_fd).collect();
                    let setup = ChildSetup::new(launch.setup, fds, launch.working_dir)?;
                    let pid = command_spawn(launch, Some(setup));
                    drop(files);
                    pid?
                }
            }
        }
        None if *launch.setup == ProcessSetup::default() => command_spawn(launch, None)?,
        None => {
            let setup = ChildSetup::new(launch.setup, Vec::new(), launch.working_dir)?;
            if setup.pid_namespace() {
                clone_into(&launch, None, setup)?.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::Unsupported, "no clone3 on this kernel")
                })?
            } else {
                command_spawn(launch, Some(setup))?
            }
        }
    };
    drop(v1_files);
    Ok(Started {
        pid,
        start_ticks: proc_stat(pid).map(|stat| stat.start_ticks),
        cgroup: None,
        fallbacks: Vec::new(),
        proxy: None,
        gateway: None,
    })
}

/// std's way (`posix_spawn` when there is nothing to set up, else fork and exec).
fn command_spawn(launch: Launch<'_>, setup: Option<ChildSetup>) -> io::Result<i32> {
    let (program, args) = launch
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(launch.working_dir)
        .stdin(Stdio::null())
        .stdout(launch.stdout)
        .stderr(launch.stderr)
        .process_group(0);
    if let Some(setup) = setup {
        // SAFETY: `apply` makes only async-signal-safe system calls on values prepared
        // before the fork.
        unsafe {
            command.pre_exec(move || setup.apply());
        }
    }
    let child = command.spawn()?;
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pid out of range"))?;
    // Dropping a std `Child` neither waits nor kills.
    drop(child);
    Ok(pid)
}

/// The kernel's `struct clone_args` (Linux 5.7 and later, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

fn c_string(text: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// Everything `execve` needs, built before the clone.
struct Exec {
    /// Where to look for the program: itself when it names a path, else each `PATH` entry.
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
}

impl Exec {
    fn new(launch: &Launch<'_>) -> io::Result<Exec> {
        // A later entry wins, as with std's `Command::envs`.
        let env: BTreeMap<&str, &str> = launch
            .env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let program = &launch.command[0];
        let candidates = if program.contains('/') {
            vec![c_string(program.as_str())?]
        } else {
            let path = env
                .get("PATH")
                .copied()
                .unwrap_or("/usr/local/bin:/usr/bin:/bin");
            path.split(':')
                .map(|dir| if dir.is_empty() { "." } else { dir })
                .map(|dir| c_string(format!("{dir}/{program}")))
                .collect::<io::Result<_>>()?
        };
        Ok(Exec {
            candidates,
            argv: launch
                .command
                .iter()
                .map(|arg| c_string(arg.as_str()))
                .collect::<io::Result<_>>()?,
            envp: env
                .iter()
                .map(|(key, value)| c_string(format!("{key}={value}")))
                .collect::<io::Result<_>>()?,
        })
    }
}

/// Null-terminated pointers to C strings, for `execve`.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Creates the process inside `cgroup` and runs the command in it; answers once `execve`
/// succeeded, or with the error that stopped the child. `Ok(None)`: this kernel has no
/// `clone3` or no `CLONE_INTO_CGROUP` (before 5.7), and nothing was started.
///
/// In a PID namespace of its own, the agent is not the child cloned here (that one makes the
/// namespace and exits) but its sibling, made with `CLONE_PARENT`: the keeper is its parent,
/// reaps it and reads its real exit status, and its pid comes back on a pipe.
fn clone_into(
    launch: &Launch<'_>,
    cgroup: Option<&Path>,
    setup: ChildSetup,
) -> io::Result<Option<i32>> {
    let exec = Exec::new(launch)?;
    let (argv, envp) = (pointers(&exec.argv), pointers(&exec.envp));
    let cwd = c_string(launch.working_dir.as_os_str().as_bytes())?;
    let stdin = File::open("/dev/null")?;
    let dir = cgroup.map(File::open).transpose()?;
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let pid_pipe = if setup.pid_namespace() {
        Some(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
    } else {
        None
    };
    let stdio = [
        stdin.as_raw_fd(),
        launch.stdout.as_raw_fd(),
        launch.stderr.as_raw_fd(),
    ];
    let mut pidfd: i32 = -1;
    let mut args = CloneArgs {
        flags: libc::CLONE_PIDFD as u64,
        pidfd: &mut pidfd as *mut i32 as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..CloneArgs::default()
    };
    if let Some(dir) = &dir {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = dir.as_raw_fd() as u64;
    }
    // SAFETY: `args` is a valid clone_args of the size passed. Without CLONE_VM the child
    // gets a copy of this process, as with fork, and runs `child`, which never returns.
    let pid = unsafe { clone3(&args) };
    if pid < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL) => Ok(None),
            _ => Err(error),
        };
    }
    if pid == 0 {
        let report = Report {
            errno: report_write.as_raw_fd(),
            agent_pid: pid_pipe.as_ref().map(|(_, write)| write.as_raw_fd()),
        };
        // SAFETY: in the new process; only system calls on values prepared above.
        unsafe { child(&stdio, &cwd, &setup, &exec.candidates, &argv, &envp, report) }
    }
    drop(report_write);
    // SAFETY: clone3 filled in a descriptor of ours for the child.
    let mut pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
    let mut pid = i32::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pid out of range"))?;
    if let Some((pid_read, pid_write)) = pid_pipe {
        drop(pid_write);
        let mut agent = [0u8; 4];
        // Nothing: the namespace's maker failed, and said why on `report`.
        if nix::unistd::read(&pid_read, &mut agent)? == 4 {
            pid = i32::from_ne_bytes(agent);
            // SAFETY: plain integers; the agent is our child, not yet reaped, so its pid
            // names it.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd >= 0 {
                // SAFETY: pidfd_open returned a descriptor of ours.
                pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
            }
        }
    }
    // The write end closes on a successful exec; an errno comes first if anything failed
    // (the child then exits, and the reaper collects it).
    let mut errno = [0u8; 4];
    match nix::unistd::read(&report_read, &mut errno) {
        Ok(0) => Ok(Some(pid)),
        Ok(_) => {
            // Answer once the child is gone, so its cgroup is empty and can be removed.
            let mut exited = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd; it waits at most a second for an exit already under way.
            unsafe { libc::poll(&mut exited, 1, 1000) };
            Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)))
        }
        Err(error) => Err(error.into()),
    }
}

/// # Safety
/// As `fork`: the child gets a copy of this process and must only make system calls.
unsafe fn clone3(args: &CloneArgs) -> libc::c_long {
    // SAFETY: a valid clone_args of the size passed.
    unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    }
}

/// Makes the agent's PID namespace, between clone and exec: its first process (the
/// namespace's init, [`namespace_init`]) and then the agent, both children of the keeper
/// (`CLONE_PARENT`). Returns in the agent; this process writes the agent's pid on
/// `pid_report` and exits, or reports an errno on `report`.
///
/// # Safety
/// Only in the child of a clone: system calls only.
unsafe fn enter_pid_namespace(report: i32, pid_report: i32) {
    // SAFETY (whole body): system calls on integers and buffers of this function.
    unsafe {
        let fail = || -> ! {
            let errno = *libc::__errno_location();
            libc::write(report, (&errno as *const i32).cast(), 4);
            libc::_exit(127)
        };
        let mut sync = [0i32; 2];
        if libc::unshare(libc::CLONE_NEWPID) < 0 || libc::pipe2(sync.as_mut_ptr(), 0) < 0 {
            fail();
        }
        // `exit_signal` must be 0 with CLONE_PARENT: the children exit with ours (SIGCHLD).
        let sibling = CloneArgs {
            flags: libc::CLONE_PARENT as u64,
            ..CloneArgs::default()
        };
        match clone3(&sibling) {
            0 => namespace_init(sync[0]),
            init if init < 0 => fail(),
            _ => {}
        }
        let agent = clone3(&sibling);
        if agent == 0 {
            libc::close(sync[0]);
            libc::close(sync[1]);
            return;
        }
        if agent < 0 {
            fail();
        }
        let agent = agent as i32;
        libc::write(pid_report, (&agent as *const i32).cast(), 4);
        // The init may now watch the agent: it is there.
        libc::write(sync[1], [1u8].as_ptr().cast(), 1);
        libc::_exit(0)
    }
}

/// SIGCHLD's handler in the namespace's init: it only interrupts `ppoll`.
extern "C" fn woken(_: libc::c_int) {}

/// The first process of an agent's PID namespace, as long as the agent runs: it reaps the
/// orphans reparented to it there and exits once the agent (pid 2 there, its sibling) has,
/// which ends whatever is left in the namespace. It keeps no descriptor but `sync`, no
/// capability, and is not dumpable (nothing there can read its memory or `/proc` entries);
/// as a namespace's init with no handler but SIGCHLD's (which only wakes it), no other
/// signal from inside reaches it, and from outside only SIGKILL and SIGSTOP.
///
/// # Safety
/// Only in the child of a clone: system calls only.
unsafe fn namespace_init(sync: i32) -> ! {
    // SAFETY (whole body): system calls on integers and on this function's own buffers.
    unsafe {
        // Nothing of the keeper's stays open here (the agent's report pipes above all: the
        // keeper reads them to their end). Without close_range, one by one.
        let close_from = |first: i32, last: u32| {
            if libc::syscall(libc::SYS_close_range, first, last, 0) < 0 {
                let mut limit: libc::rlimit = std::mem::zeroed();
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                let end = limit.rlim_cur.min(u64::from(last) + 1).min(1 << 20) as i32;
                for fd in first..end {
                    libc::close(fd);
                }
            }
        };
        if sync > 0 {
            close_from(0, (sync - 1) as u32);
        }
        close_from(sync + 1, u32::MAX);
        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_NAME, c"agentd-init".as_ptr(), 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        if drop_capabilities().is_err() {
            libc::_exit(1);
        }
        // The keeper's handlers mean nothing here: every signal at its default.
        for signal in 1..32 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = woken as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_NOCLDSTOP;
        libc::sigaction(libc::SIGCHLD, &action, std::ptr::null_mut());
        let mut child: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut child);
        libc::sigaddset(&mut child, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &child, std::ptr::null_mut());
        let mut byte = 0u8;
        loop {
            match libc::read(sync, (&mut byte as *mut u8).cast(), 1) {
                1 => break,
                n if n < 0 && *libc::__errno_location() == libc::EINTR => {}
                // The agent was never made.
                _ => libc::_exit(0),
            }
        }
        libc::close(sync);
        let agent = libc::syscall(libc::SYS_pidfd_open, 2, 0);
        if agent < 0 {
            // Gone already.
            libc::_exit(0);
        }
        let mut exited = libc::pollfd {
            fd: agent as i32,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut any: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut any);
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            // SIGCHLD, blocked but for this wait, interrupts it.
            if libc::ppoll(&mut exited, 1, std::ptr::null(), &any) > 0 {
                libc::_exit(0);
            }
        }
    }
}

/// Where the new process reports: the errno of its first failure, and in a PID namespace of
/// its own the agent's pid.
#[derive(Clone, Copy)]
struct Report {
    errno: i32,
    agent_pid: Option<i32>,
}

/// The new process, between clone and exec. Reports the errno of the first failure on
/// `report` and exits 127.
///
/// # Safety
/// Only in the child of a clone: it makes system calls and never returns.
unsafe fn child(
    stdio: &[i32; 3],
    cwd: &CString,
    setup: &ChildSetup,
    candidates: &[CString],
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    report: Report,
) -> ! {
    // SAFETY (whole body): system calls on descriptors and buffers that live until exec.
    unsafe {
        let fail = |errno: i32| -> ! {
            libc::write(report.errno, (&errno as *const i32).cast(), 4);
            libc::_exit(127)
        };
        let errno = || *libc::__errno_location();
        // A fresh process expects no blocked signals and SIGPIPE at its default.
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        if let Some(agent_pid) = report.agent_pid {
            enter_pid_namespace(report.errno, agent_pid);
        }
        for (target, &fd) in stdio.iter().enumerate() {
            let target = target as i32;
            let done = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if done < 0 {
                fail(errno());
            }
        }
        if libc::chdir(cwd.as_ptr()) < 0 || libc::setpgid(0, 0) < 0 {
            fail(errno());
        }
        if let Err(error) = setup.apply() {
            fail(error.raw_os_error().unwrap_or(libc::EPERM));
        }
        // As execvp: the first candidate that exists, else the most telling error.
        let mut worst = libc::ENOENT;
        for candidate in candidates {
            libc::execve(candidate.as_ptr(), argv.as_ptr(), envp.as_ptr());
            match errno() {
                libc::ENOENT | libc::ENOTDIR => {}
                libc::EACCES => worst = libc::EACCES,
                other => fail(other),
            }
        }
        fail(worst)
    }
}

/// A started leader process.
pub struct Started {
    pub pid: i32,
    pub start_ticks: Option<u64>,
    /// Its cgroup, relative to the hierarchies.
    pub cgroup: Option<std::path::PathBuf>,
    /// Limits enforced without a cgroup, and how.
    pub fallbacks: Vec<String>,
    /// A `PROXY` agent's proxy listener, bound inside its network namespace.
    pub proxy: Option<std::net::TcpListener>,
    /// And the LLM gateway's, when agentd runs one.
    pub gateway: Option<std::net::TcpListener>,
}
