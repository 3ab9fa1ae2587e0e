//! Background health sampling. A dedicated thread wakes every interval, asks the supervisor
//! which agents are live, measures each agent's whole process tree (CPU, memory, threads,
//! leader state) and reads the progress the agent wrote to its status file, then hands the
//! batch back. Status calls answer from the latest batch and never wait for a sample.
//!
//! An agent in a cgroup is measured through it: `cpu.stat` (a `pread` on a descriptor kept
//! open) says whether anything in it ran since the last round; only then are its memory,
//! `cgroup.procs`, `cgroup.threads`, the leader's `stat` and its status file read, whatever
//! the tree's size. Without a cgroup the cost is per process in the agent's tree, never per
//! process on the host: each member costs one read of `/proc/PID/stat` and one of its
//! `children` file, and each agent one `stat` of its status file. Output files are checked every interval while they grow and
//! every [`QUIET_OUTPUT_EVERY`] intervals once they stop.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use crate::cgroup::Cgroups;
use crate::files::STATUS_FILE;
use crate::logs::{LogFile, LogRotation, LogStream};
use crate::process::{self, ProcStat};
use crate::state::TreeSample;

/// A live agent to sample.
#[derive(Debug, Clone)]
pub struct SampleTarget {
    pub agent_id: String,
    /// Leader pid and process group id.
    pub pid: i32,
    /// The agent's folder: its status file and its output.
    pub dir: PathBuf,
    /// Its cgroup, which then is what is measured.
    pub cgroup: Option<PathBuf>,
}

/// What an agent reported in its status file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Progress {
    pub progress: f64,
    #[serde(default)]
    pub message: String,
    /// What the agent spent calling providers itself in this run, per `PROVIDER/MODEL`, as
    /// running totals (agentd counts what they grew by).
    #[serde(default)]
    pub usage: std::collections::BTreeMap<String, crate::spend::Usage>,
}

#[derive(Debug, Default)]
pub struct SampleBatch {
    pub samples: Vec<(String, TreeSample)>,
    pub progress: Vec<(String, Progress)>,
    /// How long measuring every agent took.
    pub took: Duration,
}

/// Largest status file read; a bigger one is ignored with a warning.
const STATUS_FILE_LIMIT: u64 = 64 * 1024;

/// Output that did not grow at its last check is checked again after this many intervals, so
/// a rotation can be late by this many intervals of output after a quiet spell.
const QUIET_OUTPUT_EVERY: u64 = 8;

/// What the supervisor answers the sampler at the start of a round.
pub struct RoundStart {
    /// The live agents to sample, with their generation; `None` when they are the same as
    /// at the generation the sampler gave.
    pub targets: Option<(u64, Vec<SampleTarget>)>,
    /// A watcher wants every sample, even one equal to the agent's last.
    pub every_round: bool,
}

/// Runs the sampling loop on its own thread until `deliver` returns false. Each round also
/// rotates the live agents' output (the thread already visits them, off the supervisor task).
/// If the thread panics, `died` is told why: a daemon whose samples stopped must not go on.
/// `targets(generation)` asks for the live agents unless they did not change since then.
pub fn start(
    interval: Duration,
    rotation: LogRotation,
    cgroups: Option<Cgroups>,
    open_files: u64,
    mut targets: impl FnMut(Option<u64>) -> Option<RoundStart> + Send + 'static,
    mut deliver: impl FnMut(SampleBatch) -> bool + Send + 'static,
    died: impl FnOnce(String) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("agentd-sampler".into())
        .spawn(move || {
            let rounds = std::panic::AssertUnwindSafe(|| {
                let mut sampler = Sampler::new(cgroups, open_files);
                let mut output = OutputChecks::default();
                let mut live: Option<(u64, Vec<SampleTarget>)> = None;
                loop {
                    std::thread::sleep(interval);
                    let Some(answer) = targets(live.as_ref().map(|(generation, _)| *generation))
                    else {
                        return;
                    };
                    if answer.targets.is_some() {
                        live = answer.targets;
                    }
                    sampler.send_unchanged = answer.every_round;
                    let targets: &[SampleTarget] = live.as_ref().map_or(&[], |(_, t)| t);
                    #[cfg(debug_assertions)]
                    if !targets.is_empty()
                        && std::env::var_os("AGENTD_TEST_PANIC").is_some_and(|v| v == "sampler")
                    {
                        panic!("AGENTD_TEST_PANIC=sampler");
                    }
                    let round = std::time::Instant::now();
                    let (mut batch, ran) = sampler.sample(targets);
                    batch.took = round.elapsed();
                    if !deliver(batch) {
                        return;
                    }
                    output.rotate(targets, &ran, rotation);
                }
            });
            if std::panic::catch_unwind(rounds).is_err() {
                died("the sampler thread panicked".into());
            }
        })?;
    Ok(())
}

struct Sampler {
    clock_ticks: f64,
    page_size: u64,
    round: u64,
    /// Seconds since boot at the previous round.
    last_uptime: Option<f64>,
    /// Every process measured in the previous round.
    last: HashMap<i32, Member>,
    /// False once the kernel turned out to have no `/proc/PID/task/TID/children` files: the
    /// tree then comes from a scan of all of `/proc`.
    children_files: bool,
    /// Modification time of each agent's status file when it was last read.
    status_seen: HashMap<String, SystemTime>,
    /// Agents with a cgroup are measured through it.
    cgroups: Option<CgroupSampler>,
    /// The last sample sent for each agent: an unchanged one is not sent again, unless a
    /// watcher wants every round (`send_unchanged`).
    sent: HashMap<String, (i32, TreeSample)>,
    send_unchanged: bool,
    /// CPU ticks each agent's tree used in its current run (its leader's pid), for agents
    /// without a cgroup, whose counter does it.
    run_ticks: HashMap<String, (i32, u64)>,
}

/// Adds the sample to the batch unless it is the one last sent for the agent (and no watcher
/// wants every sample as a HEALTH event).
fn send_if_changed(
    sent: &mut HashMap<String, (i32, TreeSample)>,
    send_unchanged: bool,
    batch: &mut SampleBatch,
    target: &SampleTarget,
    sample: TreeSample,
) {
    let this = (target.pid, sample);
    match sent.get_mut(&target.agent_id) {
        Some(last) if *last == this && !send_unchanged => return,
        Some(last) => *last = this.clone(),
        None => {
            sent.insert(target.agent_id.clone(), this.clone());
        }
    }
    let (_, sample) = this;
    batch.samples.push((target.agent_id.clone(), sample));
}

/// Measures agents through their cgroups. A cgroup that used no CPU since the last round
/// ran nothing: nothing in it forked, exited, grew or wrote its status file, so its last
/// reading holds (memory, which reclaim can shrink, is read again every
/// [`REREAD_IDLE_CGROUP_EVERY`] rounds). An idle agent costs one `pread` of its `cpu.stat`,
/// and when the `cpu.stat` of agentd's root says that no agent ran at all, not even that.
struct CgroupSampler {
    cgroups: Cgroups,
    /// Each agent's last reading, by agent id, and the round it was last sampled in.
    last: HashMap<String, CgroupReading>,
    /// Each agent's `cpu.stat`, kept open: a `pread` at offset 0 costs about a tenth of an
    /// open, read and close of a cgroup file.
    cpu_stat: HashMap<String, File>,
    /// At most this many are kept open; beyond, `cpu.stat` is opened for each read.
    keep_open: usize,
    /// The root's `cpu.stat` and its last `usage_usec`.
    root_stat: Option<File>,
    root_usec: Option<u64>,
    /// No agent ran since the last round.
    all_idle: bool,
}

/// An agent's cgroup as a round found it.
struct CgroupReading {
    leader: i32,
    cpu_usec: u64,
    sample: TreeSample,
    /// The round its memory was last read in.
    read_in: u64,
    /// The last round it was sampled in.
    seen_in: u64,
}

impl CgroupReading {
    /// The cgroup ran nothing since the last round: the reading holds, with no CPU used,
    /// and its memory read again now and then.
    fn idle(&mut self, cgroups: &Cgroups, cgroup: &std::path::Path, round: u64) -> TreeSample {
        if round - self.read_in >= REREAD_IDLE_CGROUP_EVERY {
            if let Some(bytes) = cgroups.memory_bytes(cgroup) {
                self.sample.memory_bytes = bytes;
            }
            self.read_in = round;
        }
        self.seen_in = round;
        self.sample.cpu_percent = 0.0;
        self.sample.clone()
    }
}

/// An idle cgroup's memory is read again after this many rounds.
const REREAD_IDLE_CGROUP_EVERY: u64 = 30;

impl CgroupSampler {
    fn new(cgroups: Cgroups, open_files: u64) -> CgroupSampler {
        CgroupSampler {
            root_stat: File::open(cgroups.cpu_stat_file(cgroups.root())).ok(),
            cgroups,
            last: HashMap::new(),
            cpu_stat: HashMap::new(),
            // Half the descriptors agentd may open, the rest for clients and files.
            keep_open: usize::try_from(open_files / 2).unwrap_or(usize::MAX),
            root_usec: None,
            all_idle: false,
        }
    }

    /// Reads the root's `cpu.stat` once per round.
    fn begin_round(&mut self) {
        let usec = self.root_stat.as_ref().and_then(pread_usage_usec);
        self.all_idle = usec.is_some() && usec == self.root_usec;
        self.root_usec = usec;
    }

    /// The agent's sample, and whether its cgroup ran since the last round.
    fn measure(
        &mut self,
        target: &SampleTarget,
        cgroup: &std::path::Path,
        round: u64,
        page_size: u64,
        elapsed: Option<f64>,
    ) -> Option<(TreeSample, bool)> {
        if self.all_idle
            && let Some(last) = self.last.get_mut(&target.agent_id)
            && last.leader == target.pid
        {
            return Some((last.idle(&self.cgroups, cgroup, round), false));
        }
        let cpu_usec = self.cpu_usec(&target.agent_id, cgroup)?;
        let last = self
            .last
            .get_mut(&target.agent_id)
            .filter(|last| last.leader == target.pid && last.cpu_usec <= cpu_usec);
        let used = last.as_ref().map(|last| cpu_usec - last.cpu_usec);
        let cpu_percent = elapsed
            .filter(|&seconds| seconds > 0.0)
            .map_or(0.0, |seconds| {
                used.unwrap_or(0) as f64 / 1e6 / seconds * 100.0
            });
        if let Some(last) = last
            && used == Some(0)
        {
            return Some((last.idle(&self.cgroups, cgroup, round), false));
        }
        let leader = process::proc_stat(target.pid)?;
        let usage = self.cgroups.usage(cgroup);
        // Without a memory controller for it, memory is its members' resident sets.
        let memory_bytes = usage.memory_bytes.unwrap_or_else(|| {
            usage
                .members
                .iter()
                .filter_map(|&pid| process::proc_stat(pid))
                .map(|stat| stat.rss_pages * page_size)
                .sum()
        });
        let sample = TreeSample {
            leader_status: process::state_name(leader.state),
            cpu_percent,
            memory_bytes,
            num_threads: usage.threads.max(leader.num_threads),
            num_processes: (usage.members.len() as u32).max(1),
            cpu_seconds: cpu_usec as f64 / 1e6,
        };
        let reading = CgroupReading {
            leader: target.pid,
            cpu_usec,
            sample: sample.clone(),
            read_in: round,
            seen_in: round,
        };
        match self.last.get_mut(&target.agent_id) {
            Some(last) => *last = reading,
            None => {
                self.last.insert(target.agent_id.clone(), reading);
            }
        }
        Some((sample, used != Some(0)))
    }

    /// `usage_usec` of the agent's `cpu.stat`, read from the descriptor kept for it (opened
    /// again if its cgroup was made anew for a restart).
    fn cpu_usec(&mut self, agent_id: &str, cgroup: &std::path::Path) -> Option<u64> {
        if !self.cpu_stat.contains_key(agent_id) && self.cpu_stat.len() >= self.keep_open {
            return pread_usage_usec(&File::open(self.cgroups.cpu_stat_file(cgroup)).ok()?);
        }
        for fresh in [false, true] {
            if fresh || !self.cpu_stat.contains_key(agent_id) {
                let file = File::open(self.cgroups.cpu_stat_file(cgroup)).ok()?;
                self.cpu_stat.insert(agent_id.to_string(), file);
            }
            if let Some(usec) = self.cpu_stat.get(agent_id).and_then(pread_usage_usec) {
                return Some(usec);
            }
        }
        None
    }

    /// Forgets agents that were not sampled this round.
    fn finish_round(&mut self, round: u64) {
        let before = self.last.len();
        self.last.retain(|_, reading| reading.seen_in == round);
        if self.last.len() != before || self.cpu_stat.len() > self.last.len() {
            let last = &self.last;
            self.cpu_stat
                .retain(|agent_id, _| last.contains_key(agent_id));
        }
    }
}

/// `usage_usec` of a `cpu.stat` kept open.
fn pread_usage_usec(file: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buffer = [0u8; 512];
    let len = file.read_at(&mut buffer, 0).ok()?;
    crate::cgroup::usage_usec(&buffer[..len])
}

/// What a round learned about one process of an agent's tree.
#[derive(Clone)]
struct Member {
    stat: ProcStat,
    children: Vec<i32>,
    /// Run time and times scheduled of the main thread. While they stay the same, a
    /// single-threaded process has not run, so it has not used CPU, forked, exited or started
    /// threads, and `stat` and `children` still hold (memory can only shrink, and is read
    /// again every [`REREAD_IDLE_EVERY`] rounds).
    ran: Option<(u64, u64)>,
    /// The round `stat` and `children` were read in.
    read_in: u64,
}

/// An idle process's `stat` and `children` are read again after this many rounds.
const REREAD_IDLE_EVERY: u64 = 8;

/// One sampling round's view of the processes in agents' trees.
struct Round<'a> {
    number: u64,
    last: &'a HashMap<i32, Member>,
    now: HashMap<i32, Member>,
    /// Every process's children, from a scan of `/proc`, when there are no children files.
    scanned: Option<HashMap<i32, Vec<i32>>>,
    /// Processes that started at or after this tick since boot ran only inside this round.
    since_tick: Option<u64>,
}

impl Round<'_> {
    /// Measures `pid`, pushes its children onto `stack` and returns its stat and the CPU
    /// ticks it used since the previous round. `parent` is the process whose children list
    /// named `pid`: a pid that was reused since is somebody else's and is skipped.
    fn visit(
        &mut self,
        pid: i32,
        parent: Option<i32>,
        stack: &mut Vec<(i32, Option<i32>)>,
    ) -> Option<(ProcStat, u64)> {
        let ran = process::proc_schedstat(pid);
        // `schedstat` is the main thread's alone, so it speaks for single-threaded processes.
        if let Some(before) = self.last.get(&pid)
            && ran.is_some()
            && before.ran == ran
            && before.stat.num_threads == 1
            && self.number - before.read_in < REREAD_IDLE_EVERY
        {
            stack.extend(before.children.iter().map(|&child| (child, Some(pid))));
            let stat = before.stat;
            self.now.insert(pid, before.clone());
            return Some((stat, 0));
        }
        let stat = process::proc_stat(pid)?;
        if parent.is_some_and(|parent| parent != stat.ppid) {
            return None;
        }
        let mut children = Vec::new();
        match &self.scanned {
            Some(map) => children.extend(map.get(&pid).into_iter().flatten()),
            None => {
                process::proc_children(pid, stat.num_threads, &mut children);
            }
        }
        let used = match self.last.get(&pid) {
            Some(before) if before.stat.start_ticks == stat.start_ticks => {
                stat.cpu_ticks.saturating_sub(before.stat.cpu_ticks)
            }
            _ if self.since_tick.is_some_and(|tick| stat.start_ticks >= tick) => stat.cpu_ticks,
            _ => 0,
        };
        stack.extend(children.iter().map(|&child| (child, Some(pid))));
        self.now.insert(
            pid,
            Member {
                stat,
                children,
                ran,
                read_in: self.number,
            },
        );
        Some((stat, used))
    }
}

impl Sampler {
    fn new(cgroups: Option<Cgroups>, open_files: u64) -> Sampler {
        let (clock_ticks, page_size) = process::proc_units();
        Sampler {
            clock_ticks: clock_ticks as f64,
            page_size,
            round: 0,
            last_uptime: None,
            last: HashMap::new(),
            children_files: true,
            status_seen: HashMap::new(),
            cgroups: cgroups.map(|cgroups| CgroupSampler::new(cgroups, open_files)),
            sent: HashMap::new(),
            send_unchanged: true,
            run_ticks: HashMap::new(),
        }
    }

    /// Samples every target; sends only the samples that changed since the last one sent.
    /// Also says, per target, whether it may have run (an idle cgroup did not).
    fn sample(&mut self, targets: &[SampleTarget]) -> (SampleBatch, Vec<bool>) {
        let mut batch = SampleBatch::default();
        let mut ran = Vec::with_capacity(targets.len());
        if targets.is_empty() {
            self.status_seen.clear();
            self.last.clear();
            self.sent.clear();
            return (batch, ran);
        }
        self.round += 1;
        let uptime = process::uptime();
        let elapsed = uptime.zip(self.last_uptime).map(|(now, then)| now - then);
        // Orphans reparented to agentd (a subreaper) still belong to their agent's group.
        let own_pid = std::process::id() as i32;
        let mut own = Vec::new();
        // agentd has several threads, and a child belongs to the one that forked it: say
        // "many" so that every thread's list is read.
        if self.children_files && process::proc_children(own_pid, u32::MAX, &mut own).is_none() {
            tracing::info!("no /proc children files: sampling scans all of /proc");
            self.children_files = false;
        }
        let scanned = (!self.children_files).then(|| {
            let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
            for (pid, stat) in process::all_processes() {
                map.entry(stat.ppid).or_default().push(pid);
            }
            own = map.get(&own_pid).cloned().unwrap_or_default();
            map
        });
        let leaders: HashSet<i32> = targets.iter().map(|t| t.pid).collect();
        let mut orphans_by_group: HashMap<i32, Vec<i32>> = HashMap::new();
        for child in own.into_iter().filter(|child| !leaders.contains(child)) {
            if let Some(stat) = process::proc_stat(child) {
                orphans_by_group.entry(stat.pgrp).or_default().push(child);
            }
        }
        let mut cgroups = self.cgroups.take();
        if let Some(cgroups) = &mut cgroups {
            cgroups.begin_round();
        }
        let mut round = Round {
            number: self.round,
            last: &self.last,
            now: HashMap::with_capacity(self.last.len()),
            scanned,
            since_tick: self
                .last_uptime
                .map(|seconds| (seconds * self.clock_ticks) as u64),
        };
        for target in targets {
            let (sample, active) = match (&mut cgroups, &target.cgroup) {
                (Some(cgroups), Some(cgroup)) => {
                    let measured =
                        cgroups.measure(target, cgroup, self.round, self.page_size, elapsed);
                    let active = measured.as_ref().is_none_or(|(_, ran)| *ran);
                    (measured.map(|(sample, _)| sample), active)
                }
                _ => {
                    let mut roots = vec![(target.pid, None)];
                    roots.extend(
                        orphans_by_group
                            .get(&target.pid)
                            .into_iter()
                            .flatten()
                            .map(|&orphan| (orphan, None)),
                    );
                    let sample = measure_tree(&mut round, roots, self.page_size).map(
                        |(mut sample, ticks)| {
                            if let Some(seconds) = elapsed.filter(|&seconds| seconds > 0.0) {
                                sample.cpu_percent =
                                    ticks as f64 / self.clock_ticks / seconds * 100.0;
                            }
                            // Counted from the run's first round: a new leader is a new run.
                            let total = match self.run_ticks.get_mut(&target.agent_id) {
                                Some((pid, total)) if *pid == target.pid => {
                                    *total += ticks;
                                    *total
                                }
                                _ => {
                                    let run = (target.pid, ticks);
                                    self.run_ticks.insert(target.agent_id.clone(), run);
                                    ticks
                                }
                            };
                            sample.cpu_seconds = total as f64 / self.clock_ticks;
                            sample
                        },
                    );
                    (sample, true)
                }
            };
            ran.push(active);
            if let Some(sample) = sample {
                send_if_changed(
                    &mut self.sent,
                    self.send_unchanged,
                    &mut batch,
                    target,
                    sample,
                );
            }
            // A cgroup that ran nothing cannot have written its status file.
            if active && let Some(progress) = read_status_file(&mut self.status_seen, target) {
                batch.progress.push((target.agent_id.clone(), progress));
            }
        }
        self.last = round.now;
        if let Some(cgroups) = &mut cgroups {
            cgroups.finish_round(self.round);
        }
        self.cgroups = cgroups;
        self.last_uptime = uptime;
        if self.sent.len() > targets.len() {
            let live: HashSet<&str> = targets.iter().map(|t| t.agent_id.as_str()).collect();
            self.sent.retain(|id, _| live.contains(id.as_str()));
        }
        if self.status_seen.len() > targets.len() {
            let live: HashSet<&str> = targets.iter().map(|t| t.agent_id.as_str()).collect();
            self.status_seen.retain(|id, _| live.contains(id.as_str()));
        }
        if self.run_ticks.len() > targets.len() {
            let live: HashSet<&str> = targets.iter().map(|t| t.agent_id.as_str()).collect();
            self.run_ticks.retain(|id, _| live.contains(id.as_str()));
        }
        (batch, ran)
    }
}

/// Measures the tree under `stack` (the leader first, then orphans of its group); returns
/// the sample with its CPU still in ticks used since the previous round.
fn measure_tree(
    round: &mut Round<'_>,
    mut stack: Vec<(i32, Option<i32>)>,
    page_size: u64,
) -> Option<(TreeSample, u64)> {
    let (leader, _) = *stack.first()?;
    let mut sample = TreeSample {
        leader_status: "",
        cpu_percent: 0.0,
        memory_bytes: 0,
        num_threads: 0,
        num_processes: 0,
        cpu_seconds: 0.0,
    };
    let mut ticks = 0;
    let mut seen = HashSet::new();
    while let Some((pid, parent)) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let Some((stat, used)) = round.visit(pid, parent, &mut stack) else {
            if pid == leader {
                return None;
            }
            continue;
        };
        if pid == leader {
            sample.leader_status = process::state_name(stat.state);
        }
        ticks += used;
        sample.memory_bytes += stat.rss_pages * page_size;
        sample.num_threads += stat.num_threads;
        sample.num_processes += 1;
    }
    Some((sample, ticks))
}

/// Reads an agent's status file when it changed since the last read.
fn read_status_file(
    status_seen: &mut HashMap<String, SystemTime>,
    target: &SampleTarget,
) -> Option<Progress> {
    let status_file = target.dir.join(STATUS_FILE);
    let modified = std::fs::metadata(&status_file)
        .and_then(|m| m.modified())
        .ok()?;
    if status_seen.insert(target.agent_id.clone(), modified) == Some(modified) {
        return None;
    }
    match read_progress(&status_file) {
        Ok(progress) => Some(progress),
        Err(problem) => {
            tracing::warn!(
                agent_id = %target.agent_id,
                file = %status_file.display(),
                "ignoring status file: {problem}"
            );
            None
        }
    }
}

/// When each live agent's output is next checked for rotation, and its size then.
#[derive(Default)]
struct OutputChecks {
    round: u64,
    agents: HashMap<String, OutputCheck>,
}

struct OutputCheck {
    next_round: u64,
    ends: [u64; 2],
}

impl OutputChecks {
    /// `ran[i]`: target `i` may have run since the last round (one that did not cannot
    /// have written output).
    fn rotate(&mut self, targets: &[SampleTarget], ran: &[bool], rotation: LogRotation) {
        self.round += 1;
        let round = self.round;
        for (target, _) in targets.iter().zip(ran).filter(|(_, ran)| **ran) {
            if !self.agents.contains_key(&target.agent_id) {
                let check = OutputCheck {
                    next_round: round,
                    ends: [0; 2],
                };
                self.agents.insert(target.agent_id.clone(), check);
            }
            let Some(check) = self.agents.get_mut(&target.agent_id) else {
                continue;
            };
            if check.next_round > round {
                continue;
            }
            let mut grew = false;
            for (end, stream) in check
                .ends
                .iter_mut()
                .zip([LogStream::Stdout, LogStream::Stderr])
            {
                let file = LogFile::new(&target.dir, stream);
                let now = match file.end_offset() {
                    Ok(now) => now,
                    Err(error) => {
                        tracing::warn!(agent_id = %target.agent_id, ?stream, %error, "checking output");
                        continue;
                    }
                };
                grew |= now != *end;
                *end = now;
                if now > rotation.max_bytes
                    && let Err(error) = file.rotate(rotation)
                {
                    tracing::warn!(agent_id = %target.agent_id, ?stream, %error, "rotating output");
                }
            }
            check.next_round = round + if grew { 1 } else { QUIET_OUTPUT_EVERY };
        }
        if self.agents.len() > targets.len() {
            let live: HashSet<&str> = targets.iter().map(|t| t.agent_id.as_str()).collect();
            self.agents.retain(|id, _| live.contains(id.as_str()));
        }
    }
}

/// Parses `{"progress": 0-100, "message": "..."}`.
fn read_progress(path: &std::path::Path) -> Result<Progress, String> {
    let mut text = String::new();
    crate::files::open_for_reading(path)
        .and_then(|file| file.take(STATUS_FILE_LIMIT + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > STATUS_FILE_LIMIT {
        return Err(format!("larger than {STATUS_FILE_LIMIT} bytes"));
    }
    parse_progress(&text)
}

pub(crate) fn parse_progress(text: &str) -> Result<Progress, String> {
    let progress: Progress = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if progress.usage.len() > 64 {
        return Err("usage names more than 64 models".into());
    }
    if !(0.0..=100.0).contains(&progress.progress) {
        return Err(format!(
            "progress {} is not between 0 and 100",
            progress.progress
        ));
    }
    Ok(progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_files_are_checked() {
        assert_eq!(
            parse_progress(r#"{"progress": 42.5, "message": "reading"}"#),
            Ok(Progress {
                progress: 42.5,
                message: "reading".into(),
                usage: Default::default(),
            })
        );
        assert_eq!(
            parse_progress(r#"{"progress": 7}"#).map(|p| p.message),
            Ok(String::new())
        );
        for bad in [
            "",
            "{",
            r#"{"progress": "x"}"#,
            r#"{"progress": 101}"#,
            "[]",
        ] {
            assert!(parse_progress(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
