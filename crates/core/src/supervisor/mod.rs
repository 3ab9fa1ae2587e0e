//! The supervisor task: the one owner of the agent table, and the driver of every agent's
//! lifecycle machine. It runs a single `select!` over client commands, SIGCHLD, exits of
//! adopted agents, the machines' deadlines and group checks, feeds each event to the machine
//! it concerns as an input, and carries out the effects the machine returns through the one
//! OS seam (`os::Os`), the store and the event bus. Everyone else holds a
//! [`SupervisorHandle`] and sends it a [`Command`] with a oneshot reply.
//!
//! Architecture invariants: only this task mutates agents, writes the store or emits events;
//! it is also the only place in agentd that asks the keeper to start processes and that
//! reaps children (see `os` and `keeper`).

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::agent::AgentStatus;
use crate::agent_dir::{BaseEnv, ReadyFolders};
use crate::clock::Clock;
use crate::config::{FinishedRetention, Limits, SupervisorConfig};
use crate::egress::{Denial, EgressResolve};
use crate::error::{Error, Result};
use crate::events::{EventBus, EventKind, Samples};
use crate::handle::Command;
use crate::history::{History, HistoryPoint};
use crate::keeper::{AckSink, ExitStream};
use crate::machine::{AgentMachine, Effect, Now};
use crate::os::{self, Os};
use crate::rebuild;
use crate::recorder::Recorder;
use crate::sampler;
use crate::stop::StopReport;
use crate::store::Store;
use crate::table::AgentTable;
use crate::trace::{self, Traces};

#[cfg(test)]
mod fake;
mod groups;
mod recovery;
mod retention;
mod samples;
mod sandboxes;
mod spawning;
mod spend;
mod start;
mod stopping;
#[cfg(test)]
mod tests;

pub use start::Supervisor;

pub(crate) struct SupervisorTask {
    os: Arc<dyn Os>,
    clock: Arc<dyn Clock>,
    recorder: Arc<dyn Recorder>,
    store: Store,
    events: EventBus,
    /// `DATA/agentd.lock`, held while the daemon runs: one daemon per data folder.
    _data_lock: Option<nix::fcntl::Flock<std::fs::File>>,
    agents_dir: PathBuf,
    /// Every agent's spec, for a rebuild of the records (`rebuild.rs`).
    specs_dir: PathBuf,
    /// Removed agents' folders wait here to be deleted.
    trash_dir: PathBuf,
    /// Agent folders made ahead.
    ready: ReadyFolders,
    /// A blocking thread is deleting the trash.
    trash_emptying: Arc<AtomicBool>,
    table: AgentTable,
    /// Effects and steps not yet carried out, in order (`carry_out_queue`).
    queue: VecDeque<Work>,
    /// `carry_out_queue` is running: an input made by its work only queues.
    carrying_out: bool,
    /// Every machine's deadline, so the loop sleeps until the first.
    deadlines: BTreeSet<(Instant, String)>,
    /// Everyone waiting for a stop under way, by agent.
    stop_waiters: HashMap<String, Vec<oneshot::Sender<StopReport>>>,
    /// Everyone waiting for an agent to run again after a restart they asked for.
    restart_waiters: HashMap<String, Vec<oneshot::Sender<Result<AgentStatus>>>>,
    /// Agents whose process the keeper is starting (`spawning.rs`), and where the outcomes
    /// come back.
    launching: HashMap<String, spawning::Launching>,
    launches: mpsc::UnboundedSender<spawning::LaunchDone>,
    /// Commands that wait for the launches under way to end, in order (`handle`).
    parked: VecDeque<Command>,
    /// The spans of stop ladders and restarts under way (none while tracing is off).
    traces: Traces,
    adopted_exits_tx: mpsc::UnboundedSender<String>,
    /// Exits from the keeper that are handled; acknowledged once on disk.
    acks: mpsc::UnboundedSender<Ack>,
    shutting_down: bool,
    ids_generated: u64,
    limits: Limits,
    /// The environment every agent starts from.
    base_env: BaseEnv,
    /// `SupervisorConfig::allow_users`.
    allow_users: Vec<String>,
    finished_retention: FinishedRetention,
    /// Our own command queue, for work that runs as separate tasks (cascading stops, group
    /// checks); weak, so the task still ends when every real handle is gone.
    commands: mpsc::WeakSender<Command>,
    /// Agents whose stop waits for a group that outlived its leader.
    groups_watched: HashSet<String>,
    /// A group check runs on a blocking thread; at most one at a time.
    group_check_running: bool,
    /// Agents whose stop waits for their cgroup to empty, by inotify watch on its
    /// `cgroup.events` (these are not in `groups_watched`).
    cgroup_watch: os::ChangeWatch,
    cgroups_watched: HashMap<os::WatchDescriptor, String>,
    /// Cgroups of no running agent whose processes were killed at start, until empty.
    strays: HashMap<os::WatchDescriptor, PathBuf>,
    page_size: u64,
    /// Why the task must stop, once something it depends on broke.
    failure: Option<String>,
    /// Stored records that could not be loaded (counted at start).
    records_set_aside: u32,
    /// Changes whenever the set of agents to sample (live leaders and their pids) may have.
    targets_generation: u64,
    /// Spawns since the heap was last trimmed, and since the last sample.
    spawns: (u32, u32),
    /// Each agent's recent samples, and how many changes each keeps (zero: no history).
    histories: HashMap<String, History>,
    history_capacity: usize,
    history_window: Duration,
    sample_interval: Duration,
    /// Agents whose figures changed where no sample sees (spend, egress counts, denials not
    /// told): each gets a HEALTH event at the next round (`samples.rs`).
    figures_moved: HashSet<String>,
    sandboxes: sandboxes::Sandboxes,
}

/// What the task does after an input, in the order the inputs asked for it.
enum Work {
    /// An effect a machine returned.
    Effect {
        agent_id: String,
        now: Now,
        effect: Effect,
    },
    /// A step that feeds machines again: queued by an effect, never called from inside one.
    Step {
        agent_id: String,
        step: fn(&mut SupervisorTask, &str),
    },
}

/// While a stopping agent's leader is gone but its group lingers, no SIGCHLD may tell us
/// when the rest exits (they need not be our children), so the groups are checked this
/// often, on a blocking thread (a check may scan all of `/proc`).
const GROUP_CHECK: Duration = Duration::from_millis(20);

/// Changes kept per agent: one per sample over the window.
fn history_capacity(window: Duration, interval: Duration) -> usize {
    if window.is_zero() {
        return 0;
    }
    let samples = window.as_secs_f64() / interval.as_secs_f64().max(1e-3);
    (samples.ceil() as usize).max(1)
}

/// What a task drives, handed in: the daemon's OS, clock and store, or a unit test's fakes.
pub(crate) struct Parts {
    pub os: Arc<dyn Os>,
    pub clock: Arc<dyn Clock>,
    pub recorder: Arc<dyn Recorder>,
    pub store: Store,
    /// `DATA/agentd.lock`, held for as long as the task runs.
    pub data_lock: Option<nix::fcntl::Flock<std::fs::File>>,
    /// The task's own command queue (`SupervisorTask::commands`).
    pub commands: mpsc::WeakSender<Command>,
}

/// What a new task's other inputs arrive on.
struct Inboxes {
    adopted_exits: mpsc::UnboundedReceiver<String>,
    /// For the task that acknowledges to the keeper.
    acks: mpsc::UnboundedReceiver<Ack>,
    /// The proxies' denials.
    denials: mpsc::UnboundedReceiver<Denial>,
    launches: mpsc::UnboundedReceiver<spawning::LaunchDone>,
}

impl SupervisorTask {
    /// A task with no agents yet, with the receivers of its other inputs (`Inboxes`).
    fn new(parts: Parts, config: &SupervisorConfig) -> Result<(SupervisorTask, Inboxes)> {
        let cgroup_watch = os::ChangeWatch::new().map_err(|source| Error::Setup {
            what: "watching cgroups with inotify".into(),
            source,
        })?;
        let (adopted_exits_tx, adopted_exits) = mpsc::unbounded_channel();
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let (launches, launched) = mpsc::unbounded_channel();
        let events = EventBus::open(
            parts.store.clone(),
            config.event_buffer,
            config.event_retention,
        )?;
        let resolve = EgressResolve::parse(&config.sandbox.egress_resolve).map_err(|problem| {
            Error::Invalid {
                field: "--egress-resolve",
                problem,
            }
        })?;
        let mut private = vec![config.data_dir.clone()];
        private.extend(config.sandbox.private.iter().cloned());
        let (sandboxes, denials) =
            sandboxes::Sandboxes::new(config.sandbox.default_on, resolve, private);
        let task = SupervisorTask {
            page_size: parts.os.proc_units().1,
            os: parts.os,
            clock: parts.clock,
            recorder: parts.recorder,
            store: parts.store,
            events,
            _data_lock: parts.data_lock,
            agents_dir: config.data_dir.join("agents"),
            specs_dir: config.data_dir.join(rebuild::SPECS),
            trash_dir: config.data_dir.join("trash"),
            trash_emptying: Arc::default(),
            ready: ReadyFolders::new(config.data_dir.join("ready")),
            table: AgentTable::default(),
            queue: VecDeque::new(),
            carrying_out: false,
            deadlines: BTreeSet::new(),
            stop_waiters: HashMap::new(),
            restart_waiters: HashMap::new(),
            launching: HashMap::new(),
            launches,
            parked: VecDeque::new(),
            traces: Traces::default(),
            adopted_exits_tx,
            acks,
            shutting_down: false,
            ids_generated: 0,
            limits: config.limits,
            base_env: BaseEnv::from_daemon(&config.pass_env, config.gateway.clone()),
            allow_users: config.allow_users.clone(),
            finished_retention: config.finished_retention,
            commands: parts.commands,
            groups_watched: HashSet::new(),
            group_check_running: false,
            cgroup_watch,
            cgroups_watched: HashMap::new(),
            strays: HashMap::new(),
            failure: None,
            records_set_aside: 0,
            targets_generation: 0,
            spawns: (0, 0),
            histories: HashMap::new(),
            figures_moved: HashSet::new(),
            history_capacity: history_capacity(config.history, config.sample_interval),
            history_window: config.history,
            sample_interval: config.sample_interval,
            sandboxes,
        };
        let inboxes = Inboxes {
            adopted_exits,
            acks: ack_queue,
            denials,
            launches: launched,
        };
        Ok((task, inboxes))
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut sigchld: tokio::signal::unix::Signal,
        mut adopted_exits: mpsc::UnboundedReceiver<String>,
        mut denials: mpsc::UnboundedReceiver<Denial>,
        mut launches: mpsc::UnboundedReceiver<spawning::LaunchDone>,
    ) {
        let mut last_group_check = tokio::time::Instant::now();
        let cgroup_watch = self.cgroup_watch.clone();
        loop {
            let next_deadline = self.deadlines.first().map(|(at, _)| (*at).into());
            let next_group_check = (!self.group_check_running && !self.groups_watched.is_empty())
                .then(|| last_group_check + GROUP_CHECK);
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                Some(()) = sigchld.recv() => {
                    self.reap();
                }
                Some(done) = launches.recv() => self.launch_done(done),
                Some(agent_id) = adopted_exits.recv() => self.leader_exited(&agent_id, None),
                Some(denial) = denials.recv() => self.egress_denied(denial),
                changed = cgroup_watch.changed() => match changed {
                    Ok(watches) => self.cgroups_changed(watches),
                    Err(error) => self.failure = Some(format!("watching cgroups: {error}")),
                },
                () = sleep_until(next_deadline) => self.on_deadlines(),
                () = sleep_until(next_group_check) => {
                    last_group_check = tokio::time::Instant::now();
                    self.check_groups();
                }
            }
            // Once per turn, not per write: a Spawn's own flush then covers all of its writes.
            // Not while a launch is under way: its answer writes the record again, and one
            // flush started now would make that Spawn wait for two. Whoever waits for a write
            // to be on disk (a Spawn, the acknowledgements to the keeper) asks for a flush.
            if self.launching.is_empty() {
                self.store.flush_soon();
            }
            if let Some(error) = self.events.failure() {
                self.failure = Some(format!("events can no longer be numbered: {error}"));
            }
            if let Some(problem) = &self.failure {
                tracing::error!("the supervisor stops: {problem}");
                return;
            }
        }
    }

    /// Carries out a command, unless launches are under way and it could touch an agent
    /// whose process has no pid yet: then it waits until none is (`replay_parked`), and so
    /// does every command after it, so that none overtakes another.
    fn handle(&mut self, command: Command) {
        if self.parked.is_empty() && self.passes_launches(&command) {
            self.dispatch(command);
        } else {
            self.parked.push_back(command);
        }
    }

    /// Whether a command may be carried out now, with the launches under way: it reads, or
    /// starts another launch (spawns are pipelined through the keeper), or concerns no
    /// agent being launched. Samples wait: the usage in a status file can reach a budget
    /// that stops or pauses a whole tree, launching agents included.
    fn passes_launches(&self, command: &Command) -> bool {
        self.launching.is_empty()
            || match command {
                Command::Spawn(..)
                | Command::Status(..)
                | Command::List(..)
                | Command::History(..)
                | Command::Summary(..)
                | Command::Watch(..)
                | Command::SampleTargets(..)
                | Command::Spending(..)
                | Command::Reap(..)
                | Command::Fatal(..) => true,
                // An exit can come before the answer that names its pid; an agent can
                // report before agentd knows it runs.
                Command::KeptExit(exit) => !self.launching.contains_key(&exit.agent_id),
                Command::ReportProgress(report, _) => {
                    !self.launching.contains_key(&report.agent_id)
                }
                Command::AgentProcesses(agent_id, _) => !self.launching.contains_key(agent_id),
                Command::Traced(_, command) => self.passes_launches(command),
                _ => false,
            }
    }

    /// Carries out the commands that waited, in order, until one must wait again.
    fn replay_parked(&mut self) {
        while let Some(command) = self.parked.front() {
            if !self.passes_launches(command) {
                return;
            }
            if let Some(command) = self.parked.pop_front() {
                self.dispatch(command);
            }
        }
    }

    fn dispatch(&mut self, command: Command) {
        match command {
            #[cfg(debug_assertions)]
            Command::Spawn(..)
                if std::env::var_os("AGENTD_TEST_PANIC").is_some_and(|v| v == "supervisor") =>
            {
                panic!("AGENTD_TEST_PANIC=supervisor");
            }
            Command::Spawn(request, reply) => self.spawn(*request, reply),
            Command::Status(agent_id, reply) => {
                let now = self.clock.mono();
                let _ = reply.send(self.table.get(&agent_id).map(|m| m.status(now)));
            }
            Command::List(filter, reply) => {
                let _ = reply.send(self.table.list(&filter, self.clock.mono()));
            }
            Command::Stop(target, options, reply) => self.stop(target, options, reply),
            Command::History(agent_id, since, reply) => {
                let _ = reply.send(self.history(&agent_id, since));
            }
            Command::Summary(reply) => {
                let mut summary = self.table.summary(&self.limits, self.records_set_aside);
                (summary.containment, summary.containment_detail) = self.os.containment();
                summary.store_bytes = self.store.size_on_disk();
                summary.sandbox = Some(self.os.sandbox_support());
                let _ = reply.send(summary);
            }
            Command::UpdateSandbox(agent_id, hosts, reply) => {
                let _ = reply.send(self.update_sandbox(&agent_id, hosts));
            }
            Command::Pause(agent_ids, pause, reply) => {
                let _ = reply.send(self.pause(&agent_ids, pause));
            }
            Command::Restart(agent_ids, reply) => self.restart(agent_ids, reply),
            Command::Reap(reply) => {
                let _ = reply.send(self.reap());
            }
            Command::Watch(watch, reply) => {
                let now = self.clock.mono();
                let samples = match watch.filter.takes(EventKind::Health) {
                    true => watch.samples,
                    false => Samples::None,
                };
                // A table of changed figures that resumes gets them as of now after the
                // replay: a sample it missed in the gap is not sent again.
                let resumes = watch.after_sequence.is_some() && samples == Samples::Changed;
                let statuses: Vec<AgentStatus> = if watch.include_snapshot || resumes {
                    self.table
                        .machines()
                        .map(|machine| machine.status(now))
                        .filter(|status| watch.filter.matches_agent(status))
                        .collect()
                } else {
                    Vec::new()
                };
                let _ = reply.send(self.events.subscribe(
                    statuses.into_iter(),
                    watch.after_sequence,
                    samples,
                ));
            }
            Command::Shutdown(reply) => self.shutdown(reply),
            Command::SampleTargets(known, reply) => {
                let generation = self.targets_generation;
                let _ = reply.send(sampler::RoundStart {
                    targets: (known != Some(generation))
                        .then(|| (generation, self.table.sample_targets())),
                    every_round: self.events.every_round_wanted(),
                });
            }
            Command::Samples(batch) => self.samples(batch),
            Command::ReportProgress(report, reply) => {
                let _ = reply.send(self.report_progress(report));
            }
            Command::Remove(agent_id, reply) => {
                let _ = reply.send(self.remove(&agent_id));
            }
            Command::GroupsGone(gone) => {
                self.group_check_running = false;
                for (agent_id, pgid) in gone {
                    let same_group = self
                        .table
                        .get(&agent_id)
                        .is_ok_and(|m| m.record().pid == Some(pgid));
                    if same_group {
                        self.input(&agent_id, |m, now, out| m.group_gone(now, out));
                    }
                }
            }
            Command::KeptExit(exit) => {
                if let Some(agent_id) = self.table.take_child(exit.pid) {
                    let same_run = self.table.get(&agent_id).is_ok_and(|m| {
                        exit.start_ticks.is_none() || m.record().start_ticks == exit.start_ticks
                    });
                    if same_run {
                        self.leader_exited(&agent_id, Some(exit.exit));
                    }
                }
                let _ = self.acks.send(Ack::Exit(exit.pid));
            }
            Command::KernelDenied(denial) => self.kernel_denied(denial),
            Command::Spent(agent_id, model, usage, reached) => {
                self.spent(&agent_id, &model, &usage);
                for exhausted in reached {
                    self.budget_reached(exhausted);
                }
            }
            Command::BudgetReached(exhausted) => self.budget_reached(exhausted),
            Command::Spending(reply) => {
                let _ = reply.send(self.table.spending().clone());
            }
            Command::AgentProcesses(agent_id, reply) => {
                let held = self.table.get(&agent_id).ok().and_then(|m| {
                    let record = m.record();
                    (record.state.is_live()).then(|| record.hold()).flatten()
                });
                let _ = reply.send(held.map_or_else(Vec::new, |hold| self.os.held_processes(hold)));
            }
            Command::ReportUsage(agent_id, model, usage, reply) => {
                let _ = reply.send(self.report_usage(&agent_id, &model, usage));
            }
            Command::SetBudget(agent_id, budget, reply) => {
                let _ = reply.send(self.set_budget(&agent_id, budget));
            }
            Command::Fatal(problem) => self.failure = Some(problem),
            Command::Traced(span, command) => {
                let _entered = span.enter();
                self.dispatch(*command);
            }
        }
    }

    /// The moment an input happens.
    fn now(&self) -> Now {
        Now {
            mono: self.clock.mono(),
            wall: self.clock.wall(),
            jitter: self.clock.jitter(),
            shutting_down: self.shutting_down,
        }
    }

    /// Feeds one input to an agent's machine, keeps its deadline in the timer set, and
    /// queues its effects; then carries out the queue, unless this input came from work
    /// already being carried out (that work's loop goes on to these effects, in order).
    /// `None` when there is no such agent.
    fn input<R>(
        &mut self,
        agent_id: &str,
        input: impl FnOnce(&mut AgentMachine, Now, &mut Vec<Effect>) -> R,
    ) -> Option<R> {
        let now = self.now();
        let machine = self.table.get_mut(agent_id)?;
        let before = machine.deadline();
        let sampled_as = (machine.leader_alive(), machine.record().pid);
        let held = machine.record().state.holds_capacity();
        let mut effects = Vec::new();
        let result = input(machine, now, &mut effects);
        let after = machine.deadline();
        let holds = machine.record().state.holds_capacity();
        let load = machine.record().spec.load_percentage;
        if sampled_as != (machine.leader_alive(), machine.record().pid) {
            self.targets_generation += 1;
        }
        let watches = machine.watches_group();
        match &machine.record().cgroup {
            // Only a stop under way (rare) clones the path.
            Some(cgroup) if watches || !self.cgroups_watched.is_empty() => {
                let cgroup = cgroup.clone();
                self.watch_cgroup(agent_id, &cgroup, watches);
            }
            Some(_) => {}
            None if watches => {
                self.groups_watched.insert(agent_id.to_string());
            }
            None => {
                self.groups_watched.remove(agent_id);
            }
        }
        if held != holds {
            self.table.held_changed(holds, load);
        }
        if before != after {
            if let Some(at) = before {
                self.deadlines.remove(&(at, agent_id.to_string()));
            }
            if let Some(at) = after {
                self.deadlines.insert((at, agent_id.to_string()));
            }
        }
        self.queue
            .extend(effects.into_iter().map(|effect| Work::Effect {
                agent_id: agent_id.to_string(),
                now,
                effect,
            }));
        self.carry_out_queue();
        Some(result)
    }

    /// Carries out queued work in order until none is left. Work never calls `input` from
    /// inside an effect: what must feed a machine again (a launch, the stops of followers)
    /// is queued as a step, so the call depth stays the same however deep the agent tree.
    fn carry_out_queue(&mut self) {
        if self.carrying_out {
            return;
        }
        self.carrying_out = true;
        while let Some(work) = self.queue.pop_front() {
            match work {
                Work::Effect {
                    agent_id,
                    now,
                    effect,
                } => self.carry_out(&agent_id, now, effect),
                Work::Step { agent_id, step } => step(self, &agent_id),
            }
        }
        self.carrying_out = false;
    }

    fn carry_out(&mut self, agent_id: &str, now: Now, effect: Effect) {
        {
            let Ok(machine) = self.table.get(agent_id) else {
                return;
            };
            match effect {
                Effect::Persist => {
                    if let Err(error) = self.store.put(machine.record()) {
                        tracing::error!(%agent_id, %error, "saving agent record");
                    }
                }
                Effect::Emit {
                    kind,
                    message,
                    alert,
                } => {
                    if kind != EventKind::Health {
                        tracing::info!(%agent_id, ?kind, "{message}");
                    }
                    if kind == EventKind::Restarting {
                        self.traces.restarting(agent_id, &message);
                    }
                    self.recorder.event(kind);
                    self.events
                        .emit(kind, message, alert, || machine.status(now.mono));
                }
                Effect::Signal(signal) => {
                    let Some(hold) = machine.record().hold() else {
                        return;
                    };
                    tracing::info!(%agent_id, %signal, "stop ladder");
                    self.traces
                        .signalled(agent_id, signal, machine.stop_reason());
                    let sent = match self.os.signal_group(hold, signal) {
                        // A leader that left its group still gets the signal.
                        Ok(false) if machine.leader_alive() => {
                            self.os.signal_process(hold.pgid, signal)
                        }
                        other => other,
                    };
                    if let Err(error) = sent {
                        tracing::warn!(%agent_id, %error, %signal, "signalling the agent's processes");
                    }
                }
                Effect::Freeze(frozen) => {
                    let Some(hold) = machine.record().hold() else {
                        return;
                    };
                    if let Err(error) = self.os.freeze(hold, frozen) {
                        tracing::warn!(%agent_id, %error, frozen, "freezing the agent's processes");
                    }
                }
                Effect::StopFinished { outcome, duration } => {
                    let status = machine.status(now.mono);
                    tracing::info!(%agent_id, ?outcome, ?duration, "stopped");
                    self.recorder.stopped(outcome, duration);
                    self.traces.stop_finished(agent_id, outcome);
                    for waiter in self.stop_waiters.remove(agent_id).unwrap_or_default() {
                        let _ = waiter.send(StopReport {
                            agent_id: agent_id.to_string(),
                            outcome,
                            duration,
                            status: status.clone(),
                        });
                    }
                }
                Effect::EndedForGood => {
                    self.traces.ended(agent_id);
                    let shutting_down = self.shutting_down;
                    self.answer_restart(agent_id, || {
                        Err(match shutting_down {
                            true => Error::ShuttingDown,
                            false => Error::CannotRestart {
                                id: agent_id.to_string(),
                                why: "it was stopped before it started again".into(),
                            },
                        })
                    });
                    self.remove_cgroup_if_empty(agent_id);
                    self.queue.push_back(Work::Step {
                        agent_id: agent_id.to_string(),
                        step: Self::stop_followers,
                    });
                }
                Effect::RunEnded(reason) => {
                    self.recorder.run_ended(reason);
                    self.queue.push_back(Work::Step {
                        agent_id: agent_id.to_string(),
                        step: Self::end_proxy,
                    });
                    // Between runs nothing runs: the series says so until the next one's
                    // first sample, instead of repeating the last one across the gap.
                    if let Some(history) = self.histories.get_mut(agent_id) {
                        history.record(HistoryPoint::ended(now.wall), self.history_capacity);
                    }
                }
                Effect::Launch => {
                    self.recorder.restarted();
                    self.queue.push_back(Work::Step {
                        agent_id: agent_id.to_string(),
                        step: Self::launch,
                    });
                }
            }
        }
    }

    fn on_deadlines(&mut self) {
        let now = self.clock.mono();
        while let Some((at, agent_id)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, agent_id.clone()));
            self.input(&agent_id, |m, now, out| m.timeout(now, out));
        }
    }
}

/// Hands every exit the keeper reports to the supervisor task. The keeper going away is
/// fatal: agentd exits, and the next one starts a keeper and adopts the agents.
async fn forward_kept_exits(mut exits: ExitStream, commands: mpsc::Sender<Command>) {
    while let Some(exit) = exits.next().await {
        if commands.send(Command::KeptExit(exit)).await.is_err() {
            return;
        }
    }
    let _ = commands
        .send(Command::Fatal("the keeper exited".into()))
        .await;
}

/// A message for the task that acknowledges exits to the keeper.
enum Ack {
    /// The exit of this pid is handled.
    Exit(i32),
    /// The record of this run (the keeper's child) is written: once it is on disk, the
    /// keeper is told, so a store that loses it is caught at the next start (`trust.rs`).
    Recorded(i32),
    /// Answer once everything sent before is acknowledged.
    Drain(oneshot::Sender<()>),
}

/// Acknowledges handled exits, and tells which runs are recorded, in batches, each once a
/// flush has put it on disk. `keeps_records`: the keeper understands `Recorded`.
async fn acknowledge_exits(
    mut queue: mpsc::UnboundedReceiver<Ack>,
    mut sink: AckSink,
    store: Store,
    keeps_records: bool,
) {
    while let Some(first) = queue.recv().await {
        let (mut pids, mut recorded, mut drained) = (Vec::new(), Vec::new(), Vec::new());
        let mut take = |ack| match ack {
            Ack::Exit(pid) => pids.push(pid),
            Ack::Recorded(pid) if keeps_records => recorded.push(pid),
            Ack::Recorded(_) => {}
            Ack::Drain(done) => drained.push(done),
        };
        take(first);
        while let Ok(ack) = queue.try_recv() {
            take(ack);
        }
        if !pids.is_empty() || !recorded.is_empty() {
            match store.flush().await {
                Ok(()) => {
                    if !pids.is_empty()
                        && let Err(error) = sink.ack(pids).await
                    {
                        tracing::error!(%error, "acknowledging exits to the keeper");
                    }
                    if !recorded.is_empty()
                        && let Err(error) = sink.recorded(recorded).await
                    {
                        tracing::error!(%error, "telling the keeper which runs are recorded");
                    }
                }
                Err(error) => tracing::error!(%error, "flushing exits before acknowledging them"),
            }
        }
        for done in drained {
            let _ = done.send(());
        }
    }
}

/// The span of a process start: its cgroup, and the keeper's fork and exec.
fn exec_span(agent_id: &str) -> tracing::span::EnteredSpan {
    tracing::info_span!(target: trace::TARGET, "agentd.spawn.exec", agent.id = agent_id).entered()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
