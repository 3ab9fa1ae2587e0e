//! The supervisor task: the one owner of the agent table. It runs a single `select!` over
//! client commands, SIGCHLD, exits of adopted agents, stop-ladder deadlines and health
//! samples. Everyone else holds a [`SupervisorHandle`] and sends it a [`Command`] with a
//! oneshot reply.
//!
//! Architecture invariants: only this task mutates agents, writes the store or emits events;
//! it is also the only place that starts processes and reaps children (see `os`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agent::{AgentRecord, AgentState, AgentStatus, Exit};
use crate::error::{Error, Result};
use crate::events::{EventBus, EventFilter, EventKind, EventRetention, Subscription};
use crate::health::{Alert, ProgressReport};
use crate::lifecycle::RunEnd;
use crate::logs::LogRotation;
use crate::os;
use crate::sampler::{self, SampleBatch, SampleTarget, TreeSample};
use crate::spec::SpawnRequest;
use crate::stop::{Stop, StopOptions, StopReason, StopReport};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Holds the store (`store/`) and one folder per agent (`agents/ID/`).
    pub data_dir: PathBuf,
    pub sample_interval: Duration,
    /// Events a subscriber may fall behind by before it is told it lagged.
    pub event_buffer: usize,
    pub event_retention: EventRetention,
    pub limits: Limits,
    pub log_rotation: LogRotation,
    /// How long, and how many, agents that ended for good are kept before they are removed.
    pub finished_retention: FinishedRetention,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedRetention {
    pub max_count: usize,
    pub max_age: Duration,
}

impl Default for FinishedRetention {
    fn default() -> Self {
        FinishedRetention {
            max_count: 1000,
            max_age: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What the daemon allows and how it leaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The total declared load (`load_percentage`) the host takes.
    pub capacity: f64,
    /// Agents that may be starting, running, stopping or backing off at once.
    pub max_agents: Option<usize>,
    pub on_shutdown: ShutdownPolicy,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            capacity: 100.0,
            max_agents: None,
            on_shutdown: ShutdownPolicy::Stop,
        }
    }
}

/// What a daemon that is asked to shut down does with its agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownPolicy {
    /// Stop every agent with its ladder, all at once.
    #[default]
    Stop,
    /// Leave them running; the next agentd adopts them.
    Detach,
}

impl SupervisorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        SupervisorConfig {
            data_dir,
            sample_interval: Duration::from_secs(1),
            event_buffer: 8192,
            event_retention: EventRetention::default(),
            limits: Limits::default(),
            log_rotation: LogRotation::default(),
            finished_retention: FinishedRetention::default(),
        }
    }
}

/// A subscription request.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    pub filter: EventFilter,
    /// First send the current status of every matching agent.
    pub include_snapshot: bool,
    /// First replay the logged events after this sequence.
    pub after_sequence: Option<u64>,
}

/// Which agents `list` returns. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub states: HashSet<AgentState>,
    pub parent_agent_id: String,
    pub labels: BTreeMap<String, String>,
    /// Only this agent and its descendants.
    pub subtree_of: Option<String>,
}

#[derive(Debug, Clone)]
pub enum StopTarget {
    Agents(Vec<String>),
    All,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub total: u32,
    pub starting: u32,
    pub running: u32,
    pub stopping: u32,
    pub completed: u32,
    pub failed: u32,
    pub killed: u32,
    pub lost: u32,
    pub zombies: u32,
    pub total_memory_mb: f64,
    pub total_cpu_percent: f64,
    pub total_load_percentage: f64,
    pub stalled: u32,
    pub over_limit: u32,
    pub backing_off: u32,
    pub timed_out: u32,
    pub capacity: f64,
    pub free_capacity: f64,
    pub max_agents: Option<usize>,
    /// Stored records that could not be loaded and were set aside.
    pub records_set_aside: u32,
    /// Every live agent whose health is not healthy, by agent id.
    pub unhealthy: Vec<HealthReport>,
}

/// Why one agent is not healthy.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    pub agent_id: String,
    pub health: crate::agent::Health,
    pub reason: String,
    pub since: Option<SystemTime>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReapReport {
    pub agent_ids: Vec<String>,
    pub orphans_reaped: u32,
}

pub(crate) enum Command {
    Spawn(Box<SpawnRequest>, oneshot::Sender<Result<AgentStatus>>),
    Status(String, oneshot::Sender<Result<AgentStatus>>),
    List(ListFilter, oneshot::Sender<Result<Vec<AgentStatus>>>),
    Stop(
        StopTarget,
        StopOptions,
        oneshot::Sender<Result<Vec<StopReport>>>,
    ),
    Summary(oneshot::Sender<Summary>),
    Reap(oneshot::Sender<ReapReport>),
    Watch(Watch, oneshot::Sender<Result<Subscription>>),
    Shutdown(oneshot::Sender<()>),
    SampleTargets(oneshot::Sender<Vec<SampleTarget>>),
    Samples(SampleBatch),
    ReportProgress(ProgressReport, oneshot::Sender<Result<AgentStatus>>),
    Remove(String, oneshot::Sender<Result<AgentStatus>>),
    /// Something the supervisor depends on broke (the sampler thread died): it stops, and
    /// the daemon exits non-zero instead of limping.
    Fatal(String),
}

/// A cheap, cloneable way to talk to the supervisor task.
#[derive(Clone)]
pub struct SupervisorHandle {
    commands: mpsc::Sender<Command>,
    /// Lets a caller wait for its change to reach the disk on its own task, not the
    /// supervisor's.
    store: Store,
}

impl SupervisorHandle {
    async fn request<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Starts an agent; answers once its record is on disk.
    pub async fn spawn(&self, request: SpawnRequest) -> Result<AgentStatus> {
        let spawned = self
            .request(|reply| Command::Spawn(Box::new(request), reply))
            .await?;
        // Answer only once the record (or the failure) is on disk.
        self.store.flush().await?;
        spawned
    }

    pub async fn status(&self, agent_id: String) -> Result<AgentStatus> {
        self.request(|reply| Command::Status(agent_id, reply))
            .await?
    }

    /// Matching agents, sorted by id.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<AgentStatus>> {
        self.request(|reply| Command::List(filter, reply)).await?
    }

    /// Stops agents, all ladders concurrently; answers when every one has ended.
    pub async fn stop(&self, target: StopTarget, options: StopOptions) -> Result<Vec<StopReport>> {
        self.request(|reply| Command::Stop(target, options, reply))
            .await?
    }

    /// Records an agent's heartbeat and progress.
    pub async fn report_progress(&self, report: ProgressReport) -> Result<AgentStatus> {
        self.request(|reply| Command::ReportProgress(report, reply))
            .await?
    }

    /// Deletes an agent that has ended for good: record, folder, output.
    pub async fn remove(&self, agent_id: String) -> Result<AgentStatus> {
        self.request(|reply| Command::Remove(agent_id, reply))
            .await?
    }

    pub async fn summary(&self) -> Result<Summary> {
        self.request(Command::Summary).await
    }

    pub async fn reap(&self) -> Result<ReapReport> {
        self.request(Command::Reap).await
    }

    /// Subscribes to events; see [`Watch`].
    pub async fn watch(&self, watch: Watch) -> Result<Subscription> {
        self.request(|reply| Command::Watch(watch, reply)).await?
    }

    /// Refuses new spawns, stops every agent with its ladder and flushes the store.
    pub async fn shutdown(&self) -> Result<()> {
        self.request(Command::Shutdown).await
    }

    /// Completes when the supervisor task has stopped. Before a shutdown that means it
    /// failed (the reason is in the log): the daemon must then exit, not serve errors.
    pub async fn stopped(&self) {
        self.commands.closed().await;
    }
}

pub struct Supervisor;

impl Supervisor {
    /// Opens the store, adopts or marks lost the agents of an earlier daemon, and starts the
    /// supervisor task and the sampler. Must be called inside a tokio runtime, before
    /// anything else in the process starts children.
    pub fn start(mut config: SupervisorConfig) -> Result<SupervisorHandle> {
        create_private_dir(&config.data_dir)?;
        // Agents get absolute paths, and a restart recognises them whatever its own folder.
        config.data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|source| Error::Setup {
                what: format!("resolving `{}`", config.data_dir.display()),
                source,
            })?;
        let agents_dir = config.data_dir.join("agents");
        let trash_dir = config.data_dir.join("trash");
        create_private_dir(&agents_dir)?;
        // Folders of removed agents that an earlier daemon did not finish deleting.
        let _ = std::fs::remove_dir_all(&trash_dir);
        create_private_dir(&trash_dir)?;
        let store = Store::open(&config.data_dir.join("store"))?;
        store.start_background_flush();
        os::become_subreaper().map_err(|source| Error::Setup {
            what: "becoming a child subreaper".into(),
            source,
        })?;
        let sigchld = signal(SignalKind::child()).map_err(|source| Error::Setup {
            what: "listening for SIGCHLD".into(),
            source,
        })?;
        let (commands_tx, commands) = mpsc::channel(1024);
        let limits = config.limits;
        let (adopted_exits_tx, adopted_exits) = mpsc::unbounded_channel();
        let events = EventBus::open(store.clone(), config.event_buffer, config.event_retention)?;
        let mut task = SupervisorTask {
            store: store.clone(),
            events,
            agents_dir,
            agents: BTreeMap::new(),
            by_pid: HashMap::new(),
            by_request: HashMap::new(),
            timers: BTreeSet::new(),
            adopted_exits_tx,
            shutting_down: false,
            ids_generated: 0,
            limits,
            commands: commands_tx.downgrade(),
            finished_retention: config.finished_retention,
            trash_dir,
            failure: None,
            records_set_aside: 0,
        };
        task.recover()?;
        task.reap();
        tokio::spawn(task.run(commands, sigchld, adopted_exits));

        let handle = SupervisorHandle {
            commands: commands_tx,
            store: store.clone(),
        };
        let (targets, deliver, died) = (handle.clone(), handle.clone(), handle.clone());
        sampler::start(
            config.sample_interval,
            config.log_rotation,
            move || {
                let (reply, answer) = oneshot::channel();
                targets
                    .commands
                    .blocking_send(Command::SampleTargets(reply))
                    .ok()?;
                answer.blocking_recv().ok()
            },
            move |batch| {
                deliver
                    .commands
                    .blocking_send(Command::Samples(batch))
                    .is_ok()
            },
            move |problem| {
                let _ = died.commands.blocking_send(Command::Fatal(problem));
            },
        )
        .map_err(|source| Error::Setup {
            what: "starting the sampler thread".into(),
            source,
        })?;
        Ok(handle)
    }
}

fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| Error::Setup {
            what: format!("creating `{}`", path.display()),
            source,
        })
}

/// What a pending timer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    /// The current stop-ladder step's grace period ends.
    StopStep,
    /// A backing-off agent is due to start again.
    Restart,
    /// The current run reaches its `max_runtime`.
    MaxRuntime,
    /// The current run must have sent its first heartbeat.
    StartupTimeout,
}

/// One agent in the table.
pub(crate) struct Agent {
    pub record: AgentRecord,
    /// The leader has not been reaped yet (for an adopted agent: has not exited).
    pub leader_alive: bool,
    /// The process group may still have members, so a stop must signal it.
    pub group_may_live: bool,
    pub sample: Option<TreeSample>,
    pub stop: Option<Stop>,
    /// Consecutive samples over the CPU limit.
    pub cpu_samples_over: u32,
    /// The current run has ended and its restart decision is made.
    pub run_over: bool,
    /// When the pending restart is due (while backing off).
    pub restart_at: Option<Instant>,
    /// When the current run reaches its `max_runtime`.
    pub max_runtime_at: Option<Instant>,
    /// When the current run must have sent its first heartbeat.
    pub startup_deadline: Option<Instant>,
}

impl Agent {
    pub(crate) fn new(record: AgentRecord, alive: bool) -> Agent {
        Agent {
            record,
            leader_alive: alive,
            group_may_live: alive,
            sample: None,
            stop: None,
            cpu_samples_over: 0,
            run_over: !alive,
            restart_at: None,
            max_runtime_at: None,
            startup_deadline: None,
        }
    }

    pub(crate) fn status(&self) -> AgentStatus {
        AgentStatus::new(&self.record, self.leader_alive, self.sample.as_ref())
    }
}

pub(crate) struct SupervisorTask {
    pub(crate) store: Store,
    pub(crate) events: EventBus,
    pub(crate) agents_dir: PathBuf,
    pub(crate) agents: BTreeMap<String, Agent>,
    /// Leaders that are our children, by pid, for dispatching reaped exits.
    pub(crate) by_pid: HashMap<i32, String>,
    /// Idempotency keys of spawns that started a process.
    pub(crate) by_request: HashMap<String, String>,
    /// Every pending timer: stop-ladder steps, restarts, runtime and startup limits.
    pub(crate) timers: BTreeSet<(Instant, String, Timer)>,
    pub(crate) adopted_exits_tx: mpsc::UnboundedSender<String>,
    pub(crate) shutting_down: bool,
    pub(crate) ids_generated: u64,
    pub(crate) limits: Limits,
    /// Our own command queue, for work that runs as separate tasks (cascading stops); weak,
    /// so the task still ends when every real handle is gone.
    pub(crate) commands: mpsc::WeakSender<Command>,
    pub(crate) finished_retention: FinishedRetention,
    /// Removed agents' folders wait here to be deleted.
    pub(crate) trash_dir: PathBuf,
    /// Why the task must stop, once something it depends on broke.
    failure: Option<String>,
    /// Stored records that could not be loaded (counted at start).
    pub(crate) records_set_aside: u32,
}

/// While a stopping agent's leader is gone but its group lingers, no SIGCHLD may tell us
/// when the rest exits (they need not be our children), so the group is checked this often.
const GROUP_CHECK: Duration = Duration::from_millis(20);

impl SupervisorTask {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut sigchld: tokio::signal::unix::Signal,
        mut adopted_exits: mpsc::UnboundedReceiver<String>,
    ) {
        let mut last_group_check = Instant::now();
        loop {
            let next_timer = self.timers.first().map(|(at, _, _)| *at);
            let next_group_check = self
                .has_lingering_group()
                .then(|| last_group_check + GROUP_CHECK);
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                Some(()) = sigchld.recv() => {
                    self.reap();
                }
                Some(agent_id) = adopted_exits.recv() => {
                    self.on_leader_exit(&agent_id, None);
                    self.check_stopping_groups();
                }
                () = sleep_until(next_timer) => self.on_timers(),
                () = sleep_until(next_group_check) => {
                    last_group_check = Instant::now();
                    self.check_stopping_groups();
                }
            }
            // Once per turn, not per write: a Spawn's own flush then covers all of its writes.
            self.store.flush_soon();
            if let Some(error) = self.events.failure() {
                self.failure = Some(format!("events can no longer be numbered: {error}"));
            }
            if let Some(problem) = &self.failure {
                tracing::error!("the supervisor stops: {problem}");
                return;
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            #[cfg(debug_assertions)]
            Command::Spawn(..)
                if std::env::var_os("AGENTD_TEST_PANIC").is_some_and(|v| v == "supervisor") =>
            {
                panic!("AGENTD_TEST_PANIC=supervisor");
            }
            Command::Spawn(request, reply) => {
                let _ = reply.send(self.spawn(*request));
            }
            Command::Status(agent_id, reply) => {
                let _ = reply.send(self.agent(&agent_id).map(Agent::status));
            }
            Command::List(filter, reply) => {
                let _ = reply.send(self.list(&filter));
            }
            Command::Stop(target, options, reply) => self.stop(target, options, reply),
            Command::Summary(reply) => {
                let _ = reply.send(self.summary());
            }
            Command::Reap(reply) => {
                let _ = reply.send(self.reap());
            }
            Command::Watch(watch, reply) => {
                let statuses: Vec<AgentStatus> = if watch.include_snapshot {
                    self.agents
                        .values()
                        .map(Agent::status)
                        .filter(|status| watch.filter.matches_agent(status))
                        .collect()
                } else {
                    Vec::new()
                };
                let _ = reply.send(
                    self.events
                        .subscribe(statuses.into_iter(), watch.after_sequence),
                );
            }
            Command::Shutdown(reply) => self.shutdown(reply),
            Command::SampleTargets(reply) => {
                let _ = reply.send(self.sample_targets());
            }
            Command::Samples(batch) => self.apply_samples(batch),
            Command::ReportProgress(report, reply) => {
                let _ = reply.send(self.report_progress(report));
            }
            Command::Remove(agent_id, reply) => {
                let _ = reply.send(self.remove(&agent_id));
            }
            Command::Fatal(problem) => self.failure = Some(problem),
        }
    }

    /// A handle to this task, for work it hands to other tasks.
    pub(crate) fn own_handle(&self) -> Option<SupervisorHandle> {
        Some(SupervisorHandle {
            commands: self.commands.upgrade()?,
            store: self.store.clone(),
        })
    }

    pub(crate) fn agent(&self, agent_id: &str) -> Result<&Agent> {
        self.agents.get(agent_id).ok_or_else(|| Error::NotFound {
            id: agent_id.to_string(),
        })
    }

    /// Writes a record; a store failure here has no client to answer, so it is logged.
    pub(crate) fn persist(&self, record: &AgentRecord) {
        if let Err(error) = self.store.put(record) {
            tracing::error!(agent_id = %record.spec.agent_id, %error, "saving agent record");
        }
    }

    pub(crate) fn emit(&mut self, agent_id: &str, kind: EventKind, message: String) {
        if let Some(agent) = self.agents.get(agent_id) {
            self.events.emit(kind, message, None, || agent.status());
        }
    }

    pub(crate) fn emit_alert(
        &mut self,
        agent_id: &str,
        kind: EventKind,
        message: String,
        alert: Alert,
    ) {
        if let Some(agent) = self.agents.get(agent_id) {
            self.events
                .emit(kind, message, Some(alert), || agent.status());
        }
    }

    fn on_timers(&mut self) {
        let now = Instant::now();
        while let Some((at, agent_id, timer)) = self.timers.first().cloned() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, agent_id.clone(), timer));
            match timer {
                Timer::StopStep => self.on_stop_deadline(&agent_id),
                Timer::Restart => self.restart(&agent_id, at),
                Timer::MaxRuntime => self.on_max_runtime(&agent_id, at),
                Timer::StartupTimeout => self.on_startup_timeout(&agent_id, at),
            }
        }
    }

    /// Reaps every exited child: agent leaders get their exit recorded, orphans are dropped.
    pub(crate) fn reap(&mut self) -> ReapReport {
        let mut report = ReapReport::default();
        while let Some((pid, exit)) = os::reap_one() {
            match self.by_pid.remove(&pid) {
                Some(agent_id) => {
                    self.on_leader_exit(&agent_id, Some(exit));
                    report.agent_ids.push(agent_id);
                }
                None => report.orphans_reaped += 1,
            }
        }
        self.check_stopping_groups();
        report
    }

    /// Records how the leader ended. `exit` is `None` for an adopted agent, whose status
    /// only its real parent could read.
    pub(crate) fn on_leader_exit(&mut self, agent_id: &str, exit: Option<Exit>) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        agent.leader_alive = false;
        agent.sample = None;
        let reason = agent.stop.as_ref().map(|stop| stop.reason);
        let policy = agent.record.spec.clone();
        let policy = &policy.lifecycle;
        let limit_text = |limit: Option<Duration>| limit.map_or(0.0, |l| l.as_secs_f64());
        let record = &mut agent.record;
        record.ended_at = Some(SystemTime::now());
        record.exit = exit;
        let exit_text = match exit {
            Some(Exit::Code(code)) => format!("exited with code {code}"),
            Some(Exit::Signal(signal)) => format!("killed by signal {signal}"),
            None => "exited; exit status unknown (adopted from an earlier agentd)".to_string(),
        };
        let (state, kind, error) = match reason {
            Some(StopReason::MaxRuntime) => (
                AgentState::TimedOut,
                EventKind::TimedOut,
                Some(format!(
                    "ran past its max_runtime of {}s",
                    limit_text(policy.max_runtime)
                )),
            ),
            Some(StopReason::StartupTimeout) => (
                AgentState::Failed,
                EventKind::Failed,
                Some(format!(
                    "sent no first heartbeat within its startup_timeout of {}s",
                    limit_text(policy.startup_timeout)
                )),
            ),
            // The health check already recorded why.
            Some(StopReason::HealthRestart) => (AgentState::Failed, EventKind::Failed, None),
            Some(_) => (AgentState::Killed, EventKind::Killed, None),
            None => match exit {
                Some(Exit::Code(0)) | None => (AgentState::Completed, EventKind::Exited, None),
                Some(_) => (
                    AgentState::Failed,
                    EventKind::Failed,
                    Some(exit_text.clone()),
                ),
            },
        };
        record.state = state;
        if error.is_some() {
            record.error = error;
        }
        agent.group_may_live = record
            .pid
            .is_some_and(|pgid| os::GroupProbe::default().alive(pgid));
        tracing::info!(%agent_id, ?state, "{exit_text}");
        let record = agent.record.clone();
        let stopping = agent.stop.is_some();
        self.persist(&record);
        self.emit(agent_id, kind, exit_text);
        // A stopped run ends when its whole group is gone (`finish_stop_if_gone`).
        if !stopping {
            self.run_ended(agent_id, RunEnd::Exited(exit));
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
