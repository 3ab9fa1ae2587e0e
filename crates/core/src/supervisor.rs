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

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::agent::{AgentRecord, AgentState, AgentStatus, Exit};
use crate::cgroup;
use crate::config::{FinishedRetention, Limits, ShutdownPolicy, StoreRecovery, SupervisorConfig};
use crate::error::{Error, Result};
use crate::events::{EventBus, EventKind};
use crate::files::{self, AgentFiles, BaseEnv};
use crate::handle::{AgentHistory, Command, ReapReport, StopTarget, SupervisorHandle};
use crate::health::{HealthPolicy, ProgressReport};
use crate::history::{History, HistoryPoint};
use crate::keeper::{AckSink, ExitStream, KeeperClient, KeptChild, KeptExit};
use crate::lifecycle::ParentExit;
use crate::machine::{AgentMachine, Effect, Launched, Now};
use crate::os::{self, Os};
use crate::rebuild::{self, Rebuilt};
use crate::recorder::Recorder;
use crate::recover::{self, ExitWatch, KeeperState};
use crate::sampler::{self, SampleBatch, TreeSample};
use crate::spec::{RunAs, SpawnRequest, check_id};
use crate::stop::{StopOptions, StopOutcome, StopReason, StopReport};
use crate::store::{Store, StoreHistory};
use crate::table::AgentTable;
use crate::trace::{self, Traces};
use crate::trust;

pub struct Supervisor;

impl Supervisor {
    /// Opens the store, recovers the agents of an earlier daemon, and starts the supervisor
    /// task and the sampler. Must be called inside a tokio runtime, before anything else in
    /// the process starts children. `recorder` hears of events, run ends, restarts, stops and
    /// sampling rounds as they happen.
    pub fn start(
        mut config: SupervisorConfig,
        recorder: Arc<dyn Recorder>,
    ) -> Result<SupervisorHandle> {
        create_private_dir(&config.data_dir)?;
        // Agents get absolute paths, and a restart recognises them whatever its own folder.
        config.data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|source| Error::Setup {
                what: format!("resolving `{}`", config.data_dir.display()),
                source,
            })?;
        check_owned_dir(&config.data_dir, "data folder")?;
        // Before anything in the folder is touched: one daemon per data folder.
        let data_lock = lock_data_dir(&config.data_dir)?;
        let agents_dir = config.data_dir.join("agents");
        let trash_dir = config.data_dir.join("trash");
        create_private_dir(&agents_dir)?;
        check_owned_dir(&agents_dir, "agents' folder")?;
        // Folders of removed agents that an earlier daemon did not finish deleting.
        check_owned_dir(&trash_dir, "trash folder")?;
        let _ = std::fs::remove_dir_all(&trash_dir);
        create_private_dir(&trash_dir)?;
        let specs_dir = config.data_dir.join(rebuild::SPECS);
        create_private_dir(&specs_dir)?;
        let store_dir = config.data_dir.join("store");
        check_owned_dir(&store_dir, "store folder")?;
        let rebuilding = config.recover_store == Some(StoreRecovery::Rebuild);
        // A store sled cannot read is judged with the rest, once the keeper has said what
        // it runs (`trusted_store`).
        let opened = match Store::open(&store_dir) {
            Err(Error::StoreUnreadable { problem, .. }) => Err(problem),
            other => Ok(other?),
        };
        os::become_subreaper().map_err(|source| Error::Setup {
            what: "becoming a child subreaper".into(),
            source,
        })?;
        let sigchld = signal(SignalKind::child()).map_err(|source| Error::Setup {
            what: "listening for SIGCHLD".into(),
            source,
        })?;
        // The keeper is this same executable, run with `KEEPER_ARG`.
        let program = std::env::current_exe().map_err(|source| Error::Setup {
            what: "finding agentd's own executable to run the keeper".into(),
            source,
        })?;
        let keeper_failed = |source| Error::Setup {
            what: format!("reaching the keeper in `{}`", config.data_dir.display()),
            source,
        };
        let (keeper, kept_exits, ack_sink) =
            KeeperClient::reach(&config.data_dir, &program).map_err(keeper_failed)?;
        let hello = keeper.hello().map_err(keeper_failed)?;
        let (children, exits, keeps_records) = (hello.children, hello.exits, hello.records);
        let open_files = os::raise_open_files_limit();
        let detected = if hello.cgroups {
            cgroup::detect(&config.cgroups, &config.data_dir)
        } else {
            cgroup::Detected::None(
                "the keeper that runs was started by an older agentd and cannot start agents \
                 in cgroups; new agents get cgroups once it has exited"
                    .into(),
            )
        };
        tracing::info!("containment: {}", detected.describe());
        let sampler_cgroups = match &detected {
            cgroup::Detected::Cgroups(cgroups) => Some(cgroups.clone()),
            cgroup::Detected::None(_) => None,
        };
        let system = Arc::new(os::System::new(keeper, detected));
        let (store, records, rebuilt) = trusted_store(
            opened,
            rebuilding,
            (&store_dir, &specs_dir, &agents_dir),
            system.as_ref(),
            (&children, &exits),
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Private even when the data folder is opened for agents of other users.
            std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| Error::Setup {
                    what: format!("making `{}` private", store_dir.display()),
                    source,
                },
            )?;
        }
        store.start_background_flush();
        let cgroup_watch = os::ChangeWatch::new().map_err(|source| Error::Setup {
            what: "watching cgroups with inotify".into(),
            source,
        })?;
        let (commands_tx, commands) = mpsc::channel(1024);
        let (adopted_exits_tx, adopted_exits) = mpsc::unbounded_channel();
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let events = EventBus::open(store.clone(), config.event_buffer, config.event_retention)?;
        let mut task = SupervisorTask {
            recorder,
            page_size: system.proc_units().1,
            os: system.clone(),
            store: store.clone(),
            events,
            _data_lock: data_lock,
            agents_dir,
            specs_dir,
            trash_dir,
            trash_emptying: Arc::default(),
            table: AgentTable::default(),
            deadlines: BTreeSet::new(),
            stop_waiters: HashMap::new(),
            restart_waiters: HashMap::new(),
            traces: Traces::default(),
            adopted_exits_tx,
            acks,
            shutting_down: false,
            ids_generated: 0,
            limits: config.limits,
            base_env: BaseEnv::from_daemon(&config.pass_env),
            allow_users: config.allow_users.clone(),
            finished_retention: config.finished_retention,
            commands: commands_tx.downgrade(),
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
            history_capacity: history_capacity(config.history, config.sample_interval),
            history_window: config.history,
            sample_interval: config.sample_interval,
        };
        let recovered_exits: Vec<i32> = exits.iter().map(|exit| exit.pid).collect();
        task.recover(KeeperState { children, exits }, records, rebuilt)?;
        task.reap();
        // What recovery learned is on disk before the keeper may forget it.
        store.flush_now()?;
        system
            .keeper()
            .ack(recovered_exits)
            .map_err(keeper_failed)?;
        tokio::spawn(task.run(commands, sigchld, adopted_exits));
        tokio::spawn(forward_kept_exits(kept_exits, commands_tx.clone()));
        tokio::spawn(acknowledge_exits(
            ack_queue,
            ack_sink,
            store.clone(),
            keeps_records,
        ));

        let handle = SupervisorHandle {
            commands: commands_tx,
            store: store.clone(),
        };
        let (targets, deliver, died) = (handle.clone(), handle.clone(), handle.clone());
        sampler::start(
            config.sample_interval,
            config.log_rotation,
            sampler_cgroups,
            open_files,
            move |known| {
                let (reply, answer) = oneshot::channel();
                targets
                    .commands
                    .blocking_send(Command::SampleTargets(known, reply))
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

/// An agent may run as root (uid 0, or group 0 among its groups) only when `allowed` names
/// its user, and as anyone else unless `allowed` is a list that leaves them out.
fn check_user_allowed(agent_id: &str, run_as: &RunAs, allowed: &[String]) -> Result<()> {
    let listed = allowed
        .iter()
        .any(|entry| *entry == run_as.user || entry.parse() == Ok(run_as.uid));
    let why = if listed {
        return Ok(());
    } else if run_as.uid == 0 {
        "uid 0 is root, which agentd grants only to users listed in --allow-users".to_string()
    } else if run_as.gid == 0 || run_as.groups.contains(&0) {
        "group 0 is root's, which agentd grants only to users listed in --allow-users".to_string()
    } else if !allowed.is_empty() {
        format!("--allow-users lists only {}", allowed.join(", "))
    } else {
        return Ok(());
    };
    Err(Error::UserNotAllowed {
        id: agent_id.to_string(),
        user: run_as.user.clone(),
        why,
    })
}

/// agentd (often root) writes into its data folder: one that another user controls could
/// have a symbolic link put in place of `agents/` or the store and turn those writes against
/// any file on the host. Refused, before anything is written.
fn check_owned_dir(path: &Path, what: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    files::check_folder(path, false).map_err(|problem| Error::Setup {
        what: format!("refusing the {what} `{}`", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, problem),
    })
}

/// The store to start on, with its records: the one opened, if the host agrees with it;
/// else, with `--recover-store rebuild`, a new one and records rebuilt from the agent
/// folders; else the refusal, before anything is killed or written.
fn trusted_store(
    opened: std::result::Result<Store, String>,
    rebuilding: bool,
    (store_dir, specs_dir, agents_dir): (&Path, &Path, &Path),
    os: &dyn Os,
    (children, exits): (&[KeptChild], &[KeptExit]),
) -> Result<(Store, Vec<AgentRecord>, Option<Rebuilt>)> {
    // Only the keeper's word counts: it talks to agentd's user alone. A process that
    // carries an agent folder in its environment proves nothing: anyone can set one.
    let ticks = os.proc_units().0.max(1) as f64;
    let mut running = BTreeMap::<String, f64>::new();
    for child in children {
        let at = child.start_ticks.map_or(f64::MAX, |t| t as f64 / ticks);
        let earliest = running.entry(child.agent_id.clone()).or_insert(at);
        *earliest = earliest.min(at);
    }
    let mut records = Vec::new();
    let (history, problem) = match &opened {
        Ok(store) => {
            records = store.load_agents()?;
            (store.history()?, None)
        }
        Err(problem) => (StoreHistory::default(), Some(problem)),
    };
    let evidence = trust::Evidence {
        records: &records,
        history,
        stamp: Store::stamped_generation(store_dir),
        folders: trust::agent_folders(agents_dir),
        running,
        exited: exits.iter().map(|exit| exit.agent_id.clone()).collect(),
        recorded: children
            .iter()
            .filter(|child| child.recorded)
            .map(|child| child.agent_id.clone())
            .collect(),
    };
    let reasons = match problem {
        Some(problem) => vec![format!("sled cannot read it ({problem})")],
        None => trust::judge(&evidence).unwrap_or_default(),
    };
    if let (Ok(store), true) = (&opened, reasons.is_empty()) {
        if rebuilding {
            tracing::warn!(
                "the agent store agrees with the agents found: it is used as it is, and \
                 --recover-store is ignored"
            );
        }
        rebuild::write_missing_specs(specs_dir, &records);
        return Ok((store.clone(), records, None));
    }
    let findings = trust::findings(store_dir, &reasons, &evidence);
    if !rebuilding {
        return Err(Error::StoreDistrusted {
            report: trust::refusal(store_dir, &findings),
        });
    }
    // sled lets go of the old files; they move aside with their folder.
    drop(opened);
    let aside = rebuild::move_aside(store_dir)?;
    tracing::error!(
        "{findings}. --recover-store rebuild: the store was moved aside to `{}`; records are \
         rebuilt from the agent folders and the keeper",
        aside.as_deref().unwrap_or(store_dir).display()
    );
    let store = Store::open(store_dir)?;
    let mut rebuilt = rebuild::rebuild(specs_dir, agents_dir);
    rebuilt.aside = aside;
    let records = std::mem::take(&mut rebuilt.records);
    Ok((store, records, Some(rebuilt)))
}

/// Locks the data folder for this daemon, or says another one runs there.
fn lock_data_dir(data_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("agentd.lock");
    let failed = |source| Error::Setup {
        what: format!("locking `{}`", path.display()),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(failed)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => Error::Setup {
            what: format!(
                "another agentd runs on the data folder `{}` (it holds `{}`)",
                data_dir.display(),
                path.display()
            ),
            source: std::io::Error::from(errno),
        },
        errno => failed(std::io::Error::from(errno)),
    })
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

pub(crate) struct SupervisorTask {
    os: Arc<dyn Os>,
    recorder: Arc<dyn Recorder>,
    store: Store,
    events: EventBus,
    /// `DATA/agentd.lock`, held while the daemon runs: one daemon per data folder.
    _data_lock: nix::fcntl::Flock<std::fs::File>,
    agents_dir: PathBuf,
    /// Every agent's spec, for a rebuild of the records (`rebuild.rs`).
    specs_dir: PathBuf,
    /// Removed agents' folders wait here to be deleted.
    trash_dir: PathBuf,
    /// A blocking thread is deleting the trash.
    trash_emptying: Arc<AtomicBool>,
    table: AgentTable,
    /// Every machine's deadline, so the loop sleeps until the first.
    deadlines: BTreeSet<(Instant, String)>,
    /// Everyone waiting for a stop under way, by agent.
    stop_waiters: HashMap<String, Vec<oneshot::Sender<StopReport>>>,
    /// Everyone waiting for an agent to run again after a restart they asked for.
    restart_waiters: HashMap<String, Vec<oneshot::Sender<Result<AgentStatus>>>>,
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

impl SupervisorTask {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut sigchld: tokio::signal::unix::Signal,
        mut adopted_exits: mpsc::UnboundedReceiver<String>,
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
                Some(agent_id) = adopted_exits.recv() => self.leader_exited(&agent_id, None),
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
                let now = Instant::now();
                let _ = reply.send(self.table.get(&agent_id).map(|m| m.status(now)));
            }
            Command::List(filter, reply) => {
                let _ = reply.send(self.table.list(&filter, Instant::now()));
            }
            Command::Stop(target, options, reply) => self.stop(target, options, reply),
            Command::History(agent_id, since, reply) => {
                let _ = reply.send(self.history(&agent_id, since));
            }
            Command::Summary(reply) => {
                let mut summary = self.table.summary(&self.limits, self.records_set_aside);
                (summary.containment, summary.containment_detail) = self.os.containment();
                summary.store_bytes = self.store.size_on_disk();
                let _ = reply.send(summary);
            }
            Command::Pause(agent_ids, pause, reply) => {
                let _ = reply.send(self.pause(&agent_ids, pause));
            }
            Command::Restart(agent_ids, reply) => self.restart(agent_ids, reply),
            Command::Reap(reply) => {
                let _ = reply.send(self.reap());
            }
            Command::Watch(watch, reply) => {
                let now = Instant::now();
                let statuses: Vec<AgentStatus> = if watch.include_snapshot {
                    self.table
                        .machines()
                        .map(|machine| machine.status(now))
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
            Command::SampleTargets(known, reply) => {
                let generation = self.targets_generation;
                let _ = reply.send(sampler::RoundStart {
                    targets: (known != Some(generation))
                        .then(|| (generation, self.table.sample_targets())),
                    watched: self.events.watched(),
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
            Command::Fatal(problem) => self.failure = Some(problem),
            Command::Traced(span, command) => {
                let _entered = span.enter();
                self.handle(*command);
            }
        }
    }

    /// The moment an input happens.
    fn now(&self) -> Now {
        // Each `RandomState` is keyed afresh: its hash of nothing is a random draw.
        let unit = (RandomState::new().build_hasher().finish() >> 11) as f64 / (1u64 << 53) as f64;
        Now {
            mono: Instant::now(),
            wall: SystemTime::now(),
            jitter: 2.0 * unit - 1.0,
            shutting_down: self.shutting_down,
        }
    }

    /// Feeds one input to an agent's machine, keeps its deadline in the timer set, and
    /// carries out the effects. `None` when there is no such agent.
    fn input<R>(
        &mut self,
        agent_id: &str,
        input: impl FnOnce(&mut AgentMachine, Now, &mut Vec<Effect>) -> R,
    ) -> Option<R> {
        let now = self.now();
        let machine = self.table.get_mut(agent_id)?;
        let before = machine.deadline();
        let sampled_as = (machine.leader_alive(), machine.record().pid);
        let mut effects = Vec::new();
        let result = input(machine, now, &mut effects);
        let after = machine.deadline();
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
        if before != after {
            if let Some(at) = before {
                self.deadlines.remove(&(at, agent_id.to_string()));
            }
            if let Some(at) = after {
                self.deadlines.insert((at, agent_id.to_string()));
            }
        }
        self.carry_out(agent_id, now, effects);
        Some(result)
    }

    fn carry_out(&mut self, agent_id: &str, now: Now, effects: Vec<Effect>) {
        for effect in effects {
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
                        continue;
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
                        continue;
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
                    self.stop_followers(agent_id);
                }
                Effect::RunEnded(reason) => {
                    self.recorder.run_ended(reason);
                    // Between runs nothing runs: the series says so until the next one's
                    // first sample, instead of repeating the last one across the gap.
                    if let Some(history) = self.histories.get_mut(agent_id) {
                        history.record(HistoryPoint::ended(now.wall), self.history_capacity);
                    }
                }
                Effect::Launch => {
                    self.recorder.restarted();
                    self.launch(agent_id);
                }
            }
        }
    }

    /// Starts (again) the process of an agent whose machine is starting.
    fn launch(&mut self, agent_id: &str) {
        let Ok(machine) = self.table.get(agent_id) else {
            return;
        };
        let record = machine.record();
        if record.spec.run_as.is_some()
            && let Err(error) = self.open_for_other_users()
        {
            tracing::warn!(%agent_id, %error, "restarting an agent that runs as another user");
        }
        let span = self.traces.relaunching(agent_id);
        let _entered = span.enter();
        let launched = {
            let _exec = exec_span(agent_id);
            AgentFiles::reopen(&record.agent_dir).launch(record, &self.base_env, self.os.as_ref())
        };
        // A failed restart is the machine's to handle; nobody waits for the error.
        let error = self
            .launched(agent_id, launched)
            .err()
            .map(|e| e.to_string());
        trace::launched(&span, error.as_deref());
    }

    /// Feeds a launch's result to the machine; answers with the error, if it failed.
    fn launched(&mut self, agent_id: &str, launched: Result<os::Started>) -> Result<()> {
        match launched {
            Ok(started) => {
                let request_id = self
                    .table
                    .get(agent_id)
                    .map(|m| m.record().spec.request_id.clone())
                    .unwrap_or_default();
                self.table.child_started(agent_id, started.pid, &request_id);
                let launched = Launched {
                    pid: started.pid,
                    start_ticks: started.start_ticks,
                    containment: match started.cgroup {
                        Some(_) => self.os.containment().0,
                        None => cgroup::Containment::ProcessGroup,
                    },
                    cgroup: started.cgroup,
                    limit_fallbacks: started.fallbacks,
                };
                self.input(agent_id, |m, now, out| m.started(now, launched, out));
                let _ = self.acks.send(Ack::Recorded(started.pid));
                // The first reading at once, so status right after Spawn is not all zeros.
                if let Some(stat) = self.os.proc_stat(started.pid) {
                    let sample = TreeSample {
                        leader_status: os::state_name(stat.state),
                        cpu_percent: 0.0,
                        memory_bytes: stat.rss_pages * self.page_size,
                        num_threads: stat.num_threads,
                        num_processes: 1,
                        cpu_seconds: 0.0,
                    };
                    self.input(agent_id, |m, _, out| m.sampled(sample, out));
                }
                if let Ok(machine) = self.table.get(agent_id) {
                    let status = machine.status(Instant::now());
                    self.answer_restart(agent_id, || Ok(status.clone()));
                }
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                let why = format!("it could not start again: {message}");
                self.answer_restart(agent_id, || {
                    Err(Error::CannotRestart {
                        id: agent_id.to_string(),
                        why: why.clone(),
                    })
                });
                if let Ok(machine) = self.table.get(agent_id) {
                    let record = machine.record();
                    let owner = record.spec.run_as.as_ref().map(|user| (user.uid, user.gid));
                    let options = files::no_follow()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .clone();
                    let _ = files::open_for_writing(
                        &options,
                        &record.agent_dir.join("error.log"),
                        owner,
                    )
                    .and_then(|mut log| std::io::Write::write_all(&mut log, message.as_bytes()));
                }
                self.input(agent_id, |m, now, out| m.start_failed(now, message, out));
                Err(error)
            }
        }
    }

    fn spawn(&mut self, mut request: SpawnRequest) -> Result<AgentStatus> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        let now = Instant::now();
        if let Some(agent_id) = self.table.by_request(&request.request_id) {
            return self.table.get(agent_id).map(|m| m.status(now));
        }
        if request.agent_id.is_empty() {
            request.agent_id = self.generate_id();
        }
        let (spec, prompt) = request.validate()?;
        self.os.check_spec(&spec)?;
        if let Some(run_as) = &spec.run_as {
            check_user_allowed(&spec.agent_id, run_as, &self.allow_users)?;
        }
        // An id whose earlier spawn never started a process may be tried again.
        if self
            .table
            .get(&spec.agent_id)
            .is_ok_and(|m| m.record().pid.is_some())
        {
            return Err(Error::AlreadyExists { id: spec.agent_id });
        }
        self.table.admit(&spec, &self.limits)?;
        let agent_id = spec.agent_id.clone();
        let agent_dir = self.agents_dir.join(&agent_id);
        let owner = spec.run_as.as_ref().map(|run_as| (run_as.uid, run_as.gid));
        if owner.is_some() {
            // Another user must be able to reach its folder, though not list the others.
            self.open_for_other_users()?;
        }
        let files = {
            let _folder =
                tracing::info_span!(target: trace::TARGET, "agentd.spawn.folder").entered();
            AgentFiles::prepare(&agent_id, &agent_dir, &prompt, owner)?
        };
        // What a rebuild of the record starts from, should the store be lost.
        rebuild::write_spec(&self.specs_dir, &spec)?;
        let record = AgentRecord::new(Arc::new(spec), agent_dir, SystemTime::now());
        let machine = AgentMachine::starting(record, self.now());
        // The STARTING record reaches the disk before the process exists.
        self.store.put(machine.record())?;
        let launched = {
            let _exec = exec_span(&agent_id);
            files.launch(machine.record(), &self.base_env, self.os.as_ref())
        };
        self.table.insert(machine);
        self.spawns = (
            self.spawns.0.saturating_add(1),
            self.spawns.1.saturating_add(1),
        );
        self.launched(&agent_id, launched)?;
        self.table.get(&agent_id).map(|m| m.status(Instant::now()))
    }

    /// Lets other users traverse (not list or read) the data folder and `agents/`, so an
    /// agent that runs as another user reaches its own folder. Everything else in the data
    /// folder stays private (the store is 0700, the sockets and logs 0600).
    fn open_for_other_users(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(data_dir) = self.agents_dir.parent() else {
            return Ok(());
        };
        for dir in [data_dir, self.agents_dir.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(
                |source| Error::Setup {
                    what: format!(
                        "letting agents that run as other users reach `{}`",
                        dir.display()
                    ),
                    source,
                },
            )?;
        }
        Ok(())
    }

    fn generate_id(&mut self) -> String {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        loop {
            self.ids_generated += 1;
            let id = format!("agent-{millis:x}-{}", self.ids_generated);
            if !self.table.contains(&id) {
                return id;
            }
        }
    }

    fn on_deadlines(&mut self) {
        let now = Instant::now();
        while let Some((at, agent_id)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.remove(&(at, agent_id.clone()));
            self.input(&agent_id, |m, now, out| m.timeout(now, out));
        }
    }

    /// Reaps every exited child of agentd: the keeper, and the agents it leaves to agentd
    /// should it die (their exits are recorded); anything else is dropped.
    fn reap(&mut self) -> ReapReport {
        let mut report = ReapReport::default();
        while let Some((pid, exit)) = self.os.reap_one() {
            match self.table.take_child(pid) {
                Some(agent_id) => {
                    self.leader_exited(&agent_id, Some(exit));
                    report.agent_ids.push(agent_id);
                }
                None => report.orphans_reaped += 1,
            }
        }
        report
    }

    /// The leader exited; `exit` is `None` for an agent watched through a pidfd, whose
    /// status only its real parent could read.
    fn leader_exited(&mut self, agent_id: &str, exit: Option<Exit>) {
        let Some(record) = self.table.get(agent_id).ok().map(AgentMachine::record) else {
            return;
        };
        let Some(hold) = record.hold() else {
            return;
        };
        // One read of `cgroup.events`; or usually one `kill(-pgid, 0)` that finds nothing,
        // and a scan only when the group lives on.
        let group_alive = self.os.group_alive(hold);
        let oom_killed = hold.cgroup.is_some_and(|cgroup| self.os.oom_killed(cgroup));
        self.input(agent_id, |m, now, out| {
            m.leader_exited(now, exit, group_alive, oom_killed, out);
        });
    }

    /// Starts or ends the inotify watch on an agent's `cgroup.events`. A cgroup that is
    /// already empty when the watch starts is reported at once.
    fn watch_cgroup(&mut self, agent_id: &str, cgroup: &Path, watch: bool) {
        let watched = self
            .cgroups_watched
            .iter()
            .find(|(_, id)| id.as_str() == agent_id)
            .map(|(wd, _)| *wd);
        match (watched, watch) {
            (Some(wd), false) => {
                self.cgroups_watched.remove(&wd);
                self.cgroup_watch.remove(wd);
            }
            (None, true) => {
                let added = self
                    .os
                    .cgroup_events(cgroup)
                    .map(|events| self.cgroup_watch.add(&events));
                match added {
                    Some(Ok(wd)) => {
                        self.cgroups_watched.insert(wd, agent_id.to_string());
                    }
                    Some(Err(error)) => {
                        tracing::debug!(%agent_id, %error, "cgroup gone before it was watched");
                    }
                    None => {}
                }
                self.cgroups_changed(Vec::new());
            }
            _ => {}
        }
    }

    /// Some watched `cgroup.events` changed: the stops whose cgroup is empty are over.
    /// Every watched cgroup is checked (one small read each): an empty `changed` asks
    /// for that too.
    fn cgroups_changed(&mut self, changed: Vec<os::WatchDescriptor>) {
        self.strays_changed(&changed);
        let candidates: Vec<String> = if changed.is_empty() {
            self.cgroups_watched.values().cloned().collect()
        } else {
            changed
                .iter()
                .filter_map(|wd| self.cgroups_watched.get(wd).cloned())
                .collect()
        };
        for agent_id in candidates {
            let empty = self
                .table
                .get(&agent_id)
                .ok()
                .and_then(|m| m.record().hold())
                .is_none_or(|hold| !self.os.group_alive(hold));
            if empty {
                self.input(&agent_id, |m, now, out| m.group_gone(now, out));
                self.remove_cgroup_if_empty(&agent_id);
            }
        }
    }

    /// An agent that ended for good gives its cgroup back once no process is left in it.
    fn remove_cgroup_if_empty(&mut self, agent_id: &str) {
        let Ok(machine) = self.table.get(agent_id) else {
            return;
        };
        let record = machine.record();
        if let (true, Some(cgroup)) = (machine.has_ended(), &record.cgroup)
            && !record.hold().is_some_and(|hold| self.os.group_alive(hold))
            && let Err(error) = self.os.remove_cgroup(cgroup)
        {
            tracing::warn!(%agent_id, %error, cgroup = %cgroup.display(), "removing the agent's cgroup");
        }
    }

    /// A cgroup under agentd's root that no running agent owns: its processes were killed,
    /// and it is removed once empty.
    fn watch_stray(&mut self, cgroup: PathBuf) {
        let Some(events) = self.os.cgroup_events(&cgroup) else {
            return;
        };
        // An error: it is already gone.
        if let Ok(wd) = self.cgroup_watch.add(&events) {
            self.strays.insert(wd, cgroup);
            self.strays_changed(&[wd]);
        }
    }

    fn strays_changed(&mut self, changed: &[os::WatchDescriptor]) {
        for wd in changed {
            let Some(cgroup) = self.strays.get(wd) else {
                continue;
            };
            // Strays exist only with cgroups, so the cgroup answers; there is no leader.
            let hold = os::Hold {
                pgid: 0,
                cgroup: Some(cgroup),
            };
            if !self.os.group_alive(hold) {
                if let Err(error) = self.os.remove_cgroup(cgroup) {
                    tracing::warn!(cgroup = %cgroup.display(), %error, "removing a stray cgroup");
                }
                self.cgroup_watch.remove(*wd);
                self.strays.remove(wd);
            }
        }
    }

    /// Pauses or resumes agents, all or none.
    fn pause(&mut self, agent_ids: &[String], pause: bool) -> Result<Vec<AgentStatus>> {
        if agent_ids.is_empty() {
            return Err(Error::Invalid {
                field: "agent_ids",
                problem: "name at least one agent".into(),
            });
        }
        for agent_id in agent_ids {
            check_id("agent_ids", agent_id)?;
            let record = self.table.get(agent_id)?.record();
            if !matches!(record.state, AgentState::Running | AgentState::Paused) {
                return Err(Error::NotRunning {
                    id: agent_id.clone(),
                    state: record.state,
                });
            }
        }
        let mut statuses = Vec::with_capacity(agent_ids.len());
        for agent_id in agent_ids {
            let done = self.input(agent_id, |m, now, out| {
                if pause {
                    m.pause(now, out)
                } else {
                    m.resume(now, out)
                }
            });
            if let Some(Err(state)) = done {
                return Err(Error::NotRunning {
                    id: agent_id.clone(),
                    state,
                });
            }
            statuses.push(self.table.get(agent_id)?.status(Instant::now()));
        }
        Ok(statuses)
    }

    /// Checks, on a blocking thread, the groups of stops whose leader is gone.
    fn check_groups(&mut self) {
        let groups: Vec<(String, i32)> = self
            .groups_watched
            .iter()
            .filter_map(|id| Some((id.clone(), self.table.get(id).ok()?.record().pid?)))
            .collect();
        let Some(commands) = self.commands.upgrade() else {
            return;
        };
        self.group_check_running = true;
        let os = self.os.clone();
        tokio::task::spawn_blocking(move || {
            let pgids: Vec<i32> = groups.iter().map(|(_, pgid)| *pgid).collect();
            let live = os.live_groups(&pgids);
            let gone = groups
                .into_iter()
                .filter(|(_, pgid)| !live.contains(pgid))
                .collect();
            let _ = commands.blocking_send(Command::GroupsGone(gone));
        });
    }

    /// Restarts agents, all or none: each must exist and be in a state to restart, and those
    /// that ended must fit in the daemon's capacity again. `reply` gets their statuses once
    /// every one runs again.
    fn restart(
        &mut self,
        agent_ids: Vec<String>,
        reply: oneshot::Sender<Result<Vec<AgentStatus>>>,
    ) {
        if let Err(error) = self.check_restart(&agent_ids) {
            let _ = reply.send(Err(error));
            return;
        }
        let mut running_again = Vec::with_capacity(agent_ids.len());
        for agent_id in &agent_ids {
            let (waiter, status) = oneshot::channel();
            self.restart_waiters
                .entry(agent_id.clone())
                .or_default()
                .push(waiter);
            running_again.push(status);
            self.input(agent_id, |m, now, out| m.restart(now, out));
        }
        tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(running_again.len());
            for status in running_again {
                match status.await {
                    Ok(Ok(status)) => statuses.push(status),
                    Ok(Err(error)) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                    Err(_) => {
                        let _ = reply.send(Err(Error::ShuttingDown));
                        return;
                    }
                }
            }
            let _ = reply.send(Ok(statuses));
        });
    }

    fn check_restart(&self, agent_ids: &[String]) -> Result<()> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        if agent_ids.is_empty() {
            return Err(Error::Invalid {
                field: "agent_ids",
                problem: "name at least one agent".into(),
            });
        }
        let (mut returning, mut load) = (0, 0.0);
        for agent_id in agent_ids {
            check_id("agent_ids", agent_id)?;
            let machine = self.table.get(agent_id)?;
            if let Some(why) = machine.restart_blocked() {
                return Err(Error::CannotRestart {
                    id: agent_id.clone(),
                    why: why.into(),
                });
            }
            let record = machine.record();
            if !record.state.holds_capacity() {
                returning += 1;
                load += record.spec.load_percentage;
            }
        }
        self.table.has_room(returning, load, &self.limits)
    }

    /// Answers everyone waiting for this agent to run again.
    fn answer_restart(&mut self, agent_id: &str, answer: impl Fn() -> Result<AgentStatus>) {
        for waiter in self.restart_waiters.remove(agent_id).unwrap_or_default() {
            let _ = waiter.send(answer());
        }
    }

    /// Starts stopping an agent, or joins a stop under way; the receiver gets the report.
    fn begin_stop(
        &mut self,
        agent_id: &str,
        force: bool,
        reason: StopReason,
    ) -> oneshot::Receiver<StopReport> {
        let (waiter, report) = oneshot::channel();
        let Ok(machine) = self.table.get(agent_id) else {
            return report;
        };
        // Members of an ended run's group are stopped too, if there are any left.
        if !machine.leader_alive()
            && machine.may_linger()
            && !machine.watches_group()
            && machine
                .record()
                .hold()
                .is_none_or(|hold| !self.os.group_alive(hold))
        {
            self.input(agent_id, |m, now, out| m.group_gone(now, out));
        }
        self.stop_waiters
            .entry(agent_id.to_string())
            .or_default()
            .push(waiter);
        let pending = self.input(agent_id, |m, now, out| m.stop(now, force, reason, out));
        if pending != Some(true)
            && let Some(waiter) = self
                .stop_waiters
                .get_mut(agent_id)
                .and_then(|waiters| waiters.pop())
            && let Ok(machine) = self.table.get(agent_id)
        {
            let _ = waiter.send(StopReport {
                agent_id: agent_id.to_string(),
                outcome: StopOutcome::AlreadyExited,
                duration: Duration::ZERO,
                status: machine.status(Instant::now()),
            });
        }
        report
    }

    /// The agent ended for good: children that asked to follow their parent are stopped.
    fn stop_followers(&mut self, agent_id: &str) {
        let followers = self.table.ids_where(|child| {
            let spec = &child.record().spec;
            spec.parent_agent_id == agent_id
                && spec.lifecycle.on_parent_exit == ParentExit::Stop
                && (child.leader_alive() || child.record().state == AgentState::BackingOff)
        });
        for child in followers {
            tracing::info!(agent_id = %child, parent = %agent_id, "stopping: its parent ended");
            drop(self.begin_stop(&child, false, StopReason::ParentExited));
        }
    }

    fn stop(
        &mut self,
        target: StopTarget,
        options: StopOptions,
        reply: oneshot::Sender<Result<Vec<StopReport>>>,
    ) {
        let agent_ids: Vec<String> = match target {
            StopTarget::All => self.table.ids().cloned().collect(),
            StopTarget::Agents(ids) if ids.is_empty() => {
                let _ = reply.send(Err(Error::Invalid {
                    field: "agent_ids",
                    problem: "name at least one agent, or stop all".into(),
                }));
                return;
            }
            StopTarget::Agents(ids) => ids,
        };
        if let Some(unknown) = agent_ids.iter().find(|id| !self.table.contains(id)) {
            let error = match check_id("agent_ids", unknown) {
                Err(error) => error,
                Ok(()) => Error::NotFound {
                    id: unknown.clone(),
                },
            };
            let _ = reply.send(Err(error));
            return;
        }
        if options.cascade {
            match self.stop_cascade(agent_ids, options.force) {
                Some(cascade) => {
                    tokio::spawn(async move {
                        let _ = reply.send(Ok(cascade.await));
                    });
                }
                None => {
                    let _ = reply.send(Err(Error::ShuttingDown));
                }
            }
            return;
        }
        let pending: Vec<_> = agent_ids
            .iter()
            .map(|id| self.begin_stop(id, options.force, StopReason::Requested))
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

    /// Stops `roots` and all their descendants, children before parents, branches at once.
    fn stop_cascade(
        &self,
        roots: Vec<String>,
        force: bool,
    ) -> Option<Pin<Box<dyn Future<Output = Vec<StopReport>> + Send>>> {
        let handle = SupervisorHandle {
            commands: self.commands.upgrade()?,
            store: self.store.clone(),
        };
        let children = Arc::new(self.table.children());
        // A root that is inside another root's tree is stopped as part of it.
        let covered: BTreeSet<String> = roots
            .iter()
            .flat_map(|root| {
                self.table
                    .subtree(root)
                    .into_iter()
                    .filter(move |id| id != root)
            })
            .collect();
        let roots: Vec<String> = roots.into_iter().filter(|r| !covered.contains(r)).collect();
        let span = tracing::Span::current();
        Some(Box::pin(async move {
            let mut trees = tokio::task::JoinSet::new();
            for root in roots {
                let tree = stop_subtree(handle.clone(), root, children.clone(), force);
                trees.spawn(tree.instrument(span.clone()));
            }
            let mut reports = Vec::new();
            while let Some(done) = trees.join_next().await {
                reports.extend(done.unwrap_or_default());
            }
            reports
        }))
    }

    fn shutdown(&mut self, reply: oneshot::Sender<()>) {
        self.shutting_down = true;
        let live = self.table.ids_where(|m| {
            m.leader_alive() || m.may_linger() || m.record().state == AgentState::BackingOff
        });
        let pending: Vec<_> = match self.limits.on_shutdown {
            ShutdownPolicy::Stop => {
                tracing::info!(agents = live.len(), "shutting down: stopping every agent");
                live.iter()
                    .map(|id| self.begin_stop(id, false, StopReason::Shutdown))
                    .collect()
            }
            ShutdownPolicy::Detach => {
                tracing::info!(
                    agents = live.len(),
                    "shutting down: leaving agents running for the next agentd to adopt"
                );
                Vec::new()
            }
        };
        // Agents that ended earlier and whose cgroup emptied since give it back now.
        for agent_id in self.table.ids_where(|m| m.has_ended()) {
            self.remove_cgroup_if_empty(&agent_id);
        }
        let store = self.store.clone();
        let acks = self.acks.clone();
        let os = self.os.clone();
        tokio::spawn(async move {
            for report in pending {
                let _ = report.await;
            }
            // Each stopped agent gave its cgroup back; the root goes too if nothing is left.
            os.remove_cgroup_root();
            if let Err(error) = store.flush().await {
                tracing::error!(%error, "flushing the store at shutdown");
            }
            // The keeper forgets the exits it reported, and exits once it keeps nothing.
            let (drained, done) = oneshot::channel();
            if acks.send(Ack::Drain(drained)).is_ok() {
                let _ = done.await;
            }
            let _ = reply.send(());
        });
    }

    /// A sampler batch: new samples (each a HEALTH event), progress from status files (each
    /// a heartbeat), every health check of every running agent, then retention.
    fn samples(&mut self, batch: SampleBatch) {
        self.recorder.sampled(batch.took);
        let at = SystemTime::now();
        for (agent_id, sample) in batch.samples {
            let point = HistoryPoint::new(at, &sample);
            let kept = self.input(&agent_id, |m, _, out| {
                let alive = m.leader_alive();
                m.sampled(sample, out);
                alive
            });
            if kept == Some(true) && self.history_capacity > 0 {
                self.histories
                    .entry(agent_id)
                    .or_default()
                    .record(point, self.history_capacity);
            }
        }
        for (agent_id, progress) in batch.progress {
            self.input(&agent_id, |m, now, out| {
                let update = |record: &mut AgentRecord| {
                    let changed = record.progress != progress.progress
                        || record.progress_message != progress.message;
                    record.progress = progress.progress;
                    record.progress_message = progress.message;
                    changed
                };
                m.heartbeat(now, update, out);
            });
        }
        let checked = self.table.ids_where(|m| {
            m.leader_alive() && m.record().spec.health_policy != HealthPolicy::default()
        });
        for agent_id in checked {
            self.input(&agent_id, |m, now, out| m.check_health(now, out));
        }
        self.apply_retention();
        self.trim_after_spawn_burst();
    }

    fn history(&self, agent_id: &str, since: Option<SystemTime>) -> Result<AgentHistory> {
        if self.history_capacity == 0 {
            return Err(Error::HistoryOff);
        }
        let machine = self.table.get(agent_id)?;
        let now = SystemTime::now();
        let window = self.history_window;
        let oldest = now.checked_sub(window).unwrap_or(UNIX_EPOCH);
        let from = since.map_or(oldest, |since| since.max(oldest));
        let until = match machine.leader_alive() {
            true => now,
            false => machine.record().ended_at.unwrap_or(now),
        };
        let points = self
            .histories
            .get(agent_id)
            .map_or_else(Vec::new, |history| {
                history.read(from, until, self.sample_interval)
            });
        Ok(AgentHistory {
            interval: self.sample_interval,
            window,
            points,
        })
    }

    /// Once a burst of spawns is over (none since the last sample), hands the heap it left
    /// free back to the kernel: the burst's transient allocations otherwise stay resident
    /// (10,000 agents spawned 8 at a time left 85 MB of heap, 33 MB of it in use).
    fn trim_after_spawn_burst(&mut self) {
        const BURST: u32 = 1000;
        let (since_trim, in_interval) = self.spawns;
        if since_trim >= BURST && in_interval == 0 {
            os::release_free_memory();
            self.spawns = (0, 0);
        } else {
            self.spawns.1 = 0;
        }
    }

    /// A heartbeat from the ReportProgress RPC.
    fn report_progress(&mut self, report: ProgressReport) -> Result<AgentStatus> {
        report.validate()?;
        let machine = self.table.get(&report.agent_id)?;
        if !machine.leader_alive() {
            return Err(Error::NotRunning {
                id: report.agent_id,
                state: machine.record().state,
            });
        }
        let agent_id = report.agent_id.clone();
        self.input(&agent_id, |m, now, out| {
            let update = |record: &mut AgentRecord| {
                let carries = report.progress.is_some()
                    || !report.message.is_empty()
                    || !report.details.is_empty();
                if !carries {
                    return false;
                }
                let changed = report.progress.is_some_and(|p| p != record.progress)
                    || report.message != record.progress_message
                    || report.details != record.progress_details;
                record.progress = report.progress.unwrap_or(record.progress);
                record.progress_message = report.message;
                record.progress_details = report.details;
                changed
            };
            m.heartbeat(now, update, out);
        });
        self.table.get(&agent_id).map(|m| m.status(Instant::now()))
    }

    /// Deletes the agent's record, folder and output, if it has ended for good.
    fn remove(&mut self, agent_id: &str) -> Result<AgentStatus> {
        let machine = self.table.get(agent_id)?;
        let lingering = machine.may_linger()
            && machine
                .record()
                .hold()
                .is_some_and(|hold| self.os.group_alive(hold));
        if !machine.has_ended() || lingering {
            return Err(Error::NotFinished {
                id: agent_id.to_string(),
                state: machine.record().state,
            });
        }
        let status = machine.status(Instant::now());
        if let Some(cgroup) = &machine.record().cgroup
            && let Err(error) = self.os.remove_cgroup(cgroup)
        {
            tracing::warn!(%agent_id, %error, "removing the agent's cgroup");
        }
        self.store.remove_agent(agent_id)?;
        rebuild::remove_spec(&self.specs_dir, agent_id);
        self.events
            .emit(EventKind::Removed, String::new(), None, || status.clone());
        self.histories.remove(agent_id);
        if let Some(machine) = self.table.remove(agent_id) {
            // The folder moves out of `agents/` at once, so the id can be spawned again right
            // away; deleting a large output can take a while, so that is off the task.
            let dir = &machine.record().agent_dir;
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let trash = self.trash_dir.join(format!("{agent_id}-{nanos}"));
            match std::fs::rename(dir, &trash) {
                Ok(()) => self.empty_trash(),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "moving a removed agent's folder away");
                }
            }
        }
        tracing::info!(%agent_id, "removed");
        Ok(status)
    }

    /// Deletes the folders in the trash on one blocking thread, never more: retention may
    /// remove a thousand agents in one turn, and a thread each would leave agentd holding
    /// their stacks and malloc arenas.
    fn empty_trash(&mut self) {
        if self.trash_emptying.swap(true, Ordering::SeqCst) {
            return;
        }
        let (trash_dir, emptying) = (self.trash_dir.clone(), self.trash_emptying.clone());
        tokio::task::spawn_blocking(move || {
            loop {
                for entry in std::fs::read_dir(&trash_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = entry.path();
                    if let Err(error) = std::fs::remove_dir_all(&path) {
                        tracing::warn!(dir = %path.display(), %error, "deleting a removed agent's folder");
                    }
                }
                emptying.store(false, Ordering::SeqCst);
                // A folder moved in after the last listing is deleted now, unless a new
                // round already started for it.
                let more = std::fs::read_dir(&trash_dir).is_ok_and(|mut d| d.next().is_some());
                if !more || emptying.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    /// Removes the agents that ended for good longest ago, beyond the count limit or past
    /// the age limit.
    fn apply_retention(&mut self) {
        let retention = self.finished_retention;
        let mut finished: Vec<(SystemTime, String)> = self
            .table
            .machines()
            .filter(|m| m.has_ended())
            .map(|m| {
                let record = m.record();
                let ended = record.ended_at.unwrap_or(UNIX_EPOCH);
                (ended, record.spec.agent_id.clone())
            })
            .collect();
        let Some(oldest_allowed) = SystemTime::now().checked_sub(retention.max_age) else {
            return;
        };
        finished.sort();
        let over = finished.len().saturating_sub(retention.max_count);
        let expired: Vec<String> = finished
            .into_iter()
            .enumerate()
            .filter(|(index, (ended, _))| *index < over || *ended < oldest_allowed)
            .map(|(_, (_, agent_id))| agent_id)
            .collect();
        let mut removed = 0;
        for agent_id in expired {
            match self.remove(&agent_id) {
                Ok(_) => {
                    removed += 1;
                    tracing::info!(%agent_id, "removed by retention");
                }
                Err(Error::NotFinished { .. }) => {}
                Err(error) => tracing::warn!(%agent_id, %error, "retention could not remove"),
            }
        }
        if removed > 0 {
            os::release_free_memory();
        }
    }

    /// Loads every stored agent and learns what became of it while agentd was away.
    /// `records`: the store's, or rebuilt from the agent folders (`rebuilt`), in which case
    /// no process is killed for want of a record.
    fn recover(
        &mut self,
        keeper: KeeperState,
        records: Vec<AgentRecord>,
        rebuilt: Option<Rebuilt>,
    ) -> Result<()> {
        self.records_set_aside = u32::try_from(self.store.set_aside_count()).unwrap_or(u32::MAX);
        // Every agent is in the table before any effect runs: an agent that ended for good
        // stops the children that follow it, whatever their place in id order.
        let mut pending = Vec::new();
        let trusted = rebuilt.is_none();
        let recovery = recover::recover(
            records,
            self.os.as_ref(),
            &self.agents_dir,
            &keeper,
            trusted,
        );
        for stray in recovery.strays {
            self.watch_stray(stray);
        }
        for found in recovery.found {
            let agent_id = found.record.spec.agent_id.clone();
            let now = self.now();
            let mut effects = Vec::new();
            let machine = AgentMachine::recovered(found.record, found.how, now, &mut effects);
            if let Some(at) = machine.deadline() {
                self.deadlines.insert((at, agent_id.clone()));
            }
            let (pid, request_id) = (
                machine.record().pid,
                machine.record().spec.request_id.clone(),
            );
            self.table.insert(machine);
            match (found.watch, pid) {
                (ExitWatch::Keeper, Some(pid)) => {
                    self.table.child_started(&agent_id, pid, &request_id);
                    let _ = self.acks.send(Ack::Recorded(pid));
                }
                (ExitWatch::Pidfd(pidfd), _) => self.watch_adopted(agent_id.clone(), pidfd),
                _ => {}
            }
            pending.push((agent_id, now, effects));
        }
        for (agent_id, now, effects) in pending {
            self.carry_out(&agent_id, now, effects);
        }
        if let Some(rebuilt) = rebuilt {
            self.report_rebuild(&rebuilt);
        }
        Ok(())
    }

    /// Says, in one error line, what became of each agent whose record was rebuilt.
    fn report_rebuild(&self, rebuilt: &Rebuilt) {
        let mut adopted = Vec::new();
        let mut ended = Vec::new();
        let mut lost = Vec::new();
        for machine in self.table.machines() {
            let record = machine.record();
            let id = record.spec.agent_id.clone();
            match record.state {
                AgentState::Lost => lost.push(id),
                _ if machine.leader_alive() => adopted.push(id),
                _ => ended.push(format!("{id} ({})", record.state_text())),
            }
        }
        let list = |ids: &[String]| match ids.is_empty() {
            true => "none".to_string(),
            false => ids.join(", "),
        };
        tracing::error!(
            "records rebuilt after the store could not be trusted (the old store is kept at \
             `{}`): running, adopted: {}; ended while agentd was away: {}; LOST, how they \
             ended is unknown (the old store may have known, or was rolled back past it): {}; \
             folders with no spec, not rebuilt, their processes left alone: {}",
            rebuilt
                .aside
                .as_deref()
                .map_or_else(|| "nowhere".into(), |p| p.display().to_string()),
            list(&adopted),
            list(&ended),
            list(&lost),
            list(&rebuilt.without_spec),
        );
    }

    /// An adopted agent is not our child: its exit arrives through a pidfd.
    fn watch_adopted(&self, agent_id: String, pidfd: std::os::fd::OwnedFd) {
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

fn stop_subtree(
    handle: SupervisorHandle,
    root: String,
    children: Arc<HashMap<String, Vec<String>>>,
    force: bool,
) -> Pin<Box<dyn Future<Output = Vec<StopReport>> + Send>> {
    Box::pin(async move {
        let mut branches = tokio::task::JoinSet::new();
        for child in children.get(&root).into_iter().flatten() {
            let branch = stop_subtree(handle.clone(), child.clone(), children.clone(), force);
            branches.spawn(branch.instrument(tracing::Span::current()));
        }
        let mut reports = Vec::new();
        while let Some(done) = branches.join_next().await {
            reports.extend(done.unwrap_or_default());
        }
        let options = StopOptions {
            force,
            cascade: false,
        };
        match handle
            .stop(StopTarget::Agents(vec![root.clone()]), options)
            .await
        {
            Ok(own) => reports.extend(own),
            Err(error) => tracing::warn!(agent_id = %root, %error, "cascading stop"),
        }
        reports
    })
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
