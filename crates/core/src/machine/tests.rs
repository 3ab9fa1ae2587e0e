//! Every transition of the lifecycle machine, driven by a fake clock: no process, no store,
//! no runtime. Each test reads as the story of one agent.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;

use super::*;
use crate::health::HealthAction;
use crate::health::HealthPolicy;
use crate::lifecycle::{Backoff, LifecyclePolicy, RestartPolicy};
use crate::spec::{AgentSpec, StopPolicy};

/// A clock that only moves when a test says so. Wall time is set apart on purpose, so a test
/// can step it without moving any duration.
struct Clock {
    mono: Instant,
    wall: SystemTime,
    jitter: f64,
    shutting_down: bool,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            mono: Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            jitter: 0.0,
            shutting_down: false,
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.mono,
            wall: self.wall,
            jitter: self.jitter,
            shutting_down: self.shutting_down,
        }
    }

    fn advance(&mut self, by: Duration) -> Now {
        self.mono += by;
        self.wall += by;
        self.now()
    }
}

fn launched(pid: i32, start_ticks: Option<u64>) -> Launched {
    Launched {
        pid,
        start_ticks,
        ..Launched::default()
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn spec(change: impl FnOnce(&mut AgentSpec)) -> AgentSpec {
    let mut spec = AgentSpec {
        agent_id: "a1".into(),
        request_id: String::new(),
        parent_agent_id: String::new(),
        agent_name: String::new(),
        agent_type: String::new(),
        model: String::new(),
        load_percentage: 0.0,
        command: vec!["sleep".into(), "300".into()],
        env: Default::default(),
        working_dir: None,
        labels: Default::default(),
        stop_policy: StopPolicy {
            signal: Signal::SIGTERM,
            first_grace: ms(300),
            second_grace: ms(200),
        },
        health_policy: HealthPolicy::default(),
        lifecycle: LifecyclePolicy::default(),
        resources: Default::default(),
        run_as: None,
        sandbox: None,
        budget: None,
    };
    change(&mut spec);
    spec
}

fn record(spec: AgentSpec) -> AgentRecord {
    let dir = format!("/data/agents/{}", spec.agent_id).into();
    AgentRecord::new(Arc::new(spec), dir, SystemTime::UNIX_EPOCH)
}

/// The leader dies of the SIGTERM a millisecond later; returns the effects.
fn terminated(machine: &mut AgentMachine, clock: &mut Clock) -> Vec<Effect> {
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(1)),
        Some(Exit::Signal(15)),
        false,
        false,
        &mut out,
    );
    out
}

fn ended_as(machine: &AgentMachine) -> (AgentState, EndReason) {
    (machine.record().state, machine.record().end_reason)
}

/// A machine whose process has started, and the clock it lives by.
fn running(change: impl FnOnce(&mut AgentSpec)) -> (AgentMachine, Clock) {
    let clock = Clock::new();
    let mut machine = AgentMachine::starting(record(spec(change)), clock.now());
    let mut out = Vec::new();
    machine.started(clock.now(), launched(4242, Some(1)), &mut out);
    assert_eq!(kinds(&out), [EventKind::Spawned]);
    assert_eq!(machine.phase(), Phase::Running);
    (machine, clock)
}

fn kinds(effects: &[Effect]) -> Vec<EventKind> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Emit { kind, .. } => Some(*kind),
            _ => None,
        })
        .collect()
}

fn signals(effects: &[Effect]) -> Vec<Signal> {
    effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Signal(signal) => Some(*signal),
            _ => None,
        })
        .collect()
}

fn finished(effects: &[Effect]) -> Option<StopOutcome> {
    effects.iter().find_map(|effect| match effect {
        Effect::StopFinished { outcome, .. } => Some(*outcome),
        _ => None,
    })
}

/// Advances to the machine's deadline and fires it.
fn fire(machine: &mut AgentMachine, clock: &mut Clock) -> Vec<Effect> {
    let due = machine.deadline().expect("a deadline");
    let wait = due.saturating_duration_since(clock.mono);
    let now = clock.advance(wait);
    let mut out = Vec::new();
    machine.timeout(now, &mut out);
    out
}

#[test]
fn a_stop_signals_once_and_ends_when_the_leader_exits_with_an_empty_group() {
    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    assert!(machine.stop(clock.now(), false, StopReason::Requested, &mut out));
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    assert_eq!(kinds(&out), [EventKind::Stopping]);
    assert_eq!(machine.record().state, AgentState::Stopping);
    assert_eq!(machine.deadline(), Some(clock.mono + ms(300)));

    let mut out = Vec::new();
    let now = clock.advance(ms(50));
    machine.leader_exited(now, Some(Exit::Signal(15)), false, false, &mut out);
    assert_eq!(finished(&out), Some(StopOutcome::ExitedOnFirstSignal));
    assert_eq!(kinds(&out), [EventKind::Killed]);
    assert!(out.contains(&Effect::EndedForGood));
    let record = machine.record();
    assert_eq!(record.state, AgentState::Killed);
    assert_eq!(record.end_reason, EndReason::Stopped);
    assert_eq!(record.exit, Some(Exit::Signal(15)));
    assert_eq!(record.ran_for, Some(ms(50)));
    assert_eq!(machine.phase(), Phase::Ended { lingering: false });
    assert_eq!(machine.deadline(), None);
}

#[test]
fn the_ladder_escalates_to_a_second_signal_then_sigkill_and_repeats_it() {
    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    machine.stop(clock.now(), false, StopReason::Requested, &mut out);
    let second = fire(&mut machine, &mut clock);
    assert_eq!(signals(&second), [Signal::SIGTERM]);
    assert_eq!(machine.deadline(), Some(clock.mono + ms(200)));
    let kill = fire(&mut machine, &mut clock);
    assert_eq!(signals(&kill), [Signal::SIGKILL]);
    // A process in uninterruptible sleep dies when it wakes: SIGKILL again, every second.
    assert_eq!(machine.deadline(), Some(clock.mono + KILL_RECHECK));
    assert_eq!(signals(&fire(&mut machine, &mut clock)), [Signal::SIGKILL]);

    let mut out = Vec::new();
    machine.leader_exited(clock.now(), Some(Exit::Signal(9)), false, false, &mut out);
    assert_eq!(finished(&out), Some(StopOutcome::Killed));
}

#[test]
fn a_stop_waits_for_a_group_that_outlives_its_leader() {
    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    machine.stop(clock.now(), false, StopReason::Requested, &mut out);
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(10)),
        Some(Exit::Code(0)),
        true,
        false,
        &mut out,
    );
    assert!(
        machine.watches_group(),
        "the group is checked until it is gone"
    );
    assert_eq!(finished(&out), None);
    assert!(machine.watches_group() && !machine.leader_alive());
    // The ladder goes on for the rest of the group.
    let second = fire(&mut machine, &mut clock);
    assert_eq!(signals(&second), [Signal::SIGTERM]);
    let mut out = Vec::new();
    machine.group_gone(clock.advance(ms(5)), &mut out);
    assert_eq!(finished(&out), Some(StopOutcome::Escalated));
    assert_eq!(machine.record().state, AgentState::Killed);
}

#[test]
fn a_forced_stop_kills_at_once_and_hurries_a_graceful_one() {
    let (mut machine, clock) = running(|_| {});
    let mut out = Vec::new();
    machine.stop(clock.now(), true, StopReason::Requested, &mut out);
    assert_eq!(signals(&out), [Signal::SIGKILL]);

    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    machine.stop(clock.now(), false, StopReason::Requested, &mut out);
    let mut out = Vec::new();
    assert!(machine.stop(clock.advance(ms(10)), true, StopReason::Requested, &mut out));
    assert_eq!(signals(&out), [Signal::SIGKILL]);
    assert!(kinds(&out).is_empty(), "joining a stop emits nothing");
}

#[test]
fn a_natural_exit_reports_its_code_or_signal_and_never_completes_without_code_0() {
    for (exit, state, reason) in [
        (
            Some(Exit::Code(0)),
            AgentState::Completed,
            EndReason::Exited,
        ),
        (Some(Exit::Code(3)), AgentState::Failed, EndReason::Exited),
        (
            Some(Exit::Signal(9)),
            AgentState::Failed,
            EndReason::Signaled,
        ),
        (None, AgentState::Lost, EndReason::Lost),
    ] {
        let (mut machine, mut clock) = running(|_| {});
        let mut out = Vec::new();
        machine.leader_exited(clock.advance(ms(1)), exit, false, false, &mut out);
        let record = machine.record();
        assert_eq!(
            (record.state, record.end_reason, record.exit),
            (state, reason, exit)
        );
        assert!(machine.has_ended());
    }
}

#[test]
fn restarts_back_off_within_the_jitter_grow_and_reset_after_a_long_run() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::OnFailure;
        spec.lifecycle.backoff = Backoff {
            initial: ms(100),
            max: ms(1000),
            multiplier: 2.0,
            reset_after: Duration::from_secs(10),
        };
    });
    let mut delays = Vec::new();
    for (run, jitter) in [(0, -1.0), (1, 1.0), (2, 0.0), (3, 0.5), (4, -0.5)] {
        clock.jitter = jitter;
        let mut out = Vec::new();
        machine.leader_exited(
            clock.advance(ms(20)),
            Some(Exit::Code(1)),
            false,
            false,
            &mut out,
        );
        assert_eq!(kinds(&out), [EventKind::Failed, EventKind::Restarting]);
        assert_eq!(machine.record().state, AgentState::BackingOff);
        let due = machine.deadline().expect("restart due");
        delays.push(due.duration_since(clock.mono));
        let launch = fire(&mut machine, &mut clock);
        assert_eq!(launch, [Effect::Launch]);
        assert_eq!(machine.record().state, AgentState::Starting);
        let mut out = Vec::new();
        machine.started(clock.now(), launched(5000 + run, Some(2)), &mut out);
        assert_eq!(machine.record().restart_count, run as u32 + 1);
        assert_eq!(machine.record().end_reason, EndReason::Unspecified);
    }
    assert_eq!(delays, [ms(90), ms(220), ms(400), ms(840), ms(950)]);
    // A run that lasted `reset_after` starts the backoff over.
    let mut out = Vec::new();
    clock.jitter = 0.0;
    machine.leader_exited(
        clock.advance(Duration::from_secs(10)),
        Some(Exit::Code(1)),
        false,
        false,
        &mut out,
    );
    assert_eq!(machine.deadline(), Some(clock.mono + ms(100)));
    assert_eq!(machine.record().last_exit, Some(Exit::Code(1)));
}

#[test]
fn max_restarts_gives_up_and_ends_failed() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::Always;
        spec.lifecycle.max_restarts = Some(1);
    });
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(0)),
        false,
        false,
        &mut out,
    );
    fire(&mut machine, &mut clock);
    machine.started(clock.now(), launched(2, None), &mut out);
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(0)),
        false,
        false,
        &mut out,
    );
    assert_eq!(kinds(&out), [EventKind::Exited, EventKind::Failed]);
    let record = machine.record();
    assert_eq!(record.state, AgentState::Failed);
    assert!(
        record
            .error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 1 restarts"))
    );
    assert!(out.contains(&Effect::EndedForGood));
}

#[test]
fn a_failed_last_run_is_one_failed_event_that_says_it_gave_up() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::OnFailure;
        spec.lifecycle.max_restarts = Some(1);
    });
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(3)),
        false,
        false,
        &mut out,
    );
    assert_eq!(kinds(&out), [EventKind::Failed, EventKind::Restarting]);
    fire(&mut machine, &mut clock);
    machine.started(clock.now(), launched(2, None), &mut out);
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(3)),
        false,
        false,
        &mut out,
    );
    assert_eq!(kinds(&out), [EventKind::Failed]);
    let message = out.iter().find_map(|effect| match effect {
        Effect::Emit { message, .. } => Some(message.as_str()),
        _ => None,
    });
    assert_eq!(
        message,
        Some("gave up after 1 restarts; the last run failed: exited with code 3")
    );
    assert_eq!(machine.record().error.as_deref(), message);
    assert_eq!(machine.record().state, AgentState::Failed);
    assert!(out.contains(&Effect::EndedForGood));
}

#[test]
fn max_runtime_stops_the_run_and_ends_it_timed_out() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.max_runtime = Some(Duration::from_secs(5));
    });
    assert_eq!(
        machine.deadline(),
        Some(clock.mono + Duration::from_secs(5))
    );
    let out = fire(&mut machine, &mut clock);
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    let out = terminated(&mut machine, &mut clock);
    assert_eq!(kinds(&out), [EventKind::TimedOut]);
    assert_eq!(
        ended_as(&machine),
        (AgentState::TimedOut, EndReason::TimedOut)
    );
    assert!(machine.has_ended(), "only ALWAYS restarts a timed-out run");
}

#[test]
fn a_startup_timeout_fails_a_silent_start_and_a_first_heartbeat_lifts_it() {
    let with_timeout = |spec: &mut AgentSpec| {
        spec.lifecycle.startup_timeout = Some(Duration::from_secs(2));
        spec.health_policy.heartbeat_timeout = Some(Duration::from_secs(1));
    };
    let (mut machine, mut clock) = running(with_timeout);
    // Until the first heartbeat the startup timeout is the limit, not the heartbeat's.
    let mut out = Vec::new();
    machine.check_health(clock.advance(ms(1500)), &mut out);
    assert!(out.is_empty());
    let out = fire(&mut machine, &mut clock);
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    terminated(&mut machine, &mut clock);
    assert_eq!(
        ended_as(&machine),
        (AgentState::Failed, EndReason::TimedOut)
    );

    let (mut machine, mut clock) = running(with_timeout);
    let mut out = Vec::new();
    machine.heartbeat(clock.advance(ms(500)), |_| false, &mut out);
    assert_eq!(machine.deadline(), None, "the first heartbeat came");
}

#[test]
fn a_stall_is_reported_once_recovers_on_a_heartbeat_and_ignores_wall_clock_steps() {
    let (mut machine, mut clock) = running(|spec| {
        spec.health_policy.heartbeat_timeout = Some(Duration::from_secs(1));
    });
    // The wall clock jumps a day ahead: no duration moves with it.
    clock.wall += Duration::from_secs(86_400);
    let mut out = Vec::new();
    machine.check_health(clock.advance(ms(900)), &mut out);
    assert!(out.is_empty(), "{out:?}");
    let mut out = Vec::new();
    machine.check_health(clock.advance(ms(200)), &mut out);
    assert_eq!(kinds(&out), [EventKind::Stalled]);
    let status = machine.status(clock.mono);
    assert_eq!(status.health, crate::state::Health::Stalled);
    let mut out = Vec::new();
    machine.check_health(clock.advance(ms(500)), &mut out);
    assert!(out.is_empty(), "a stall is reported once");
    let mut out = Vec::new();
    machine.heartbeat(clock.advance(ms(1)), |_| false, &mut out);
    assert_eq!(kinds(&out), [EventKind::Recovered]);
    assert_eq!(
        machine.status(clock.mono).health,
        crate::state::Health::Healthy
    );
}

#[test]
fn a_stall_with_the_stop_action_stops_the_agent_for_good() {
    let (mut machine, mut clock) = running(|spec| {
        spec.health_policy.heartbeat_timeout = Some(Duration::from_secs(1));
        spec.health_policy.on_stall = HealthAction::Stop;
        spec.lifecycle.restart = RestartPolicy::Always;
    });
    let mut out = Vec::new();
    machine.check_health(clock.advance(ms(1100)), &mut out);
    assert_eq!(kinds(&out), [EventKind::Stalled, EventKind::Stopping]);
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    terminated(&mut machine, &mut clock);
    assert_eq!(
        ended_as(&machine),
        (AgentState::Killed, EndReason::HealthAction)
    );
    assert!(
        machine.has_ended(),
        "a health stop is not restarted, even by ALWAYS"
    );
}

#[test]
fn a_client_stop_wins_over_a_health_restart() {
    let (mut machine, mut clock) = running(|spec| {
        spec.health_policy.memory_limit_mb = Some(10.0);
        spec.health_policy.on_memory_limit = HealthAction::Restart;
        spec.lifecycle.restart = RestartPolicy::OnFailure;
    });
    let mut out = Vec::new();
    machine.sampled(sample(20.0, 0.0), &mut out);
    machine.check_health(clock.advance(ms(1)), &mut out);
    assert_eq!(
        kinds(&out),
        [EventKind::Health, EventKind::Alert, EventKind::Stopping]
    );
    let mut out = Vec::new();
    machine.stop(clock.advance(ms(1)), false, StopReason::Requested, &mut out);
    terminated(&mut machine, &mut clock);
    assert!(machine.has_ended());
    assert_eq!(machine.record().end_reason, EndReason::Stopped);
}

fn sample(memory_mb: f64, cpu_percent: f64) -> TreeSample {
    TreeSample {
        leader_status: "sleeping",
        cpu_percent,
        memory_bytes: (memory_mb * 1024.0 * 1024.0) as u64,
        num_threads: 1,
        num_processes: 1,
        cpu_seconds: 0.0,
    }
}

#[test]
fn thresholds_alert_on_crossing_and_recover_below() {
    let (mut machine, mut clock) = running(|spec| {
        spec.health_policy.memory_limit_mb = Some(100.0);
        spec.health_policy.cpu_limit_percent = Some(50.0);
        spec.health_policy.cpu_limit_samples = 3;
    });
    let mut round = |memory, cpu| {
        let mut out = Vec::new();
        machine.sampled(sample(memory, cpu), &mut out);
        machine.check_health(clock.advance(ms(100)), &mut out);
        kinds(&out)
    };
    use EventKind::{Alert as A, Health as H, Recovered as R};
    assert_eq!(round(150.0, 90.0), [H, A]);
    assert_eq!(round(150.0, 90.0), [H]);
    assert_eq!(
        round(50.0, 90.0),
        [H, R, A],
        "memory recovers; CPU crosses on its 3rd sample"
    );
    assert_eq!(round(50.0, 10.0), [H, R]);
}

#[test]
fn a_stop_during_backoff_cancels_the_restart() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::Always;
    });
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(0)),
        false,
        false,
        &mut out,
    );
    assert_eq!(machine.record().state, AgentState::BackingOff);
    let mut out = Vec::new();
    assert!(!machine.stop(clock.now(), false, StopReason::Requested, &mut out));
    assert_eq!(kinds(&out), [EventKind::Killed]);
    assert!(out.contains(&Effect::EndedForGood));
    assert_eq!(machine.record().next_restart_at, None);
    assert_eq!(machine.deadline(), None);
}

#[test]
fn a_group_left_behind_is_stopped_later_without_a_second_end() {
    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(0)),
        true,
        false,
        &mut out,
    );
    assert_eq!(machine.phase(), Phase::Ended { lingering: true });
    let mut out = Vec::new();
    assert!(machine.stop(clock.now(), false, StopReason::Requested, &mut out));
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    assert!(
        machine.watches_group(),
        "the group is checked until it is gone"
    );
    assert!(kinds(&out).is_empty());
    let mut out = Vec::new();
    machine.group_gone(clock.advance(ms(5)), &mut out);
    assert_eq!(finished(&out), Some(StopOutcome::ExitedOnFirstSignal));
    assert!(
        !out.contains(&Effect::EndedForGood),
        "its end was decided before"
    );
    assert_eq!(machine.record().state, AgentState::Completed);
}

#[test]
fn shutting_down_starts_nothing_again() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::Always;
    });
    clock.shutting_down = true;
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(1)),
        false,
        false,
        &mut out,
    );
    assert!(machine.has_ended());
}

#[test]
fn a_failed_first_start_ends_the_agent_and_a_failed_restart_backs_off() {
    let clock = Clock::new();
    let mut machine = AgentMachine::starting(record(spec(|_| {})), clock.now());
    let mut out = Vec::new();
    machine.start_failed(clock.now(), "no such file".into(), &mut out);
    assert_eq!(
        ended_as(&machine),
        (AgentState::Failed, EndReason::StartFailed)
    );
    assert!(machine.has_ended());

    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::OnFailure;
    });
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(1)),
        false,
        false,
        &mut out,
    );
    assert_eq!(fire(&mut machine, &mut clock), [Effect::Launch]);
    let mut out = Vec::new();
    machine.start_failed(clock.now(), "gone".into(), &mut out);
    assert_eq!(kinds(&out), [EventKind::Failed, EventKind::Restarting]);
    assert_eq!(machine.record().state, AgentState::BackingOff);
}

fn stored(state: AgentState, change: impl FnOnce(&mut AgentSpec)) -> AgentRecord {
    let mut record = record(spec(change));
    record.state = state;
    record.pid = Some(4242);
    record.started_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    record
}

#[test]
fn recovery_adopts_a_live_run_with_its_limits_counted_from_its_real_start() {
    let clock = Clock::new();
    let mut out = Vec::new();
    let record = stored(AgentState::Running, |spec| {
        spec.lifecycle.max_runtime = Some(Duration::from_secs(60));
    });
    let ran_for = Duration::from_secs(45);
    let machine = AgentMachine::recovered(
        record,
        Recovered::Running { ran_for },
        clock.now(),
        &mut out,
    );
    assert_eq!(kinds(&out), [EventKind::Adopted]);
    assert!(machine.record().adopted && machine.leader_alive());
    assert_eq!(
        machine.deadline(),
        Some(clock.mono + Duration::from_secs(15))
    );
    assert_eq!(machine.status(clock.mono).runtime, ran_for);
}

#[test]
fn recovery_resumes_a_stop_that_was_under_way() {
    let clock = Clock::new();
    let mut out = Vec::new();
    let record = stored(AgentState::Stopping, |_| {});
    let how = Recovered::Running { ran_for: ms(10) };
    let machine = AgentMachine::recovered(record, how, clock.now(), &mut out);
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    assert!(matches!(machine.phase(), Phase::Stopping(_)));
}

#[test]
fn recovery_reports_a_known_exit_with_its_code_and_an_unknown_end_as_lost() {
    let clock = Clock::new();
    let mut out = Vec::new();
    let how = Recovered::Exited {
        exit: Exit::Code(3),
        ran_for: Some(Duration::from_secs(4)),
        at: clock.wall - Duration::from_secs(60),
    };
    let machine = AgentMachine::recovered(
        stored(AgentState::Running, |_| {}),
        how,
        clock.now(),
        &mut out,
    );
    let record = machine.record();
    assert_eq!(
        (record.state, record.exit),
        (AgentState::Failed, Some(Exit::Code(3)))
    );
    assert_eq!(record.ran_for, Some(Duration::from_secs(4)));
    assert_eq!(record.ended_at, Some(clock.wall - Duration::from_secs(60)));

    let mut out = Vec::new();
    let record = stored(AgentState::Running, |spec| {
        spec.lifecycle.restart = RestartPolicy::OnFailure;
    });
    let machine = AgentMachine::recovered(record, Recovered::Gone, clock.now(), &mut out);
    assert_eq!(kinds(&out), [EventKind::Lost, EventKind::Restarting]);
    assert_eq!(machine.record().end_reason, EndReason::Lost);
    assert_eq!(machine.record().exit, None);
}

#[test]
fn recovery_keeps_a_pending_restart_and_bounds_it_by_the_backoff_max() {
    let clock = Clock::new();
    let mut record = stored(AgentState::BackingOff, |spec| {
        spec.lifecycle.restart = RestartPolicy::Always;
        spec.lifecycle.backoff.max = Duration::from_secs(30);
    });
    record.next_restart_at = Some(clock.wall + Duration::from_secs(10));
    let mut out = Vec::new();
    let machine =
        AgentMachine::recovered(record.clone(), Recovered::AsStored, clock.now(), &mut out);
    assert!(out.is_empty());
    assert_eq!(
        machine.deadline(),
        Some(clock.mono + Duration::from_secs(10))
    );
    // A wall clock that jumped back a year does not hold the restart for a year.
    record.next_restart_at = Some(clock.wall + Duration::from_secs(365 * 86_400));
    let machine = AgentMachine::recovered(record, Recovered::AsStored, clock.now(), &mut out);
    assert_eq!(
        machine.deadline(),
        Some(clock.mono + Duration::from_secs(30))
    );
}

#[test]
fn a_pause_suspends_heartbeat_checks_and_resume_counts_only_the_unpaused_silence() {
    let (mut machine, mut clock) = running(|spec| {
        spec.health_policy.heartbeat_timeout = Some(Duration::from_secs(1));
    });
    let mut out = Vec::new();
    machine
        .pause(clock.advance(ms(600)), &mut out)
        .expect("a running agent pauses");
    assert_eq!(out[0], Effect::Freeze(true));
    assert_eq!(kinds(&out), [EventKind::Paused]);
    assert_eq!(machine.record().state, AgentState::Paused);
    assert!(machine.leader_alive());
    let mut out = Vec::new();
    machine.check_health(clock.advance(Duration::from_secs(60)), &mut out);
    assert!(out.is_empty(), "no stall while paused: {out:?}");
    let mut out = Vec::new();
    machine.resume(clock.now(), &mut out).expect("resumes");
    assert_eq!(out[0], Effect::Freeze(false));
    assert_eq!(kinds(&out), [EventKind::Resumed]);
    // 600 ms before the pause and 300 ms after it: 900 ms of silence.
    let mut out = Vec::new();
    machine.check_health(clock.advance(ms(300)), &mut out);
    assert!(out.is_empty(), "{out:?}");
    machine.check_health(clock.advance(ms(200)), &mut out);
    assert_eq!(kinds(&out), [EventKind::Stalled]);
    // Only a running or paused agent can be paused or resumed.
    let (mut ended, mut clock) = running(|_| {});
    terminated(&mut ended, &mut clock);
    assert_eq!(
        ended.pause(clock.now(), &mut Vec::new()),
        Err(AgentState::Failed)
    );
}

#[test]
fn max_runtime_keeps_counting_while_paused_and_a_stop_thaws_first() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.max_runtime = Some(Duration::from_secs(2));
    });
    let started = clock.mono;
    machine
        .pause(clock.advance(ms(500)), &mut Vec::new())
        .expect("pauses");
    assert_eq!(machine.deadline(), Some(started + Duration::from_secs(2)));
    let out = fire(&mut machine, &mut clock);
    assert_eq!(
        out[0],
        Effect::Freeze(false),
        "thawed before it is signalled"
    );
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    terminated(&mut machine, &mut clock);
    assert_eq!(
        ended_as(&machine),
        (AgentState::TimedOut, EndReason::TimedOut)
    );
}

#[test]
fn an_oom_kill_ends_the_run_oom_killed_and_on_failure_restarts_it() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::OnFailure;
        spec.resources.memory_max_mb = Some(64.0);
    });
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(50)),
        Some(Exit::Signal(9)),
        false,
        true,
        &mut out,
    );
    assert_eq!(kinds(&out), [EventKind::OomKilled, EventKind::Restarting]);
    assert_eq!(machine.record().end_reason, EndReason::OomKilled);
    let error = machine.record().error.clone().unwrap_or_default();
    assert!(error.contains("64 MB"), "{error}");
    assert!(matches!(machine.phase(), Phase::BackingOff { .. }));
    // A clean exit after an OOM kill of a child is still a clean exit.
    let (mut machine, mut clock) = running(|_| {});
    machine.leader_exited(
        clock.advance(ms(50)),
        Some(Exit::Code(0)),
        false,
        true,
        &mut Vec::new(),
    );
    assert_eq!(
        ended_as(&machine),
        (AgentState::Completed, EndReason::Exited)
    );
}

#[test]
fn a_requested_restart_goes_down_the_ladder_and_starts_again_at_once() {
    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::Never;
    });
    let mut out = Vec::new();
    assert_eq!(machine.restart(clock.now(), &mut out), Ok(()));
    assert_eq!(signals(&out), [Signal::SIGTERM]);
    assert_eq!(kinds(&out), [EventKind::Stopping]);

    let out = terminated(&mut machine, &mut clock);
    assert_eq!(finished(&out), Some(StopOutcome::ExitedOnFirstSignal));
    // The run ended KILLED, then comes up again with no backoff, whatever the policy.
    assert_eq!(kinds(&out), [EventKind::Killed, EventKind::Restarting]);
    assert!(out.contains(&Effect::Launch));
    assert!(!out.contains(&Effect::EndedForGood));
    assert_eq!(machine.phase(), Phase::Starting { restart: true });
    assert_eq!(machine.record().state, AgentState::Starting);
    assert_eq!(machine.record().last_exit, Some(Exit::Signal(15)));

    let mut out = Vec::new();
    machine.started(clock.advance(ms(1)), launched(4343, Some(2)), &mut out);
    assert_eq!(kinds(&out), [EventKind::Spawned]);
    assert_eq!(machine.record().restart_count, 1);
    assert_eq!(machine.record().pid, Some(4343));
}

#[test]
fn an_ended_agent_restarts_at_once_and_a_pending_backoff_is_replaced() {
    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(0)),
        false,
        false,
        &mut out,
    );
    assert_eq!(machine.phase(), Phase::Ended { lingering: false });
    let mut out = Vec::new();
    assert_eq!(machine.restart(clock.now(), &mut out), Ok(()));
    assert_eq!(kinds(&out), [EventKind::Restarting]);
    assert!(out.contains(&Effect::Launch));

    let (mut machine, mut clock) = running(|spec| {
        spec.lifecycle.restart = RestartPolicy::OnFailure;
        spec.lifecycle.backoff.initial = Duration::from_secs(60);
    });
    let mut out = Vec::new();
    machine.leader_exited(
        clock.advance(ms(5)),
        Some(Exit::Code(1)),
        false,
        false,
        &mut out,
    );
    assert!(matches!(machine.phase(), Phase::BackingOff { .. }));
    let mut out = Vec::new();
    assert_eq!(machine.restart(clock.now(), &mut out), Ok(()));
    assert!(out.contains(&Effect::Launch));
    assert_eq!(machine.record().next_restart_at, None);
    assert_eq!(machine.record().last_exit, Some(Exit::Code(1)));
    assert_eq!(machine.deadline(), None, "the backoff's timer is gone");
}

#[test]
fn a_client_stop_during_a_restart_wins_and_a_starting_agent_cannot_restart() {
    let (mut machine, mut clock) = running(|_| {});
    let mut out = Vec::new();
    machine.restart(clock.now(), &mut out).expect("restart");
    machine.stop(clock.now(), false, StopReason::Requested, &mut out);
    let out = terminated(&mut machine, &mut clock);
    assert!(out.contains(&Effect::EndedForGood));
    assert!(!out.contains(&Effect::Launch));
    assert_eq!(ended_as(&machine), (AgentState::Killed, EndReason::Stopped));

    let clock = Clock::new();
    let mut machine = AgentMachine::starting(record(spec(|_| {})), clock.now());
    assert_eq!(
        machine.restart(clock.now(), &mut Vec::new()),
        Err("it is starting")
    );
}
