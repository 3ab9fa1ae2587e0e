//! Processes as the kernel shows them: `/proc` read and parsed (the fields agentd uses,
//! cheaply), and the few calls on processes that agentd and the keeper both make: signals,
//! reaping, becoming a subreaper, pidfds.
//!
//! Architecture invariant: [`reap_one`] is the only `waitpid` in the daemon, and it runs on
//! the supervisor task (and in the keeper, on its own children), the same task that starts
//! processes (std's `spawn` waits for a child whose `exec` failed, so the two must never run
//! at the same time).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::state::Exit;

/// Raises the soft limit on open files to the hard one, for agentd alone (the keeper, which
/// starts the agents, already runs): the sampler keeps a descriptor per agent. Returns the
/// limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use nix::libc;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the rlimit passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) < 0 {
            return 1024;
        }
        let soft = limit.rlim_cur;
        limit.rlim_cur = limit.rlim_max;
        if soft < limit.rlim_max && libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            return limit.rlim_max;
        }
        soft
    }
}

/// Makes orphaned descendants of agents our children, so that we can reap them.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Sends `signal` to every process of the group. `Ok(false)`: the group no longer exists.
pub fn signal_group(pgid: i32, signal: Signal) -> io::Result<bool> {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// Sends `signal` to one process. `Ok(false)`: it no longer exists.
pub fn signal_process(pid: i32, signal: Signal) -> io::Result<bool> {
    match kill(Pid::from_raw(pid), signal) {
        Ok(()) => Ok(true),
        Err(Errno::ESRCH) => Ok(false),
        Err(errno) => Err(errno.into()),
    }
}

/// Answers "does this process group still have a live member?". `kill(-pgid, 0)` alone
/// also counts zombies, and a zombie whose parent never reaps it (an adopted agent's
/// orphans under an init that does not reap) would keep a stop waiting forever, so a group
/// that `kill` still finds is confirmed with one scan of `/proc`, shared by every question
/// asked of the same probe.
#[derive(Default)]
pub struct GroupProbe {
    live_groups: Option<HashSet<i32>>,
}

impl GroupProbe {
    pub fn alive(&mut self, pgid: i32) -> bool {
        if matches!(killpg(Pid::from_raw(pgid), None), Err(Errno::ESRCH)) {
            return false;
        }
        self.live_groups
            .get_or_insert_with(live_groups)
            .contains(&pgid)
    }
}

/// Process groups with at least one member that is not a zombie.
fn live_groups() -> HashSet<i32> {
    all_processes()
        .filter(|(_, stat)| !matches!(stat.state, 'Z' | 'X' | 'x'))
        .map(|(_, stat)| stat.pgrp)
        .collect()
}

/// Reaps one exited child if there is one.
#[allow(clippy::disallowed_methods)] // the one place that waits for children
pub fn reap_one() -> Option<(i32, Exit)> {
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => return Some((pid.as_raw(), Exit::Code(code))),
            Ok(WaitStatus::Signaled(pid, signal, _core)) => {
                return Some((pid.as_raw(), Exit::Signal(signal as i32)));
            }
            // Stopped/continued children are not reported without WUNTRACED; keep going.
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return None,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(errno) => {
                tracing::error!(%errno, "waitpid failed");
                return None;
            }
        }
    }
}

/// The fields of `/proc/PID/stat` the supervisor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub num_threads: u32,
    /// Start time in clock ticks after boot: with the pid, it names one process for good.
    pub start_ticks: u64,
    /// User plus system time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, in pages.
    pub rss_pages: u64,
}

/// Reads `/proc/PID/stat`: one `open` and one `read`, everything the sampler needs.
pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let mut buffer = [0u8; 1024];
    parse_proc_stat(read_small(&format!("/proc/{pid}/stat"), &mut buffer)?)
}

/// Reads `/proc/PID/schedstat`: nanoseconds on the CPU and times scheduled. Both change
/// whenever the process runs, and the file is much cheaper to produce than `stat`. `None`
/// when the process is gone or the kernel keeps no such file.
pub fn proc_schedstat(pid: i32) -> Option<(u64, u64)> {
    let mut buffer = [0u8; 128];
    let mut fields = words(read_small(&format!("/proc/{pid}/schedstat"), &mut buffer)?);
    let run_ns = number(fields.next()?)?;
    let timeslices = number(fields.nth(1)?)?;
    Some((run_ns, timeslices))
}

/// Reads a `/proc` file that fits in `buffer` with one `read` (the kernel formats these
/// files whole on the first read). The bytes are not text: a command name is cut at 15
/// bytes, in the middle of a UTF-8 character if need be.
fn read_small<'a>(path: &str, buffer: &'a mut [u8]) -> Option<&'a [u8]> {
    use std::io::Read;
    let len = File::open(path).ok()?.read(buffer).ok()?;
    Some(&buffer[..len])
}

/// The whitespace-separated words of a `/proc` file.
fn words(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    bytes
        .split(u8::is_ascii_whitespace)
        .filter(|word| !word.is_empty())
}

/// A decimal number from `/proc`.
fn number<T: std::str::FromStr>(word: &[u8]) -> Option<T> {
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// Parses a `/proc/PID/stat` line. The command name may hold spaces, parentheses and bytes
/// that are not UTF-8, so fields are counted from the last `)`.
pub(crate) fn parse_proc_stat(bytes: &[u8]) -> Option<ProcStat> {
    let name_end = bytes.iter().rposition(|&b| b == b')')?;
    // Field 3 of proc(5) is the first after the command name; the last one used is 24.
    let mut fields: [&[u8]; 22] = [b""; 22];
    for (slot, value) in fields.iter_mut().zip(words(&bytes[name_end + 1..])) {
        *slot = value;
    }
    let field = |n: usize| fields[n - 3];
    let state = char::from(*field(3).first()?);
    let ppid = number(field(4))?;
    let pgrp = number(field(5))?;
    let utime: u64 = number(field(14))?;
    let stime: u64 = number(field(15))?;
    let num_threads = number(field(20))?;
    let start_ticks = number(field(22))?;
    let rss_pages = number(field(24))?;
    Some(ProcStat {
        state,
        ppid,
        pgrp,
        num_threads,
        start_ticks,
        cpu_ticks: utime + stime,
        rss_pages,
    })
}

/// The direct children of `pid`, read from each of its threads' `children` file (a child
/// belongs to the thread that forked it). `None` when the kernel has no such files
/// (`CONFIG_PROC_CHILDREN` is off).
pub fn proc_children(pid: i32, num_threads: u32, children: &mut Vec<i32>) -> Option<()> {
    let mut read = |tid: &str| -> Option<()> {
        let path = format!("/proc/{pid}/task/{tid}/children");
        const SIZE: usize = 4096;
        let mut buffer = [0u8; SIZE];
        let mut text = read_small(&path, &mut buffer)?;
        let long;
        // The kernel fills a read with whole entries: one that ends near the end of the
        // buffer may have more to come.
        if text.len() > SIZE - 16 {
            long = std::fs::read(&path).ok()?;
            text = &long;
        }
        children.extend(words(text).filter_map(number::<i32>));
        Some(())
    };
    if num_threads <= 1 {
        return read(&pid.to_string());
    }
    let mut any = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        if let Some(tid) = task
            .ok()
            .and_then(|task| task.file_name().into_string().ok())
        {
            any = any.or(read(&tid));
        }
    }
    any
}

/// Every process on the host, for kernels without `children` files.
pub fn all_processes() -> impl Iterator<Item = (i32, ProcStat)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| Some((pid, proc_stat(pid)?)))
}

/// A live process group leader whose environment names an agent folder of this daemon.
#[derive(Debug, Clone)]
pub struct MarkedLeader {
    pub pid: i32,
    pub stat: ProcStat,
    pub agent_id: String,
}

/// Every live process group leader that carries `AGENTD_AGENT_DIR=<agents_dir>/<id>` and the
/// matching `AGENTD_AGENT_ID` in its environment: what agentd started, whatever its records
/// say. A scan of all of `/proc` (and each leader's environment): for start-up only.
pub fn marked_leaders(agents_dir: &Path) -> Vec<MarkedLeader> {
    let own = std::process::id() as i32;
    let mut dir_marker = b"AGENTD_AGENT_DIR=".to_vec();
    dir_marker.extend_from_slice(agents_dir.as_os_str().as_encoded_bytes());
    dir_marker.push(b'/');
    all_processes()
        .filter(|(pid, stat)| {
            *pid != own && stat.pgrp == *pid && !matches!(stat.state, 'Z' | 'X' | 'x')
        })
        .filter_map(|(pid, stat)| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let mut vars = environ.split(|&b| b == 0);
            let id = vars
                .clone()
                .find_map(|var| var.strip_prefix(dir_marker.as_slice()))?;
            let id_var = [b"AGENTD_AGENT_ID=".as_slice(), id].concat();
            vars.any(|var| var == id_var.as_slice())
                .then(|| MarkedLeader {
                    pid,
                    stat,
                    agent_id: String::from_utf8_lossy(id).into_owned(),
                })
        })
        .collect()
}

/// Seconds since boot, on the clock that `start_ticks` counts from.
pub fn uptime() -> Option<f64> {
    let mut buffer = [0u8; 64];
    number(words(read_small("/proc/uptime", &mut buffer)?).next()?)
}

/// Clock ticks per second and bytes per page, the units of `/proc/PID/stat`.
pub fn proc_units() -> (u64, u64) {
    use nix::unistd::{SysconfVar, sysconf};
    let get = |var, fallback| match sysconf(var) {
        Ok(Some(value)) if value > 0 => value as u64,
        _ => fallback,
    };
    (
        get(SysconfVar::CLK_TCK, 100),
        get(SysconfVar::PAGE_SIZE, 4096),
    )
}

/// The psutil name of a `/proc` state letter.
pub fn state_name(state: char) -> &'static str {
    match state {
        'R' => "running",
        'S' => "sleeping",
        'D' => "disk-sleep",
        'T' => "stopped",
        't' => "tracing-stop",
        'Z' => "zombie",
        'X' | 'x' => "dead",
        'I' => "idle",
        'P' => "parked",
        'W' => "waking",
        'K' => "wake-kill",
        _ => "unknown",
    }
}

/// Hands memory that the allocator holds free back to the kernel. After many agents are
/// removed at once, their memory is free but scattered through the heap, where glibc would
/// keep it resident for good.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// A pidfd for a process that is not our child (an adopted agent): it becomes readable when
/// the process exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just gave us this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until the process behind `pidfd` exits.
pub async fn wait_for_exit(pidfd: OwnedFd) -> io::Result<()> {
    // SAFETY: an `OwnedFd` is a valid open descriptor, and the `AsyncFd` owns it until it is
    // dropped, so it keeps referring to the same pidfd.
    let pidfd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(io::Error::from)?;
    let _ready = pidfd.readable().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 98765 1000 50 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let stat = parse_proc_stat(line.as_bytes()).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                num_threads: 3,
                start_ticks: 98765,
                cpu_ticks: 3,
                rss_pages: 50,
            }
        );
        assert!(parse_proc_stat(b"garbage").is_none());
        // The kernel cuts a name at 15 bytes, in the middle of a character if need be.
        let mut cut = b"77 (ai-\xd0\xb0\xd0\xb3\xd0\xb5\xd0\xbd\xd1) S".to_vec();
        cut.extend_from_slice(&line.as_bytes()[line.find(") S").expect("state") + 3..]);
        assert_eq!(parse_proc_stat(&cut), Some(stat));
    }

    #[test]
    fn own_process_is_readable() {
        let stat = proc_stat(std::process::id() as i32).expect("own stat");
        assert!(stat.num_threads >= 1);
        assert!(["running", "sleeping"].contains(&state_name(stat.state)));
    }
}
