//! Lifecycle policies: restarts with backoff, timeouts, agent trees, capacity, detaching.

use std::time::{Duration, Instant, SystemTime};

use agentd_proto::v1 as pb;
use pb::{AgentState, EventKind, RestartPolicy, StopOutcome};
use tonic::Code;

use crate::harness::*;

fn pd(duration: Duration) -> Option<pbjson_types::Duration> {
    Some(duration.into())
}

fn restarting(
    agent_id: &str,
    command: Vec<String>,
    policy: RestartPolicy,
    initial_ms: u64,
    multiplier: f64,
    max_restarts: u32,
) -> pb::SpawnRequest {
    pb::SpawnRequest {
        restart_policy: policy as i32,
        restart_backoff: Some(pb::RestartBackoff {
            initial: pd(Duration::from_millis(initial_ms)),
            max: pd(Duration::from_secs(30)),
            multiplier,
            reset_after: pd(Duration::from_secs(30)),
        }),
        max_restarts,
        ..spawn_request(agent_id, command)
    }
}

async fn watch_agent(client: &mut Client, agent_id: &str) -> tonic::Streaming<pb::AgentEvent> {
    client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec![agent_id.into()],
            kinds: [
                EventKind::Spawned,
                EventKind::Exited,
                EventKind::Failed,
                EventKind::Stopping,
                EventKind::Killed,
                EventKind::Restarting,
                EventKind::TimedOut,
            ]
            .iter()
            .map(|k| *k as i32)
            .collect(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Reads events until `done` holds for one; returns all read, that one included.
async fn events_until(
    events: &mut tonic::Streaming<pb::AgentEvent>,
    done: impl Fn(&pb::AgentEvent) -> bool,
) -> Vec<pb::AgentEvent> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(events).await;
        let last = done(&event);
        seen.push(event);
        if last {
            return seen;
        }
    }
}

fn time_of(event: &pb::AgentEvent) -> SystemTime {
    system_time(event.time.as_ref())
}

fn is(kind: EventKind) -> impl Fn(&pb::AgentEvent) -> bool {
    move |event| event.kind == kind as i32
}

#[tokio::test]
async fn a_crash_loop_backs_off_with_growing_gaps_and_ends_failed() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = watch_agent(&mut client, "crasher").await;
    spawn_with(
        &mut client,
        restarting(
            "crasher",
            sh("exit 1"),
            RestartPolicy::OnFailure,
            200,
            2.0,
            3,
        ),
    )
    .await;
    let seen = events_until(&mut events, |e| {
        e.kind == EventKind::Failed as i32 && e.message.contains("gave up")
    })
    .await;
    let spawns: Vec<SystemTime> = seen
        .iter()
        .filter(|e| is(EventKind::Spawned)(e))
        .map(time_of)
        .collect();
    assert_eq!(spawns.len(), 4, "the first run and 3 restarts");
    let failed: Vec<&str> = seen
        .iter()
        .filter(|e| is(EventKind::Failed)(e))
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(failed.len(), 4, "one FAILED per run: {failed:?}");
    assert_eq!(
        seen.iter().filter(|e| is(EventKind::Restarting)(e)).count(),
        3
    );
    let gaps: Vec<f64> = spawns
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).expect("ordered").as_secs_f64())
        .collect();
    // Each restart waits at least its backoff less the jitter: 0.2 s, 0.4 s, 0.8 s (the
    // delays themselves are the machine's unit test's to check).
    for (gap, least) in gaps.iter().zip([0.18, 0.36, 0.72]) {
        assert!(*gap >= least, "{gaps:?}");
    }
    let status = status(&mut client, "crasher").await;
    assert_eq!(status.state, AgentState::Failed as i32);
    assert_eq!(status.restart_count, 3);
    assert!(
        status.error.contains("gave up after 3 restarts"),
        "{}",
        status.error
    );
    assert_eq!(status.last_exit_code, Some(1));
}

#[tokio::test]
async fn a_stable_run_resets_the_backoff() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = watch_agent(&mut client, "steady").await;
    // Each run lasts 0.4 s, past the 0.3 s reset: every restart waits the initial 0.2 s,
    // where a crash loop with multiplier 4 would wait 0.8 s and then 3.2 s.
    let mut request = restarting(
        "steady",
        sh("sleep 0.4; exit 1"),
        RestartPolicy::OnFailure,
        200,
        4.0,
        3,
    );
    if let Some(backoff) = request.restart_backoff.as_mut() {
        backoff.reset_after = pd(Duration::from_millis(300));
    }
    spawn_with(&mut client, request).await;
    let seen = events_until(&mut events, |e| e.message.contains("gave up")).await;
    let delays: Vec<f64> = seen
        .windows(2)
        .filter(|w| is(EventKind::Restarting)(&w[0]))
        .map(|w| {
            let due = system_time(
                w[0].status
                    .as_ref()
                    .and_then(|s| s.next_restart_at.as_ref()),
            );
            due.duration_since(time_of(&w[0]))
                .unwrap_or_default()
                .as_secs_f64()
        })
        .collect();
    assert_eq!(delays.len(), 3, "{delays:?}");
    assert!(
        delays.iter().all(|d| *d < 0.3),
        "the backoff did not reset: {delays:?}"
    );
}

#[tokio::test]
async fn a_stop_during_backoff_cancels_the_restart() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn_with(
        &mut client,
        restarting(
            "waiting",
            sh("exit 1"),
            RestartPolicy::OnFailure,
            1000,
            2.0,
            0,
        ),
    )
    .await;
    let backing_off = wait_for_state(&mut client, "waiting", AgentState::BackingOff).await;
    let due = system_time(backing_off.next_restart_at.as_ref());
    let [result] = stop(&mut client, &["waiting"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::AlreadyExited as i32);
    let stopped = result.status.expect("status");
    assert_eq!(stopped.state, AgentState::Killed as i32);
    assert!(stopped.next_restart_at.is_none());
    // Past the time the restart was due, nothing started.
    let deadline = Instant::now() + DEADLINE;
    while SystemTime::now() < due + Duration::from_millis(300) {
        let now = status(&mut client, "waiting").await;
        assert_eq!(
            (now.state, now.restart_count),
            (AgentState::Killed as i32, 0)
        );
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn always_restarts_a_clean_exit_and_on_failure_does_not() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut always_events = watch_agent(&mut client, "always").await;
    spawn_with(
        &mut client,
        restarting(
            "always",
            vec!["true".into()],
            RestartPolicy::Always,
            100,
            2.0,
            2,
        ),
    )
    .await;
    spawn_with(
        &mut client,
        restarting(
            "on-failure",
            vec!["true".into()],
            RestartPolicy::OnFailure,
            100,
            2.0,
            2,
        ),
    )
    .await;
    events_until(&mut always_events, |e| e.message.contains("gave up")).await;
    let always = status(&mut client, "always").await;
    assert_eq!(always.restart_count, 2);
    assert_eq!(always.last_exit_code, Some(0));
    let clean = wait_for_state(&mut client, "on-failure", AgentState::Completed).await;
    assert_eq!(clean.restart_count, 0);
    assert!(clean.next_restart_at.is_none());
}

#[tokio::test]
async fn max_runtime_ends_an_agent_timed_out_through_the_ladder() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = watch_agent(&mut client, "slow").await;
    let mut request = restarting(
        "slow",
        sh("trap '' TERM; while :; do sleep 0.05; done"),
        RestartPolicy::OnFailure,
        100,
        2.0,
        0,
    );
    request.max_runtime = pd(Duration::from_millis(500));
    request.stop_policy = quick_ladder();
    let spawned = spawn_with(&mut client, request).await;
    let seen = events_until(&mut events, is(EventKind::TimedOut)).await;
    let kinds: Vec<i32> = seen.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::Spawned as i32,
            EventKind::Stopping as i32,
            EventKind::TimedOut as i32
        ]
    );
    let started = system_time(spawned.started_at.as_ref());
    let took = time_of(&seen[2])
        .duration_since(started)
        .expect("after")
        .as_secs_f64();
    // 0.5 s of runtime, then the 0.3 s + 0.3 s ladder to SIGKILL.
    assert!((1.0..5.0).contains(&took), "timed out after {took}s");
    let status = status(&mut client, "slow").await;
    assert_eq!(status.state, AgentState::TimedOut as i32);
    assert_eq!(status.exit_signal, Some(9));
    assert!(status.error.contains("max_runtime"), "{}", status.error);
    // ON_FAILURE does not restart a timeout.
    assert_eq!(status.restart_count, 0);
    assert!(status.next_restart_at.is_none());
}

#[tokio::test]
async fn cascade_stops_a_three_level_tree_children_first_and_concurrently() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let tree = [
        ("root", ""),
        ("c1", "root"),
        ("c2", "root"),
        ("g11", "c1"),
        ("g12", "c1"),
        ("g21", "c2"),
        ("g22", "c2"),
    ];
    let mut agents = Vec::new();
    for (id, parent) in tree {
        let request = pb::SpawnRequest {
            parent_agent_id: parent.into(),
            stop_policy: quick_ladder(),
            ..spawn_request(id, sh("trap '' TERM; touch ready; exec sleep 300"))
        };
        agents.push(spawn_with(&mut client, request).await);
    }
    spawn(&mut client, "bystander", vec!["sleep".into(), "300".into()]).await;
    for agent in &agents {
        let ready = std::path::Path::new(&agent.agent_dir).join("ready");
        eventually("the agent set its trap", async || ready.exists()).await;
    }
    let subtree = client
        .list_agents(pb::ListAgentsRequest {
            subtree_of: "c1".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .agents;
    let ids: Vec<&str> = subtree.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["c1", "g11", "g12"]);

    let started = Instant::now();
    let results = client
        .cleanup(pb::CleanupRequest {
            agent_ids: vec!["root".into()],
            cascade: true,
            ..Default::default()
        })
        .await
        .expect("cascade")
        .into_inner()
        .results;
    let took = started.elapsed();
    assert_eq!(results.len(), 7);
    assert!(
        results
            .iter()
            .all(|r| r.outcome == StopOutcome::Killed as i32)
    );
    // Three levels, each one 0.6 s ladder, one after another: children before parents (the
    // order of the ends below says so too).
    assert!(took >= Duration::from_millis(1700), "{took:?}");
    let ended = |id: &str| -> SystemTime {
        let result = results.iter().find(|r| r.agent_id == id).expect("result");
        let status = result.status.as_ref().expect("status");
        system_time(status.ended_at.as_ref())
    };
    for (id, parent) in tree.iter().filter(|(_, parent)| !parent.is_empty()) {
        assert!(
            ended(id) <= ended(parent),
            "{id} ended after its parent {parent}"
        );
    }
    let bystander = status(&mut client, "bystander").await;
    assert_eq!(bystander.state, AgentState::Running as i32);
    stop(&mut client, &["bystander"], true).await;
}

#[tokio::test]
async fn children_follow_a_parent_that_exits_when_they_ask_to() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The parent exits on its own once the test creates `go` in its folder.
    let parent = spawn(
        &mut client,
        "parent",
        sh("while [ ! -e go ]; do sleep 0.02; done"),
    )
    .await;
    let follower = pb::SpawnRequest {
        parent_agent_id: "parent".into(),
        on_parent_exit: pb::ParentExitPolicy::Stop as i32,
        ..spawn_request("follower", vec!["sleep".into(), "300".into()])
    };
    spawn_with(&mut client, follower).await;
    let keeper = pb::SpawnRequest {
        parent_agent_id: "parent".into(),
        ..spawn_request("keeper", vec!["sleep".into(), "300".into()])
    };
    spawn_with(&mut client, keeper).await;
    std::fs::write(std::path::Path::new(&parent.agent_dir).join("go"), "").expect("go");
    wait_for_state(&mut client, "parent", AgentState::Completed).await;
    wait_for_state(&mut client, "follower", AgentState::Killed).await;
    let keeper = status(&mut client, "keeper").await;
    assert_eq!(keeper.state, AgentState::Running as i32);

    let orphan = client
        .spawn(pb::SpawnRequest {
            parent_agent_id: "nobody".into(),
            ..spawn_request("orphan", vec!["true".into()])
        })
        .await
        .expect_err("unknown parent");
    assert_eq!(orphan.code(), Code::FailedPrecondition);
    assert!(orphan.message().contains("@nobody"), "{}", orphan.message());
    stop(&mut client, &["keeper"], true).await;
}

#[tokio::test]
async fn capacity_and_agent_limits_reject_the_spawn_that_would_exceed_them() {
    let daemon = Daemon::builder()
        .options(&["--capacity", "50", "--max-agents", "3"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let loaded = |id: &str, load: f64| pb::SpawnRequest {
        load_percentage: load,
        ..spawn_request(id, vec!["sleep".into(), "300".into()])
    };
    spawn_with(&mut client, loaded("big", 30.0)).await;
    spawn_with(&mut client, loaded("medium", 20.0)).await;
    let over = client
        .spawn(loaded("one-more", 1.0))
        .await
        .expect_err("over capacity");
    assert_eq!(over.code(), Code::ResourceExhausted);
    assert_eq!(reason(&over).as_deref(), Some("CAPACITY_EXHAUSTED"));
    assert!(over.message().contains("50"), "{}", over.message());
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(
        (
            summary.capacity,
            summary.free_capacity,
            summary.total_load_percentage
        ),
        (50.0, 0.0, 50.0)
    );
    assert_eq!(summary.max_agents, 3);

    spawn_with(&mut client, loaded("weightless", 0.0)).await;
    let too_many = client
        .spawn(loaded("fourth", 0.0))
        .await
        .expect_err("too many");
    assert_eq!(too_many.code(), Code::ResourceExhausted);
    assert_eq!(reason(&too_many).as_deref(), Some("TOO_MANY_AGENTS"));
    stop(&mut client, &["big"], true).await;
    spawn_with(&mut client, loaded("one-more", 1.0)).await;
    stop(&mut client, &["medium", "weightless", "one-more"], true).await;
}

#[tokio::test]
async fn a_detached_daemon_leaves_agents_running_and_the_next_one_adopts_them() {
    let mut daemon = Daemon::builder()
        .options(&["--on-shutdown", "detach"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let agent = spawn(&mut client, "survivor", vec!["sleep".into(), "300".into()]).await;
    drop(client);
    assert!(daemon.terminate().await.success());
    assert!(process_exists(agent.pid as i32), "detach killed the agent");

    let daemon = Daemon::builder().dir(daemon.crash()).start().await;
    let mut client = daemon.client().await;
    let adopted = status(&mut client, "survivor").await;
    assert_eq!(adopted.state, AgentState::Running as i32);
    assert!(adopted.adopted);
    assert_eq!(adopted.pid, agent.pid);
    let [result] = stop(&mut client, &["survivor"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::ExitedOnFirstSignal as i32);
    assert!(!process_exists(agent.pid as i32));
}

#[tokio::test]
async fn restart_count_and_backoff_survive_a_daemon_restart() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The first restart comes after 0.3 s; the second would wait 3 s.
    spawn_with(
        &mut client,
        restarting(
            "phoenix",
            sh("exit 1"),
            RestartPolicy::OnFailure,
            300,
            10.0,
            5,
        ),
    )
    .await;
    let before = wait_for(
        &mut client,
        "phoenix",
        "backing off after its first restart",
        |s| s.restart_count == 1 && s.state == AgentState::BackingOff as i32,
    )
    .await;
    // Spawn answers once everything written before it is on disk.
    spawn(&mut client, "flush", vec!["true".into()]).await;
    drop(client);

    let daemon = Daemon::builder().dir(daemon.crash()).start().await;
    let mut client = daemon.client().await;
    let after = status(&mut client, "phoenix").await;
    assert_eq!(after.state, AgentState::BackingOff as i32);
    assert_eq!(after.restart_count, 1);
    assert_eq!(
        after.next_restart_at, before.next_restart_at,
        "the backoff did not carry over"
    );
    let restarted = wait_for(&mut client, "phoenix", "restarted by the new daemon", |s| {
        s.restart_count == 2
    })
    .await;
    let due = system_time(before.next_restart_at.as_ref());
    assert!(SystemTime::now() >= due);
    assert!(restarted.last_exit_code == Some(1));
    stop(&mut client, &["phoenix"], true).await;
}
