//! Every effect the supervisor has on the operating system: starting a process in its own
//! group, signalling groups, reaping children, reading `/proc`. Nothing else in the crate
//! calls `kill`, `waitpid` or `fork`.
//!
//! Architecture invariant: [`reap_one`] is the only `waitpid` in the daemon, and it runs on
//! the supervisor task, the same task that calls [`spawn`] (std's `spawn` waits for a child
//! whose `exec` failed, so the two must never run at the same time).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::agent::Exit;

/// Makes orphaned descendants of agents our children, so that we can reap them.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// What to start and where its output goes.
pub struct Launch<'a> {
    pub command: &'a [String],
    pub env: &'a [(String, String)],
    pub working_dir: &'a Path,
    pub stdout: File,
    pub stderr: File,
}

/// A started leader process.
pub struct Started {
    pub pid: i32,
    pub start_ticks: Option<u64>,
}

/// Starts the command as the leader of a new process group. The child is never waited for
/// here: [`reap_one`] collects its exit.
pub fn spawn(launch: Launch<'_>) -> io::Result<Started> {
    let (program, args) = launch
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let child = Command::new(program)
        .args(args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(launch.working_dir)
        .stdin(Stdio::null())
        .stdout(launch.stdout)
        .stderr(launch.stderr)
        .process_group(0)
        .spawn()?;
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "pid out of range"))?;
    // Dropping a std `Child` neither waits nor kills.
    drop(child);
    Ok(Started {
        pid,
        start_ticks: proc_stat(pid).map(|stat| stat.start_ticks),
    })
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
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashSet::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(proc_stat)
        .filter(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
        .map(|stat| stat.pgrp)
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
    pub start_ticks: u64,
}

pub fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(&text)
}

/// Parses a `/proc/PID/stat` line. The command name may hold spaces and parentheses, so
/// fields are counted from the last `)`.
fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 of proc(5).
    let field = |n: usize| fields.get(n - 3).copied();
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        ppid: field(4)?.parse().ok()?,
        pgrp: field(5)?.parse().ok()?,
        num_threads: field(20)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
    })
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
        let stat = parse_proc_stat(line).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                ppid: 1,
                pgrp: 4242,
                num_threads: 3,
                start_ticks: 98765,
            }
        );
        assert!(parse_proc_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let stat = proc_stat(std::process::id() as i32).expect("own stat");
        assert!(stat.num_threads >= 1);
        assert!(["running", "sleeping"].contains(&state_name(stat.state)));
    }
}
