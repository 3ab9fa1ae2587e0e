//! The supervisor task: the one owner of the agent table. It runs a single `select!` over
//! client commands, SIGCHLD, exits of adopted agents, stop-ladder deadlines and health
//! samples. Everyone else holds a [`SupervisorHandle`] and sends it a [`Command`] with a
//! oneshot reply.
//!
//! Architecture invariants: only this task mutates agents, writes the store or emits events;
//! it is also the only place that starts processes and reaps children (see `os`).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::agent::{AgentRecord, AgentState, AgentStatus, Exit};
use crate::error::{Error, Result};
use crate::events::{EventBus, EventFilter, EventKind, Subscription};
use crate::os;
use crate::sampler::{self, SampleBatch, SampleTarget, TreeSample};
use crate::spec::{SpawnRequest, check_id};
use crate::stop::{Stop, StopReport};
use crate::store::Store;

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Holds the store (`store/`) and one folder per agent (`agents/ID/`).
    pub data_dir: PathBuf,
    pub sample_interval: Duration,
    /// Events a subscriber may fall behind by before it is told it lagged.
    pub event_buffer: usize,
}

impl SupervisorConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        SupervisorConfig {
            data_dir,
            sample_interval: Duration::from_secs(1),
            event_buffer: 8192,
        }
    }
}

/// Which agents `list` returns. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub states: HashSet<AgentState>,
    pub parent_agent_id: String,
    pub labels: BTreeMap<String, String>,
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
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReapReport {
    pub agent_ids: Vec<String>,
    pub orphans_reaped: u32,
}

enum Command {
    Spawn(Box<SpawnRequest>, oneshot::Sender<Result<AgentStatus>>),
    Status(String, oneshot::Sender<Result<AgentStatus>>),
    List(ListFilter, oneshot::Sender<Vec<AgentStatus>>),
    Stop(StopTarget, bool, oneshot::Sender<Result<Vec<StopReport>>>),
    Summary(oneshot::Sender<Summary>),
    Reap(oneshot::Sender<ReapReport>),
    Watch(EventFilter, bool, oneshot::Sender<Subscription>),
    Shutdown(oneshot::Sender<()>),
    SampleTargets(oneshot::Sender<Vec<SampleTarget>>),
    Samples(SampleBatch),
}

/// A cheap, cloneable way to talk to the supervisor task.
#[derive(Clone)]
pub struct SupervisorHandle {
    commands: mpsc::Sender<Command>,
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
        self.request(|reply| Command::Spawn(Box::new(request), reply))
            .await?
    }

    pub async fn status(&self, agent_id: String) -> Result<AgentStatus> {
        self.request(|reply| Command::Status(agent_id, reply))
            .await?
    }

    /// Matching agents, sorted by id.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<AgentStatus>> {
        self.request(|reply| Command::List(filter, reply)).await
    }

    /// Stops agents, all ladders concurrently; answers when every one has ended.
    pub async fn stop(&self, target: StopTarget, force: bool) -> Result<Vec<StopReport>> {
        self.request(|reply| Command::Stop(target, force, reply))
            .await?
    }

    pub async fn summary(&self) -> Result<Summary> {
        self.request(Command::Summary).await
    }

    pub async fn reap(&self) -> Result<ReapReport> {
        self.request(Command::Reap).await
    }

    pub async fn watch(&self, filter: EventFilter, include_snapshot: bool) -> Result<Subscription> {
        self.request(|reply| Command::Watch(filter, include_snapshot, reply))
            .await
    }

    /// Refuses new spawns, stops every agent with its ladder and flushes the store.
    pub async fn shutdown(&self) -> Result<()> {
        self.request(Command::Shutdown).await
    }
}

pub struct Supervisor;

impl Supervisor {
    /// Opens the store, adopts or marks lost the agents of an earlier daemon, and starts the
    /// supervisor task and the sampler. Must be called inside a tokio runtime, before
    /// anything else in the process starts children.
    pub fn start(config: SupervisorConfig) -> Result<SupervisorHandle> {
        let agents_dir = config.data_dir.join("agents");
        create_private_dir(&config.data_dir)?;
        create_private_dir(&agents_dir)?;
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
        let (adopted_exits_tx, adopted_exits) = mpsc::unbounded_channel();
        let mut task = SupervisorTask {
            store,
            events: EventBus::new(config.event_buffer),
            agents_dir,
            agents: BTreeMap::new(),
            by_pid: HashMap::new(),
            by_request: HashMap::new(),
            deadlines: BTreeSet::new(),
            adopted_exits_tx,
            shutting_down: false,
            ids_generated: 0,
        };
        task.recover()?;
        task.reap();
        tokio::spawn(task.run(commands, sigchld, adopted_exits));

        let handle = SupervisorHandle {
            commands: commands_tx,
        };
        let (targets, deliver) = (handle.clone(), handle.clone());
        sampler::start(
            config.sample_interval,
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

/// One agent in the table.
pub(crate) struct Agent {
    pub record: AgentRecord,
    /// The leader has not been reaped yet (for an adopted agent: has not exited).
    pub leader_alive: bool,
    /// The process group may still have members, so a stop must signal it.
    pub group_may_live: bool,
    pub sample: Option<TreeSample>,
    pub stop: Option<Stop>,
}

impl Agent {
    pub fn status(&self) -> AgentStatus {
        AgentStatus::new(&self.record, self.leader_alive, self.sample.as_ref())
    }
}

pub(crate) struct SupervisorTask {
    pub store: Store,
    pub events: EventBus,
    agents_dir: PathBuf,
    pub agents: BTreeMap<String, Agent>,
    /// Leaders that are our children, by pid, for dispatching reaped exits.
    by_pid: HashMap<i32, String>,
    /// Idempotency keys of spawns that started a process.
    by_request: HashMap<String, String>,
    /// Stop-ladder deadlines; an agent is here exactly while it is being stopped.
    pub deadlines: BTreeSet<(Instant, String)>,
    adopted_exits_tx: mpsc::UnboundedSender<String>,
    shutting_down: bool,
    ids_generated: u64,
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
            let next_deadline = self.deadlines.first().map(|(at, _)| *at);
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
                () = sleep_until(next_deadline) => self.on_deadlines(),
                () = sleep_until(next_group_check) => {
                    last_group_check = Instant::now();
                    self.check_stopping_groups();
                }
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Spawn(request, reply) => {
                let result = self.spawn(*request);
                let store = self.store.clone();
                tokio::spawn(async move {
                    let flushed = store.flush().await;
                    let _ = reply.send(result.and_then(|status| flushed.map(|()| status)));
                });
            }
            Command::Status(agent_id, reply) => {
                let _ = reply.send(self.agent(&agent_id).map(Agent::status));
            }
            Command::List(filter, reply) => {
                let _ = reply.send(self.list(&filter));
            }
            Command::Stop(target, force, reply) => self.stop(target, force, reply),
            Command::Summary(reply) => {
                let _ = reply.send(self.summary());
            }
            Command::Reap(reply) => {
                let _ = reply.send(self.reap());
            }
            Command::Watch(filter, include_snapshot, reply) => {
                let statuses: Vec<AgentStatus> = if include_snapshot {
                    self.agents
                        .values()
                        .map(Agent::status)
                        .filter(|status| filter.matches_agent(status))
                        .collect()
                } else {
                    Vec::new()
                };
                let _ = reply.send(self.events.subscribe(statuses.into_iter()));
            }
            Command::Shutdown(reply) => self.shutdown(reply),
            Command::SampleTargets(reply) => {
                let _ = reply.send(self.sample_targets());
            }
            Command::Samples(batch) => self.apply_samples(batch),
        }
    }

    fn agent(&self, agent_id: &str) -> Result<&Agent> {
        self.agents.get(agent_id).ok_or_else(|| Error::NotFound {
            id: agent_id.to_string(),
        })
    }

    /// Writes a record; a store failure here has no client to answer, so it is logged.
    pub fn persist(&self, record: &AgentRecord) {
        if let Err(error) = self.store.put(record) {
            tracing::error!(agent_id = %record.spec.agent_id, %error, "saving agent record");
        }
    }

    pub fn emit(&mut self, agent_id: &str, kind: EventKind, message: String) {
        if let Some(agent) = self.agents.get(agent_id) {
            self.events.emit(kind, message, || agent.status());
        }
    }

    fn spawn(&mut self, mut request: SpawnRequest) -> Result<AgentStatus> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        if let Some(agent_id) = self.by_request.get(&request.request_id) {
            return self.agent(agent_id).map(Agent::status);
        }
        if request.agent_id.is_empty() {
            request.agent_id = self.generate_id();
        }
        let (spec, prompt) = request.validate()?;
        // An id whose earlier spawn never started a process may be tried again.
        if self
            .agents
            .get(&spec.agent_id)
            .is_some_and(|agent| agent.record.pid.is_some())
        {
            return Err(Error::AlreadyExists { id: spec.agent_id });
        }
        let agent_id = spec.agent_id.clone();
        let agent_dir = self.agents_dir.join(&agent_id);
        let files = AgentFiles::prepare(&agent_id, &agent_dir, &prompt)?;
        let mut record = AgentRecord {
            spec: Arc::new(spec),
            state: AgentState::Starting,
            agent_dir,
            pid: None,
            start_ticks: None,
            started_at: Some(SystemTime::now()),
            ended_at: None,
            exit: None,
            error: None,
            progress: 0.0,
            progress_message: String::new(),
            adopted: false,
        };
        self.store.put(&record)?;
        match files.launch(&record) {
            Ok(started) => {
                record.state = AgentState::Running;
                record.pid = Some(started.pid);
                record.start_ticks = started.start_ticks;
                self.persist(&record);
                if !record.spec.request_id.is_empty() {
                    self.by_request
                        .insert(record.spec.request_id.clone(), agent_id.clone());
                }
                self.by_pid.insert(started.pid, agent_id.clone());
                self.insert(record, true);
                tracing::info!(%agent_id, pid = started.pid, "spawned");
                self.emit(&agent_id, EventKind::Spawned, String::new());
                self.agent(&agent_id).map(Agent::status)
            }
            Err(error) => {
                let message = error.to_string();
                tracing::warn!(%agent_id, "{message}");
                let _ = std::fs::write(record.agent_dir.join("error.log"), &message);
                record.state = AgentState::Failed;
                record.ended_at = record.started_at;
                record.error = Some(message.clone());
                self.persist(&record);
                self.insert(record, false);
                self.emit(&agent_id, EventKind::Failed, message);
                Err(error)
            }
        }
    }

    fn insert(&mut self, record: AgentRecord, alive: bool) {
        let agent = Agent {
            record,
            leader_alive: alive,
            group_may_live: alive,
            sample: None,
            stop: None,
        };
        self.agents
            .insert(agent.record.spec.agent_id.clone(), agent);
    }

    fn generate_id(&mut self) -> String {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        loop {
            self.ids_generated += 1;
            let id = format!("agent-{millis:x}-{}", self.ids_generated);
            if !self.agents.contains_key(&id) {
                return id;
            }
        }
    }

    /// Reaps every exited child: agent leaders get their exit recorded, orphans are dropped.
    fn reap(&mut self) -> ReapReport {
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
    fn on_leader_exit(&mut self, agent_id: &str, exit: Option<Exit>) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        agent.leader_alive = false;
        agent.sample = None;
        let record = &mut agent.record;
        record.ended_at = Some(SystemTime::now());
        record.exit = exit;
        let (state, kind) = match exit {
            _ if agent.stop.is_some() => (AgentState::Killed, EventKind::Killed),
            Some(Exit::Code(0)) | None => (AgentState::Completed, EventKind::Exited),
            Some(_) => (AgentState::Failed, EventKind::Failed),
        };
        record.state = state;
        let message = match exit {
            Some(Exit::Code(code)) => format!("exited with code {code}"),
            Some(Exit::Signal(signal)) => format!("killed by signal {signal}"),
            None => "exited; exit status unknown (adopted from an earlier agentd)".to_string(),
        };
        if state == AgentState::Failed {
            record.error = Some(message.clone());
        }
        agent.group_may_live = record
            .pid
            .is_some_and(|pgid| os::GroupProbe::default().alive(pgid));
        tracing::info!(%agent_id, ?state, "{message}");
        let record = agent.record.clone();
        self.persist(&record);
        self.emit(agent_id, kind, message);
    }

    fn has_lingering_group(&self) -> bool {
        self.deadlines
            .iter()
            .any(|(_, id)| self.agents.get(id).is_some_and(|a| !a.leader_alive))
    }

    fn check_stopping_groups(&mut self) {
        let stopping: Vec<String> = self.deadlines.iter().map(|(_, id)| id.clone()).collect();
        let mut probe = os::GroupProbe::default();
        for agent_id in stopping {
            self.finish_stop_if_gone(&agent_id, &mut probe);
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        while let Some((at, agent_id)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, agent_id.clone()));
            self.on_stop_deadline(&agent_id);
        }
    }

    fn stop(
        &mut self,
        target: StopTarget,
        force: bool,
        reply: oneshot::Sender<Result<Vec<StopReport>>>,
    ) {
        let agent_ids = match target {
            StopTarget::All => self.agents.keys().cloned().collect(),
            StopTarget::Agents(ids) if ids.is_empty() => {
                let _ = reply.send(Err(Error::Invalid {
                    field: "agent_ids",
                    problem: "name at least one agent, or stop all".into(),
                }));
                return;
            }
            StopTarget::Agents(ids) => ids,
        };
        if let Some(unknown) = agent_ids.iter().find(|id| !self.agents.contains_key(*id)) {
            let error = match check_id("agent_ids", unknown) {
                Err(error) => error,
                Ok(()) => Error::NotFound {
                    id: unknown.clone(),
                },
            };
            let _ = reply.send(Err(error));
            return;
        }
        let pending: Vec<_> = agent_ids
            .iter()
            .map(|id| self.begin_stop(id, force))
            .collect();
        tokio::spawn(async move {
            let mut reports = Vec::with_capacity(pending.len());
            for report in pending {
                match report.await {
                    Ok(report) => reports.push(report),
                    Err(_) => {
                        let _ = reply.send(Err(Error::ShuttingDown));
                        return;
                    }
                }
            }
            let _ = reply.send(Ok(reports));
        });
    }

    fn shutdown(&mut self, reply: oneshot::Sender<()>) {
        self.shutting_down = true;
        let live: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, agent)| agent.leader_alive || agent.group_may_live)
            .map(|(id, _)| id.clone())
            .collect();
        tracing::info!(agents = live.len(), "shutting down: stopping every agent");
        let pending: Vec<_> = live.iter().map(|id| self.begin_stop(id, false)).collect();
        let store = self.store.clone();
        tokio::spawn(async move {
            for report in pending {
                let _ = report.await;
            }
            if let Err(error) = store.flush().await {
                tracing::error!(%error, "flushing the store at shutdown");
            }
            let _ = reply.send(());
        });
    }

    fn list(&self, filter: &ListFilter) -> Vec<AgentStatus> {
        self.agents
            .values()
            .filter(|agent| {
                let spec = &agent.record.spec;
                (filter.states.is_empty() || filter.states.contains(&agent.record.state))
                    && (filter.parent_agent_id.is_empty()
                        || filter.parent_agent_id == spec.parent_agent_id)
                    && filter
                        .labels
                        .iter()
                        .all(|(k, v)| spec.labels.get(k) == Some(v))
            })
            .map(Agent::status)
            .collect()
    }

    fn summary(&self) -> Summary {
        let mut summary = Summary::default();
        for agent in self.agents.values() {
            let status = agent.status();
            summary.total += 1;
            let count = match agent.record.state {
                AgentState::Starting => &mut summary.starting,
                AgentState::Running => &mut summary.running,
                AgentState::Stopping => &mut summary.stopping,
                AgentState::Completed => &mut summary.completed,
                AgentState::Failed => &mut summary.failed,
                AgentState::Killed => &mut summary.killed,
                AgentState::Lost => &mut summary.lost,
            };
            *count += 1;
            summary.zombies += u32::from(status.is_zombie);
            summary.total_memory_mb += status.memory_mb;
            summary.total_cpu_percent += status.cpu_percent;
            if agent.record.state.is_live() {
                summary.total_load_percentage += agent.record.spec.load_percentage;
            }
        }
        summary
    }

    fn sample_targets(&self) -> Vec<SampleTarget> {
        self.agents
            .values()
            .filter(|agent| agent.leader_alive)
            .filter_map(|agent| {
                Some(SampleTarget {
                    agent_id: agent.record.spec.agent_id.clone(),
                    pid: agent.record.pid?,
                    status_file: agent.record.agent_dir.join(STATUS_FILE),
                })
            })
            .collect()
    }

    fn apply_samples(&mut self, batch: SampleBatch) {
        for (agent_id, sample) in batch.samples {
            let Some(agent) = self.agents.get_mut(&agent_id) else {
                continue;
            };
            if agent.leader_alive {
                agent.sample = Some(sample);
                self.emit(&agent_id, EventKind::Health, String::new());
            }
        }
        for (agent_id, progress) in batch.progress {
            let Some(agent) = self.agents.get_mut(&agent_id) else {
                continue;
            };
            let record = &mut agent.record;
            if !record.state.is_live()
                || (record.progress == progress.progress
                    && record.progress_message == progress.message)
            {
                continue;
            }
            record.progress = progress.progress;
            record.progress_message = progress.message;
            let record = record.clone();
            self.persist(&record);
            self.emit(&agent_id, EventKind::Progress, String::new());
        }
    }

    /// Loads every stored agent. Agents an earlier daemon left running are adopted when
    /// their pid still names the same process (same start time), and marked lost otherwise.
    fn recover(&mut self) -> Result<()> {
        for mut record in self.store.load_agents()? {
            let agent_id = record.spec.agent_id.clone();
            if record.pid.is_some() && !record.spec.request_id.is_empty() {
                self.by_request
                    .insert(record.spec.request_id.clone(), agent_id.clone());
            }
            if !record.state.is_live() {
                self.insert(record, false);
                continue;
            }
            // Same pid and start time: the same process. A zombie is already gone (its new
            // parent may never reap it).
            let same_process = record.pid.filter(|&pid| {
                os::proc_stat(pid).is_some_and(|stat| {
                    Some(stat.start_ticks) == record.start_ticks && stat.state != 'Z'
                })
            });
            match same_process.map(|pid| (pid, os::pidfd_open(pid))) {
                Some((pid, Ok(pidfd))) => {
                    record.state = AgentState::Running;
                    record.adopted = true;
                    self.persist(&record);
                    self.insert(record, true);
                    self.watch_adopted(agent_id.clone(), pidfd);
                    tracing::info!(%agent_id, pid, "adopted");
                    self.emit(&agent_id, EventKind::Adopted, String::new());
                }
                _ => {
                    let message = "the process was gone when agentd restarted".to_string();
                    record.state = AgentState::Lost;
                    record.ended_at = Some(SystemTime::now());
                    record.error = Some(message.clone());
                    self.persist(&record);
                    self.insert(record, false);
                    tracing::warn!(%agent_id, "{message}");
                    self.emit(&agent_id, EventKind::Lost, message);
                }
            }
        }
        Ok(())
    }

    /// An adopted agent is not our child: its exit arrives through a pidfd.
    fn watch_adopted(&self, agent_id: String, pidfd: OwnedFd) {
        let exits = self.adopted_exits_tx.clone();
        tokio::spawn(async move {
            match os::wait_for_exit(pidfd).await {
                Ok(()) => {
                    let _ = exits.send(agent_id);
                }
                Err(error) => {
                    tracing::error!(%agent_id, %error, "cannot watch adopted agent for its exit");
                }
            }
        });
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The file an agent writes its progress to.
const STATUS_FILE: &str = "status.json";

/// An agent's folder, made ready for a launch: prompt written, output files open.
struct AgentFiles {
    stdout: std::fs::File,
    stderr: std::fs::File,
}

impl AgentFiles {
    fn prepare(agent_id: &str, dir: &Path, prompt: &str) -> Result<AgentFiles> {
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::AgentDir {
                id: agent_id.to_string(),
                path,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(failed(dir))?;
        for stale in [STATUS_FILE, "error.log"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let prompt_file = dir.join("prompt.txt");
        std::fs::write(&prompt_file, prompt).map_err(failed(&prompt_file))?;
        let create = |name: &str| {
            let path = dir.join(name);
            std::fs::File::create(&path).map_err(failed(&path))
        };
        Ok(AgentFiles {
            stdout: create("stdout.log")?,
            stderr: create("stderr.log")?,
        })
    }

    fn launch(self, record: &AgentRecord) -> Result<os::Started> {
        let spec = &record.spec;
        let dir = &record.agent_dir;
        let working_dir = spec.working_dir.as_deref().unwrap_or(dir);
        match std::fs::metadata(working_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::WorkingDir {
                    id: spec.agent_id.clone(),
                    path: working_dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "not a directory",
                    ),
                });
            }
            Err(source) => {
                return Err(Error::WorkingDir {
                    id: spec.agent_id.clone(),
                    path: working_dir.to_path_buf(),
                    source,
                });
            }
        }
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend([
            ("AGENTD_AGENT_ID".into(), spec.agent_id.clone()),
            (
                "AGENTD_AGENT_DIR".into(),
                dir.to_string_lossy().into_owned(),
            ),
            (
                "AGENTD_PARENT_AGENT_ID".into(),
                spec.parent_agent_id.clone(),
            ),
            ("AGENTD_AGENT_NAME".into(), spec.agent_name.clone()),
            ("AGENTD_AGENT_TYPE".into(), spec.agent_type.clone()),
            ("AGENTD_MODEL".into(), spec.model.clone()),
            ("AGENTD_PROMPT_FILE".into(), path("prompt.txt")),
            ("AGENTD_STATUS_FILE".into(), path(STATUS_FILE)),
        ]);
        os::spawn(os::Launch {
            command: &spec.command,
            env: &env,
            working_dir,
            stdout: self.stdout,
            stderr: self.stderr,
        })
        .map_err(|source| Error::Spawn {
            id: spec.agent_id.clone(),
            program: spec.command[0].clone(),
            source,
        })
    }
}
