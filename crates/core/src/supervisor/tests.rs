//! The whole driver on a fake OS and a hand-moved clock: real machines, a real (temporary)
//! store and event bus, agent folders in a temporary data folder; processes, signals, exits
//! and time are the test's. Each story checks what the supervisor did, in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::agent::{AgentRecord, AgentStatus};

use crate::clock::{Clock, FakeClock};
use crate::config::{Limits, SupervisorConfig};
use crate::error::Error;
use crate::events::{EventFilter, EventKind, Samples};
use crate::handle::{Command, StopTarget, Watch};
use crate::keeper::{KeptChild, KeptExit};
use crate::lifecycle::{Backoff, ParentExit, RestartPolicy};
use crate::recover::KeeperState;
use crate::spec::SpawnRequest;
use crate::state::{AgentState, Exit};
use crate::stop::{StopOptions, StopOutcome, StopReport};
use crate::store::Store;

use super::fake::{FakeOs, FakeRecorder, Log};
use super::{Parts, SupervisorTask};

struct Driver {
    task: SupervisorTask,
    os: Arc<FakeOs>,
    clock: Arc<FakeClock>,
    log: Log,
    /// Commands the task sends itself (cascading stops, group checks).
    commands: mpsc::Receiver<Command>,
    /// The keeper's answers to spawns.
    launches: mpsc::UnboundedReceiver<super::spawning::LaunchDone>,
    _commands_tx: mpsc::Sender<Command>,
    dir: tempfile::TempDir,
}

impl Driver {
    fn new() -> Driver {
        Driver::with(|_| {})
    }

    fn with(configure: impl FnOnce(&mut SupervisorConfig)) -> Driver {
        Driver::in_dir(data_dir(), Arc::new(FakeClock::new()), host(), configure)
    }

    fn in_dir(
        dir: tempfile::TempDir,
        clock: Arc<FakeClock>,
        (os, log): (Arc<FakeOs>, Log),
        configure: impl FnOnce(&mut SupervisorConfig),
    ) -> Driver {
        let mut config = SupervisorConfig::new(dir.path().to_path_buf());
        configure(&mut config);
        for folder in ["agents", "specs", "trash"] {
            std::fs::create_dir_all(dir.path().join(folder)).expect("folder");
        }
        let store = open_store(&dir.path().join("store"));
        let (commands_tx, commands) = mpsc::channel(1 << 16);
        let parts = Parts {
            os: os.clone(),
            clock: clock.clone(),
            recorder: Arc::new(FakeRecorder(log.clone())),
            store,
            data_lock: None,
            commands: commands_tx.downgrade(),
        };
        let (task, inboxes) = SupervisorTask::new(parts, &config).expect("task");
        Driver {
            task,
            os,
            clock,
            log,
            commands,
            launches: inboxes.launches,
            _commands_tx: commands_tx,
            dir,
        }
    }

    /// Sends a command and turns the world until it is answered.
    async fn call<T>(&mut self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> T {
        let answer = self.send(command);
        self.until(answer).await
    }

    /// Sends a command; its answer comes later.
    fn send<T>(
        &mut self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> oneshot::Receiver<T> {
        let (reply, answer) = oneshot::channel();
        self.task.handle(command(reply));
        answer
    }

    /// Turns the world (reaps, the task's own commands, other tasks) until `answer` comes.
    async fn until<T>(&mut self, mut answer: oneshot::Receiver<T>) -> T {
        for _ in 0..100_000 {
            if let Ok(value) = answer.try_recv() {
                return value;
            }
            self.turn();
            tokio::task::yield_now().await;
        }
        panic!("never answered; the log: {:?}", self.log.take());
    }

    /// What SIGCHLD, the keeper's answers and the task's own queue would bring.
    fn turn(&mut self) {
        self.task.reap();
        while let Ok(done) = self.launches.try_recv() {
            self.task.launch_done(done);
        }
        while let Ok(command) = self.commands.try_recv() {
            self.task.handle(command);
        }
    }

    /// Time passes: every deadline due is met.
    fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
        self.task.on_deadlines();
        self.turn();
    }

    async fn spawn(&mut self, request: SpawnRequest) -> crate::error::Result<AgentStatus> {
        self.call(|reply| Command::Spawn(Box::new(request), reply))
            .await
    }

    async fn status(&mut self, agent_id: &str) -> AgentStatus {
        let agent_id = agent_id.to_string();
        self.call(|reply| Command::Status(agent_id, reply))
            .await
            .expect("status")
    }

    fn stop(&mut self, agent_ids: &[&str], cascade: bool) -> StopAnswer {
        let (reply, answer) = oneshot::channel();
        let target = StopTarget::Agents(agent_ids.iter().map(|id| id.to_string()).collect());
        let options = StopOptions {
            force: false,
            cascade,
        };
        self.task.handle(Command::Stop(target, options, reply));
        answer
    }
}

/// The store, once an earlier task on the same folder lets go of it: a flush it started
/// (`Store::flush_soon`, a blocking task holding the store) may still hold sled's lock.
fn open_store(path: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Store::open(path) {
            Ok(store) => return store,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(error) => panic!("store: {error:?}"),
        }
    }
}

/// A fake host, and the log of what it was asked and what the supervisor recorded.
fn host() -> (Arc<FakeOs>, Log) {
    let log = Log::default();
    (Arc::new(FakeOs::new(log.clone())), log)
}

/// In memory where the host has it: a thousand agent folders on a disk cost seconds.
fn data_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    match shm.is_dir() {
        true => tempfile::tempdir_in(shm),
        false => tempfile::tempdir(),
    }
    .expect("temp dir")
}

type StopAnswer = oneshot::Receiver<crate::error::Result<Vec<StopReport>>>;

fn request(agent_id: &str) -> SpawnRequest {
    SpawnRequest {
        agent_id: agent_id.into(),
        command: vec!["agent".into()],
        ..SpawnRequest::default()
    }
}

fn lines(lines: &[&str]) -> Vec<String> {
    lines.iter().map(|line| line.to_string()).collect()
}

#[tokio::test]
async fn spawn_exit_backoff_restart_then_give_up() {
    let mut driver = Driver::new();
    let mut spawn = request("a1");
    spawn.lifecycle.restart = RestartPolicy::OnFailure;
    spawn.lifecycle.max_restarts = Some(1);
    spawn.lifecycle.backoff = Backoff {
        initial: Duration::from_secs(2),
        max: Duration::from_secs(2),
        ..Backoff::default()
    };
    let started = driver.spawn(spawn).await.expect("spawned");
    assert_eq!(started.record.state, AgentState::Running);
    assert_eq!(driver.log.take(), lines(&["spawn a1", "event Spawned"]));

    driver.os.exit("a1", Exit::Code(3));
    driver.turn();
    let backing_off = driver.status("a1").await;
    assert_eq!(backing_off.record.state, AgentState::BackingOff);
    assert_eq!(
        driver.log.take(),
        lines(&[
            "exit a1",
            "run ended Exited",
            "event Failed",
            "event Restarting"
        ])
    );

    // Not a moment early.
    driver.advance(Duration::from_millis(1999));
    assert!(driver.log.take().is_empty());
    driver.advance(Duration::from_millis(1));
    let again = driver.status("a1").await;
    assert_eq!(
        (again.record.state, again.record.restart_count),
        (AgentState::Running, 1)
    );
    assert_eq!(driver.log.take(), lines(&["spawn a1", "event Spawned"]));

    // The last restart allowed: the next failure ends it for good.
    driver.os.exit("a1", Exit::Code(3));
    driver.turn();
    let failed = driver.status("a1").await;
    assert_eq!(failed.record.state, AgentState::Failed);
    assert!(
        failed
            .record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 1 restarts")),
        "{:?}",
        failed.record.error
    );
    assert_eq!(
        driver.log.take(),
        lines(&["exit a1", "run ended Exited", "event Failed"])
    );
    assert_eq!(driver.os.live_count(), 0);
}

#[tokio::test]
async fn the_stop_ladder_climbs_for_a_stubborn_child() {
    let mut driver = Driver::new();
    let mut spawn = request("stubborn");
    spawn.first_grace = Some(Duration::from_secs(3));
    spawn.second_grace = Some(Duration::from_secs(2));
    driver.os.stubborn("stubborn");
    driver.spawn(spawn).await.expect("spawned");
    driver.log.take();

    let answer = driver.stop(&["stubborn"], false);
    driver.turn();
    assert_eq!(
        driver.log.take(),
        lines(&["event Stopping", "signal stubborn SIGTERM"])
    );
    driver.advance(Duration::from_millis(2999));
    assert!(driver.log.take().is_empty());
    driver.advance(Duration::from_millis(1));
    assert_eq!(driver.log.take(), lines(&["signal stubborn SIGTERM"]));
    driver.advance(Duration::from_secs(2));
    let reports = driver.until(answer).await.expect("stopped");
    assert_eq!(reports[0].outcome, StopOutcome::Killed);
    assert_eq!(reports[0].duration, Duration::from_secs(5));
    assert_eq!(reports[0].status.record.state, AgentState::Killed);
    assert_eq!(
        driver.log.take(),
        lines(&[
            "signal stubborn SIGKILL",
            "exit stubborn",
            "run ended Stopped",
            "event Killed",
            "stopped Killed",
        ])
    );
}

#[tokio::test]
async fn a_cascade_stops_a_tree_of_a_thousand_children_before_parents() {
    let mut driver = Driver::new();
    let ids: Vec<String> = (0..1000).map(|i| format!("n{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let mut spawn = request(id);
        if i > 0 {
            spawn.parent_agent_id = ids[(i - 1) / 2].clone();
        }
        driver.spawn(spawn).await.expect("spawned");
    }
    driver.log.take();
    let answer = driver.stop(&["n0"], true);
    let reports = driver.until(answer).await.expect("cascade");
    assert_eq!(reports.len(), 1000);
    assert!(
        reports
            .iter()
            .all(|r| r.outcome == StopOutcome::ExitedOnFirstSignal)
    );
    assert_eq!(driver.os.live_count(), 0);
    let log = driver.log.take();
    let at = |line: String| log.iter().position(|l| *l == line).expect(&line);
    for (i, id) in ids.iter().enumerate().skip(1) {
        let parent = &ids[(i - 1) / 2];
        assert!(
            at(format!("exit {id}")) < at(format!("signal {parent} SIGTERM")),
            "{parent} was signalled before its child {id} was gone"
        );
    }
}

#[tokio::test]
async fn followers_stop_when_their_parent_ends() {
    let mut driver = Driver::new();
    driver.spawn(request("parent")).await.expect("parent");
    for child in ["c1", "c2"] {
        let mut spawn = request(child);
        spawn.parent_agent_id = "parent".into();
        spawn.lifecycle.on_parent_exit = ParentExit::Stop;
        driver.spawn(spawn).await.expect("child");
    }
    driver.log.take();
    driver.os.exit("parent", Exit::Code(0));
    driver.turn();
    for child in ["c1", "c2"] {
        assert_eq!(driver.status(child).await.record.state, AgentState::Killed);
    }
    // The parent's effects first, then each follower's stop, whole, in order.
    assert_eq!(
        driver.log.take(),
        lines(&[
            "exit parent",
            "run ended Exited",
            "event Exited",
            "event Stopping",
            "signal c1 SIGTERM",
            "exit c1",
            "event Stopping",
            "signal c2 SIGTERM",
            "exit c2",
            "run ended Stopped",
            "event Killed",
            "stopped ExitedOnFirstSignal",
            "run ended Stopped",
            "event Killed",
            "stopped ExitedOnFirstSignal",
        ])
    );
}

#[tokio::test]
async fn capacity_refuses_what_does_not_fit_until_room_is_made() {
    let mut driver = Driver::with(|config| {
        config.limits = Limits {
            capacity: 100.0,
            ..Limits::default()
        };
    });
    let heavy = |id: &str| SpawnRequest {
        load_percentage: 60.0,
        ..request(id)
    };
    driver.spawn(heavy("first")).await.expect("fits");
    let refused = driver.spawn(heavy("second")).await.expect_err("full");
    assert!(matches!(refused, Error::OverCapacity { .. }), "{refused}");
    // Nothing of the refused spawn remains: no process, no record, no folder.
    assert!(driver.os.pid_of("second").is_none());
    assert!(!driver.dir.path().join("agents/second").exists());
    driver.os.exit("first", Exit::Code(0));
    driver.turn();
    driver.spawn(heavy("second")).await.expect("fits now");
}

#[tokio::test]
async fn pause_freezes_and_resume_thaws() {
    let mut driver = Driver::new();
    driver.spawn(request("a1")).await.expect("spawned");
    driver.log.take();
    let ids = vec!["a1".to_string()];
    let paused = driver
        .call(|reply| Command::Pause(ids.clone(), true, reply))
        .await
        .expect("paused");
    assert_eq!(paused[0].record.state, AgentState::Paused);
    let resumed = driver
        .call(|reply| Command::Pause(ids, false, reply))
        .await
        .expect("resumed");
    assert_eq!(resumed[0].record.state, AgentState::Running);
    assert_eq!(
        driver.log.take(),
        lines(&["freeze a1", "event Paused", "thaw a1", "event Resumed"])
    );
}

#[tokio::test]
async fn a_command_that_cannot_start_fails_the_spawn_and_keeps_the_record() {
    let mut driver = Driver::new();
    driver.os.unstartable("missing");
    let refused = driver.spawn(request("missing")).await.expect_err("fails");
    assert!(matches!(refused, Error::Spawn { .. }), "{refused}");
    let status = driver.status("missing").await;
    assert_eq!(status.record.state, AgentState::Failed);
    assert_eq!(
        driver.log.take(),
        lines(&[
            "spawn missing failed",
            "run ended StartFailed",
            "event Failed"
        ])
    );
}

#[tokio::test]
async fn shutdown_stops_every_agent_then_answers() {
    let mut driver = Driver::new();
    for id in ["a1", "a2"] {
        driver.spawn(request(id)).await.expect("spawned");
    }
    driver.log.take();
    driver.call(Command::Shutdown).await;
    assert_eq!(driver.os.live_count(), 0);
    let refused = driver
        .spawn(request("late"))
        .await
        .expect_err("shutting down");
    assert!(matches!(refused, Error::ShuttingDown), "{refused}");
}

/// Every stored state, recovered by a new task: a live agent whose process the keeper
/// still runs is adopted, one whose process is gone is LOST, ended ones stay as they were,
/// and one backing off restarts when its time comes. A spawn cut short with only its STARTING
/// record on disk is adopted through the keeper, though its process wrote over its
/// environment.
#[tokio::test]
async fn recovery_from_every_stored_state() {
    let clock = Arc::new(FakeClock::new());
    let states = [
        AgentState::Starting,
        AgentState::Running,
        AgentState::Stopping,
        AgentState::Paused,
        AgentState::Completed,
        AgentState::Failed,
        AgentState::Killed,
        AgentState::Lost,
        AgentState::BackingOff,
        AgentState::TimedOut,
    ];
    let earlier = Driver::in_dir(data_dir(), clock.clone(), host(), |_| {});
    let mut records = Vec::new();
    let mut children = Vec::new();
    for (i, state) in states.iter().enumerate() {
        for alive in [true, false] {
            let id = format!("{state:?}-{}", if alive { "alive" } else { "gone" }).to_lowercase();
            let (spec, _) = request(&id).validate().expect("valid");
            let mut record = AgentRecord::new(
                Arc::new(spec),
                earlier.dir.path().join("agents").join(&id),
                clock.wall(),
            );
            std::fs::create_dir(&record.agent_dir).expect("agent folder");
            record.state = *state;
            record.started_at = Some(clock.wall());
            if state.is_live() || *state == AgentState::BackingOff {
                let (pid, ticks) = match alive {
                    true => earlier.os.running(&id),
                    false => (90_000 + i as i32, 1),
                };
                record.pid = Some(pid);
                record.start_ticks = Some(ticks);
                if alive {
                    children.push(KeptChild {
                        agent_id: id.clone(),
                        pid,
                        start_ticks: Some(ticks),
                        recorded: true,
                    });
                }
            } else {
                record.ended_at = Some(clock.wall());
            }
            if *state == AgentState::BackingOff {
                record.next_restart_at = Some(clock.wall() + Duration::from_secs(4));
            }
            earlier.task.store.put(&record).expect("stored");
            records.push(record);
        }
    }
    let answered = "answered-unmarked";
    let (spec, _) = request(answered).validate().expect("valid");
    let record = AgentRecord::new(
        Arc::new(spec),
        earlier.dir.path().join("agents").join(answered),
        clock.wall(),
    );
    let (pid, ticks) = earlier.os.running(answered);
    earlier.os.unmarked(answered);
    children.push(KeptChild {
        agent_id: answered.into(),
        pid,
        start_ticks: Some(ticks),
        recorded: false,
    });
    earlier.task.store.put(&record).expect("stored");
    records.push(record);
    earlier.task.store.flush_now().expect("flushed");
    let stored = earlier.task.store.load_agents().expect("loaded");
    assert_eq!(stored.len(), records.len());

    // The new task sees the same host: the earlier one's fake OS.
    let Driver {
        task, os, log, dir, ..
    } = earlier;
    drop(task);
    let mut driver = Driver::in_dir(dir, clock.clone(), (os, log), |_| {});
    let keeper = KeeperState {
        children,
        exits: Vec::new(),
    };
    driver
        .task
        .recover(keeper, stored, None)
        .expect("recovered");
    let mut found = vec![(
        answered.to_string(),
        driver.status(answered).await.record.state,
    )];
    for state in states {
        for alive in ["alive", "gone"] {
            let id = format!("{state:?}-{alive}").to_lowercase();
            found.push((id.clone(), driver.status(&id).await.record.state));
        }
    }
    let expected = |id: &str| -> AgentState {
        use AgentState::*;
        match id {
            "starting-alive" | "running-alive" | "answered-unmarked" => Running,
            "stopping-alive" => Stopping,
            "paused-alive" => Paused,
            "starting-gone" | "running-gone" | "stopping-gone" | "paused-gone" => Lost,
            "backingoff-alive" => Running,
            "backingoff-gone" => BackingOff,
            other => match other.split('-').next() {
                Some("completed") => Completed,
                Some("failed") => Failed,
                Some("killed") => Killed,
                Some("lost") => Lost,
                Some("timedout") => TimedOut,
                _ => unreachable!("{other}"),
            },
        }
    };
    let wrong: Vec<_> = found
        .iter()
        .filter(|(id, state)| *state != expected(id))
        .collect();
    assert!(wrong.is_empty(), "recovered as: {wrong:?}");
    // The one backing off starts again when its time comes, not before.
    driver.log.take();
    driver.advance(Duration::from_millis(3999));
    assert!(
        !driver
            .log
            .take()
            .contains(&"spawn backingoff-gone".to_string())
    );
    driver.advance(Duration::from_millis(1));
    assert!(
        driver
            .log
            .take()
            .contains(&"spawn backingoff-gone".to_string())
    );
}

#[tokio::test]
async fn spawns_are_pipelined_and_a_stop_waits_for_the_launches_under_way() {
    let mut driver = Driver::new();
    driver.os.hold_launches();
    let first = driver.send(|reply| Command::Spawn(Box::new(request("a1")), reply));
    let second = driver.send(|reply| Command::Spawn(Box::new(request("a2")), reply));
    // The second order leaves before the first is answered.
    assert_eq!(driver.log.take(), lines(&["spawn a1", "spawn a2"]));
    // A stop of an agent with no pid yet waits, and so does every command after it.
    let stopped = driver.stop(&["a1"], false);
    let third = driver.send(|reply| Command::Spawn(Box::new(request("a3")), reply));
    let listed = driver.send(|reply| Command::Status("a3".into(), reply));
    driver.turn();
    assert!(driver.log.take().is_empty());

    driver.os.answer_launches();
    let started = driver.until(first).await.expect("a1 spawned");
    assert_eq!(started.record.state, AgentState::Running);
    let reports = driver.until(stopped).await.expect("a1 stopped");
    assert_eq!(reports[0].outcome, StopOutcome::ExitedOnFirstSignal);
    let third = driver.until(third).await.expect("a3 spawned");
    assert_eq!(third.record.state, AgentState::Running);
    // A read waits only for the commands before it, not for a3's launch.
    assert_eq!(
        driver.until(listed).await.expect("a3").record.state,
        AgentState::Starting
    );
    assert_eq!(
        driver.until(second).await.expect("a2 spawned").record.state,
        AgentState::Running
    );
    assert_eq!(
        driver.log.take(),
        lines(&[
            "event Spawned",
            "event Spawned",
            "event Stopping",
            "signal a1 SIGTERM",
            "exit a1",
            "spawn a3",
            "event Spawned",
            "run ended Stopped",
            "event Killed",
            "stopped ExitedOnFirstSignal",
        ])
    );
}

#[tokio::test]
async fn an_exit_reported_before_its_spawn_is_answered_waits_for_the_answer() {
    let mut driver = Driver::new();
    driver.os.hold_launches();
    let spawned = driver.send(|reply| Command::Spawn(Box::new(request("quick")), reply));
    // The keeper reaps it before agentd reads the answer that names its pid.
    let (pid, ticks) = driver.os.reaped_by_keeper("quick", Exit::Code(0));
    driver.task.handle(Command::KeptExit(KeptExit {
        agent_id: "quick".into(),
        pid,
        start_ticks: Some(ticks),
        exit: Exit::Code(0),
        ran_for: Duration::ZERO,
        at: std::time::SystemTime::now(),
    }));
    driver.turn();
    assert_eq!(driver.log.take(), lines(&["spawn quick", "exit quick"]));

    driver.os.answer_launches();
    let started = driver.until(spawned).await.expect("spawned");
    assert_eq!(started.record.pid, Some(pid));
    assert_eq!(
        driver.status("quick").await.record.state,
        AgentState::Completed
    );
    assert_eq!(
        driver.log.take(),
        lines(&["event Spawned", "run ended Exited", "event Exited"])
    );
}

#[tokio::test]
async fn a_follower_whose_parent_ends_while_it_starts_is_stopped_once_it_runs() {
    let mut driver = Driver::new();
    driver.spawn(request("parent")).await.expect("parent");
    driver.os.hold_launches();
    let mut spawn = request("child");
    spawn.parent_agent_id = "parent".into();
    spawn.lifecycle.on_parent_exit = ParentExit::Stop;
    let spawned = driver.send(|reply| Command::Spawn(Box::new(spawn), reply));
    driver.os.exit("parent", Exit::Code(0));
    driver.turn();
    driver.log.take();

    driver.os.answer_launches();
    let started = driver.until(spawned).await.expect("child spawned");
    assert_eq!(started.record.state, AgentState::Running);
    driver.turn();
    assert_eq!(
        driver.status("child").await.record.state,
        AgentState::Killed
    );
    assert_eq!(
        driver.log.take(),
        lines(&[
            "event Spawned",
            "event Stopping",
            "signal child SIGTERM",
            "exit child",
            "run ended Stopped",
            "event Killed",
            "stopped ExitedOnFirstSignal",
        ])
    );
}

/// The sampler sends unchanged samples only while a watcher wants every round: one of the
/// whole status that takes HEALTH events, for as long as its subscription lives.
#[tokio::test]
async fn unchanged_samples_go_out_only_while_a_watcher_wants_every_round() {
    let mut driver = Driver::new();
    let every_round = async |driver: &mut Driver| {
        driver
            .call(|reply| Command::SampleTargets(None, reply))
            .await
            .every_round
    };
    let watch = async |driver: &mut Driver, samples: Samples, kinds: &[EventKind]| {
        let watch = Watch {
            filter: EventFilter {
                kinds: kinds.iter().copied().collect(),
                ..EventFilter::default()
            },
            samples,
            ..Watch::default()
        };
        driver
            .call(|reply| Command::Watch(watch, reply))
            .await
            .expect("subscribed")
    };
    assert!(!every_round(&mut driver).await);
    let lifecycle = watch(&mut driver, Samples::EveryRound, &[EventKind::Exited]).await;
    assert!(!every_round(&mut driver).await);
    let figures = watch(&mut driver, Samples::Changed, &[]).await;
    assert!(!every_round(&mut driver).await);
    let whole = watch(&mut driver, Samples::EveryRound, &[EventKind::Health]).await;
    let everything = watch(&mut driver, Samples::EveryRound, &[]).await;
    assert!(every_round(&mut driver).await);
    drop(whole);
    assert!(every_round(&mut driver).await);
    drop(everything);
    assert!(!every_round(&mut driver).await);
    drop((figures, lifecycle));
}

/// Spend moves figures no sample carries: a watcher of changed figures alone gets a HEALTH
/// event with it at the next round, for the agent and each ancestor whose tree spend grew,
/// running or not.
#[tokio::test]
async fn spend_reaches_a_watcher_of_changed_figures_at_the_next_round() {
    let mut driver = Driver::new();
    driver.spawn(request("parent")).await.expect("spawned");
    let mut child = request("child");
    child.parent_agent_id = "parent".into();
    driver.spawn(child).await.expect("spawned");
    driver.os.exit("parent", Exit::Code(0));
    driver.turn();
    let watch = Watch::default();
    let mut events = driver
        .call(|reply| Command::Watch(watch, reply))
        .await
        .expect("subscribed")
        .events;
    let usage = crate::spend::Usage {
        input_tokens: 100,
        requests: 1,
        cost_micros: 250,
        ..Default::default()
    };
    driver
        .call(|reply| Command::ReportUsage("child".into(), "p/m".into(), usage, reply))
        .await
        .expect("counted");
    driver.task.handle(Command::Samples(Default::default()));
    let mut told = Vec::new();
    while let Ok(event) = events.try_recv() {
        if event.kind == EventKind::Health {
            let record = &event.status.record;
            told.push((record.spec.agent_id.clone(), record.tree_spend.cost_micros));
        }
    }
    told.sort();
    assert_eq!(told, [("child".into(), 250), ("parent".into(), 250)]);
    // Told once: the next round has nothing to tell.
    driver.task.handle(Command::Samples(Default::default()));
    assert!(events.try_recv().is_err());
}
