//! The operating system as the driver's unit tests see it: a spawn records a pid, a signal
//! is written down (and kills, unless the process ignores it), an exit happens when the test
//! says so and waits to be reaped; groups and `/proc` answer from these tables. Everything
//! it is asked, and what the supervisor tells its recorder, goes into one log, in order.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::error::Result;
use crate::events::EventKind;
use crate::keeper::{SpawnDone, SpawnOrder};
use crate::launch::Started;
use crate::os::Os;
use crate::process::{MarkedLeader, ProcStat};
use crate::recorder::Recorder;
use crate::sandbox::SandboxSupport;
use crate::spec::AgentSpec;
use crate::state::Containment;
use crate::state::Hold;
use crate::state::{EndReason, Exit};
use crate::stop::StopOutcome;

/// What happened, in order: `spawn a1`, `signal a1 SIGTERM`, `event Exited`...
#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, line: String) {
        lock(&self.0).push(line);
    }

    /// Everything written since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *lock(&self.0))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct Tables {
    next_pid: i32,
    /// Live processes: each agent's leader, alone in its group.
    live: BTreeMap<i32, (String, u64)>,
    /// Exited, waiting for `reap_one`.
    exited: VecDeque<(i32, Exit)>,
    /// Agents whose processes ignore SIGTERM.
    stubborn: HashSet<String>,
    /// Agents whose command cannot be started.
    unstartable: HashSet<String>,
    /// Agents whose process wrote over its environment: no scan of `/proc` finds it.
    unmarked: HashSet<String>,
    /// Answers to spawns the keeper has not given yet (`hold_launches`).
    held: Option<Vec<(io::Result<Started>, SpawnDone)>>,
}

pub(crate) struct FakeOs {
    tables: Mutex<Tables>,
    log: Log,
}

impl FakeOs {
    pub fn new(log: Log) -> FakeOs {
        let tables = Tables {
            next_pid: 1000,
            ..Tables::default()
        };
        FakeOs {
            tables: Mutex::new(tables),
            log,
        }
    }

    /// Its processes ignore SIGTERM (SIGKILL still ends them).
    pub fn stubborn(&self, agent_id: &str) {
        lock(&self.tables).stubborn.insert(agent_id.into());
    }

    /// Its command is not found.
    pub fn unstartable(&self, agent_id: &str) {
        lock(&self.tables).unstartable.insert(agent_id.into());
    }

    /// Its process wrote over its environment (as `setproctitle` does).
    pub fn unmarked(&self, agent_id: &str) {
        lock(&self.tables).unmarked.insert(agent_id.into());
    }

    /// From now on, the answers to spawns wait for `answer_launches` (the processes run).
    pub fn hold_launches(&self) {
        lock(&self.tables).held.get_or_insert_with(Vec::new);
    }

    /// Gives the answers held, in order, and holds no more.
    pub fn answer_launches(&self) {
        let held = lock(&self.tables).held.take().unwrap_or_default();
        for (started, done) in held {
            done(started);
        }
    }

    /// A process that runs now, as if an earlier agentd's keeper had started it.
    pub fn running(&self, agent_id: &str) -> (i32, u64) {
        let mut tables = lock(&self.tables);
        tables.next_pid += 1;
        let (pid, ticks) = (tables.next_pid, tables.next_pid as u64 * 10);
        tables.live.insert(pid, (agent_id.into(), ticks));
        (pid, ticks)
    }

    /// The agent's live process exits; the supervisor learns of it when it next reaps.
    pub fn exit(&self, agent_id: &str, exit: Exit) {
        let pid = self.pid_of(agent_id).expect("the agent has a live process");
        self.end(&mut lock(&self.tables), pid, exit);
    }

    /// The agent's live process exits and is reaped by the keeper (not by agentd, as
    /// `exit` is): its pid and start, for the exit the keeper reports.
    pub fn reaped_by_keeper(&self, agent_id: &str, exit: Exit) -> (i32, u64) {
        let pid = self.pid_of(agent_id).expect("the agent has a live process");
        let mut tables = lock(&self.tables);
        let ticks = tables.live.get(&pid).map_or(0, |(_, ticks)| *ticks);
        self.end(&mut tables, pid, exit);
        tables.exited.retain(|(exited, _)| *exited != pid);
        (pid, ticks)
    }

    pub fn pid_of(&self, agent_id: &str) -> Option<i32> {
        let tables = lock(&self.tables);
        let mut pids = tables.live.iter().filter(|(_, (id, _))| id == agent_id);
        pids.next().map(|(pid, _)| *pid)
    }

    pub fn live_count(&self) -> usize {
        lock(&self.tables).live.len()
    }

    fn end(&self, tables: &mut Tables, pid: i32, exit: Exit) {
        if let Some((agent_id, _)) = tables.live.remove(&pid) {
            self.log.push(format!("exit {agent_id}"));
            tables.exited.push_back((pid, exit));
        }
    }
}

impl Os for FakeOs {
    fn containment(&self) -> (Containment, String) {
        (Containment::ProcessGroup, "a fake OS".into())
    }

    fn check_spec(&self, _spec: &AgentSpec) -> Result<()> {
        Ok(())
    }

    fn sandbox_support(&self) -> SandboxSupport {
        SandboxSupport {
            landlock_abi: 0,
            seccomp: false,
            network_namespaces: false,
            user_namespaces: false,
            privileged: false,
            keeper: false,
            syscall_denials: false,
            file_denials: false,
        }
    }

    fn gateway_listener(&self, _pid: i32) -> io::Result<Option<std::net::TcpListener>> {
        Ok(None)
    }

    fn proxy_listener(&self, _pid: i32) -> io::Result<std::net::TcpListener> {
        Err(io::ErrorKind::Unsupported.into())
    }

    fn spawn(&self, order: SpawnOrder, done: SpawnDone) {
        let mut tables = lock(&self.tables);
        if tables.unstartable.contains(&order.agent_id) {
            self.log.push(format!("spawn {} failed", order.agent_id));
            drop(tables);
            return done(Err(io::ErrorKind::NotFound.into()));
        }
        tables.next_pid += 1;
        let (pid, ticks) = (tables.next_pid, tables.next_pid as u64 * 10);
        self.log.push(format!("spawn {}", order.agent_id));
        tables.live.insert(pid, (order.agent_id, ticks));
        let started = Ok(Started {
            pid,
            start_ticks: Some(ticks),
            cgroup: None,
            fallbacks: Vec::new(),
            proxy: None,
            gateway: None,
        });
        match &mut tables.held {
            Some(held) => held.push((started, done)),
            None => {
                drop(tables);
                done(started);
            }
        }
    }

    fn signal_group(&self, hold: Hold<'_>, signal: Signal) -> io::Result<bool> {
        self.signal_process(hold.pgid, signal)
    }

    fn signal_process(&self, pid: i32, signal: Signal) -> io::Result<bool> {
        let mut tables = lock(&self.tables);
        let Some((agent_id, _)) = tables.live.get(&pid) else {
            return Ok(false);
        };
        self.log.push(format!("signal {agent_id} {signal}"));
        let ignored = signal == Signal::SIGTERM && tables.stubborn.contains(agent_id);
        if !ignored {
            self.end(&mut tables, pid, Exit::Signal(signal as i32));
        }
        Ok(true)
    }

    fn freeze(&self, hold: Hold<'_>, frozen: bool) -> io::Result<()> {
        if let Some((agent_id, _)) = lock(&self.tables).live.get(&hold.pgid) {
            let verb = if frozen { "freeze" } else { "thaw" };
            self.log.push(format!("{verb} {agent_id}"));
        }
        Ok(())
    }

    fn reap_one(&self) -> Option<(i32, Exit)> {
        lock(&self.tables).exited.pop_front()
    }

    fn group_alive(&self, hold: Hold<'_>) -> bool {
        lock(&self.tables).live.contains_key(&hold.pgid)
    }

    fn held_processes(&self, hold: Hold<'_>) -> Vec<i32> {
        match self.group_alive(hold) {
            true => vec![hold.pgid],
            false => Vec::new(),
        }
    }

    fn live_groups(&self, pgids: &[i32]) -> HashSet<i32> {
        let tables = lock(&self.tables);
        pgids
            .iter()
            .copied()
            .filter(|pgid| tables.live.contains_key(pgid))
            .collect()
    }

    fn oom_killed(&self, _cgroup: &Path) -> bool {
        false
    }

    fn cgroup_events(&self, _cgroup: &Path) -> Option<PathBuf> {
        None
    }

    fn remove_cgroup(&self, _cgroup: &Path) -> io::Result<()> {
        Ok(())
    }

    fn agent_cgroups(&self) -> Vec<(String, PathBuf, Vec<i32>)> {
        Vec::new()
    }

    fn remove_cgroup_root(&self) {}

    fn proc_stat(&self, pid: i32) -> Option<ProcStat> {
        let tables = lock(&self.tables);
        let (_, ticks) = tables.live.get(&pid)?;
        Some(ProcStat {
            state: 'S',
            ppid: 1,
            pgrp: pid,
            num_threads: 1,
            start_ticks: *ticks,
            cpu_ticks: 0,
            rss_pages: 256,
        })
    }

    fn running_for(&self, _stat: &ProcStat) -> Option<Duration> {
        Some(Duration::from_secs(5))
    }

    fn pidfd_open(&self, _pid: i32) -> io::Result<OwnedFd> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Every live process: each carries its agent's folder in its environment.
    fn marked_leaders(&self, _agents_dir: &Path) -> Vec<MarkedLeader> {
        let pids: Vec<i32> = lock(&self.tables).live.keys().copied().collect();
        pids.into_iter()
            .filter_map(|pid| {
                let agent_id = lock(&self.tables).live.get(&pid)?.0.clone();
                if lock(&self.tables).unmarked.contains(&agent_id) {
                    return None;
                }
                let stat = self.proc_stat(pid)?;
                Some(MarkedLeader {
                    pid,
                    stat,
                    agent_id,
                })
            })
            .collect()
    }

    fn proc_units(&self) -> (u64, u64) {
        (100, 4096)
    }
}

/// The supervisor's recorder, writing into the same log.
pub(crate) struct FakeRecorder(pub Log);

impl Recorder for FakeRecorder {
    fn event(&self, kind: EventKind) {
        if kind != EventKind::Health {
            self.0.push(format!("event {kind:?}"));
        }
    }

    fn run_ended(&self, reason: EndReason) {
        self.0.push(format!("run ended {reason:?}"));
    }

    fn restarted(&self) {}

    fn stopped(&self, outcome: StopOutcome, _took: Duration) {
        self.0.push(format!("stopped {outcome:?}"));
    }

    fn sampled(&self, _took: Duration) {}
}
