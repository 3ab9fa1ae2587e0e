//! Health that means something for agents: heartbeats, stalls, memory and CPU thresholds.

use std::time::Duration;

use agentd_proto::v1 as pb;
use pb::{EventKind, Health, HealthAction, HealthMetric};
use tonic::Code;

use crate::harness::*;

fn prost_duration(duration: Duration) -> Option<pbjson_types::Duration> {
    Some(duration.into())
}

fn with_health(agent_id: &str, command: Vec<String>, policy: pb::HealthPolicy) -> pb::SpawnRequest {
    pb::SpawnRequest {
        health_policy: Some(policy),
        ..spawn_request(agent_id, command)
    }
}

async fn watch_agent(client: &mut Client, agent_id: &str) -> tonic::Streaming<pb::AgentEvent> {
    client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec![agent_id.into()],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner()
}

/// Reads events until one of `kind` arrives, and returns it.
async fn wait_event(
    events: &mut tonic::Streaming<pb::AgentEvent>,
    kind: EventKind,
) -> pb::AgentEvent {
    tokio::time::timeout(DEADLINE, async {
        loop {
            let event = events.message().await.expect("stream").expect("open");
            if event.kind == kind as i32 {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event within the deadline"))
}

async fn report(
    client: &mut Client,
    request: pb::ReportProgressRequest,
) -> Result<pb::AgentStatus, tonic::Status> {
    client
        .report_progress(request)
        .await
        .map(|response| response.into_inner().status.expect("status"))
}

#[tokio::test]
async fn an_agent_that_stops_heartbeating_turns_stalled_in_time_and_recovers() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let timeout = Duration::from_millis(500);
    let policy = pb::HealthPolicy {
        heartbeat_timeout: prost_duration(timeout),
        ..Default::default()
    };
    let mut silent_events = watch_agent(&mut client, "silent").await;
    let mut beating_events = watch_agent(&mut client, "beating").await;
    // One agent heartbeats through its status file every 100 ms; the other never does.
    spawn_with(
        &mut client,
        with_health(
            "beating",
            sh(
                "while :; do echo '{\"progress\": 5}' > s.tmp; mv s.tmp \"$AGENTD_STATUS_FILE\"; \
                sleep 0.1; done",
            ),
            policy,
        ),
    )
    .await;
    let silent = spawn_with(
        &mut client,
        with_health("silent", vec!["sleep".into(), "300".into()], policy),
    )
    .await;

    let stalled = wait_event(&mut silent_events, EventKind::Stalled).await;
    let after = system_time(stalled.time.as_ref())
        .duration_since(system_time(silent.started_at.as_ref()))
        .expect("after the start");
    // Never before the timeout (how soon after is the machine's unit test's to check).
    assert!(after >= timeout, "stalled after {after:?}");
    let alert = stalled.alert.expect("alert");
    assert_eq!(alert.metric, HealthMetric::Heartbeat as i32);
    assert_eq!(alert.threshold, 0.5);
    assert!(alert.value > 0.5);
    let stalled_status = status(&mut client, "silent").await;
    assert_eq!(stalled_status.health, Health::Stalled as i32);
    let reason = &stalled_status.health_reason;
    assert!(reason.contains("no heartbeat"), "{reason}");
    assert!(stalled_status.health_since.is_some());

    // Meanwhile the one that heartbeats stays healthy: let a few more intervals pass.
    for _ in 0..5 {
        wait_event(&mut beating_events, EventKind::Health).await;
    }
    let beating = status(&mut client, "beating").await;
    assert_eq!(beating.health, Health::Healthy as i32, "{beating:?}");
    assert_eq!(beating.progress, 5.0);
    assert!(beating.last_heartbeat.is_some());

    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.stalled, 1);
    assert_eq!(summary.unhealthy.len(), 1);
    assert_eq!(summary.unhealthy[0].agent_id, "silent");
    assert!(summary.unhealthy[0].reason.contains("no heartbeat"));

    // A heartbeat over gRPC brings it back.
    let reported = report(
        &mut client,
        pb::ReportProgressRequest {
            agent_id: "silent".into(),
            progress: Some(10.0),
            message: "thinking".into(),
            details: [("step".to_string(), "plan".to_string())].into(),
        },
    )
    .await
    .expect("report");
    assert_eq!(reported.health, Health::Healthy as i32);
    assert_eq!(reported.progress, 10.0);
    assert_eq!(
        reported.progress_details.get("step").map(String::as_str),
        Some("plan")
    );
    let recovered = wait_event(&mut silent_events, EventKind::Recovered).await;
    assert!(
        recovered.message.contains("heartbeat"),
        "{}",
        recovered.message
    );
    stop(&mut client, &["silent", "beating"], true).await;
}

#[tokio::test]
async fn a_stall_can_stop_the_agent() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = watch_agent(&mut client, "hung").await;
    let policy = pb::HealthPolicy {
        heartbeat_timeout: prost_duration(Duration::from_millis(300)),
        on_stall: HealthAction::Stop as i32,
        ..Default::default()
    };
    spawn_with(
        &mut client,
        with_health("hung", vec!["sleep".into(), "300".into()], policy),
    )
    .await;
    let stalled = wait_event(&mut events, EventKind::Stalled).await;
    assert_eq!(
        stalled.alert.map(|a| a.action),
        Some(HealthAction::Stop as i32)
    );
    wait_event(&mut events, EventKind::Killed).await;
    let status = wait_for_state(&mut client, "hung", pb::AgentState::Killed).await;
    assert!(
        status.error.contains("stopped by agentd: no heartbeat"),
        "{}",
        status.error
    );
}

#[tokio::test]
async fn crossing_the_memory_threshold_alerts_and_stops_when_asked() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let hog = sh("exec python3 -c 'import time; x = b\"x\" * (120 << 20); time.sleep(300)'");
    let mut reported_events = watch_agent(&mut client, "reported").await;
    let mut stopped_events = watch_agent(&mut client, "stopped").await;
    let limit = |action: HealthAction| pb::HealthPolicy {
        memory_limit_mb: 60.0,
        on_memory_limit: action as i32,
        ..Default::default()
    };
    spawn_with(
        &mut client,
        with_health("reported", hog.clone(), limit(HealthAction::Report)),
    )
    .await;
    spawn_with(
        &mut client,
        with_health("stopped", hog, limit(HealthAction::Stop)),
    )
    .await;

    let alert = wait_event(&mut reported_events, EventKind::Alert).await;
    let measured = alert.alert.expect("alert");
    assert_eq!(measured.metric, HealthMetric::MemoryMb as i32);
    assert_eq!(measured.threshold, 60.0);
    assert!(measured.value > 60.0, "{measured:?}");
    let status = status(&mut client, "reported").await;
    assert_eq!(status.health, Health::OverLimit as i32);
    assert!(
        status.health_reason.contains("memory"),
        "{}",
        status.health_reason
    );
    assert_eq!(status.state, pb::AgentState::Running as i32);

    wait_event(&mut stopped_events, EventKind::Alert).await;
    wait_event(&mut stopped_events, EventKind::Killed).await;
    let stopped = wait_for_state(&mut client, "stopped", pb::AgentState::Killed).await;
    assert!(stopped.error.contains("memory"), "{}", stopped.error);
    stop(&mut client, &["reported"], true).await;
}

#[tokio::test]
async fn sustained_cpu_over_the_threshold_alerts() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = watch_agent(&mut client, "spinner").await;
    let policy = pb::HealthPolicy {
        cpu_limit_percent: 30.0,
        cpu_limit_samples: 3,
        ..Default::default()
    };
    spawn_with(
        &mut client,
        with_health("spinner", sh("while :; do :; done"), policy),
    )
    .await;
    let alert = wait_event(&mut events, EventKind::Alert).await;
    let measured = alert.alert.expect("alert");
    assert_eq!(measured.metric, HealthMetric::CpuPercent as i32);
    assert!(measured.value > 30.0, "{measured:?}");
    assert!(alert.message.contains("3 samples"), "{}", alert.message);
    stop(&mut client, &["spinner"], true).await;
}

#[tokio::test]
async fn bad_reports_and_policies_are_refused_and_change_nothing() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "steady", vec!["sleep".into(), "300".into()]).await;
    report(
        &mut client,
        pb::ReportProgressRequest {
            agent_id: "steady".into(),
            progress: Some(20.0),
            message: "ok".into(),
            ..Default::default()
        },
    )
    .await
    .expect("a good report");

    let base = pb::ReportProgressRequest {
        agent_id: "steady".into(),
        progress: Some(90.0),
        ..Default::default()
    };
    let bad = [
        pb::ReportProgressRequest {
            progress: Some(150.0),
            ..base.clone()
        },
        pb::ReportProgressRequest {
            message: "x".repeat(5000),
            ..base.clone()
        },
        pb::ReportProgressRequest {
            details: (0..65)
                .map(|i| (format!("k{i}"), "v".to_string()))
                .collect(),
            ..base.clone()
        },
    ];
    for request in bad {
        let error = report(&mut client, request).await.expect_err("refused");
        assert_eq!(error.code(), Code::InvalidArgument, "{}", error.message());
    }
    let unchanged = status(&mut client, "steady").await;
    assert_eq!(
        (unchanged.progress, unchanged.progress_message.as_str()),
        (20.0, "ok")
    );

    let unknown = report(
        &mut client,
        pb::ReportProgressRequest {
            agent_id: "nobody".into(),
            ..base.clone()
        },
    )
    .await
    .expect_err("unknown agent");
    assert_eq!(unknown.code(), Code::NotFound);
    spawn(&mut client, "finished", vec!["true".into()]).await;
    wait_for_state(&mut client, "finished", pb::AgentState::Completed).await;
    let ended = report(
        &mut client,
        pb::ReportProgressRequest {
            agent_id: "finished".into(),
            ..base
        },
    )
    .await
    .expect_err("ended agent");
    assert_eq!(ended.code(), Code::FailedPrecondition);

    for policy in [
        pb::HealthPolicy {
            on_stall: HealthAction::Restart as i32,
            heartbeat_timeout: prost_duration(Duration::from_secs(1)),
            ..Default::default()
        },
        pb::HealthPolicy {
            heartbeat_timeout: prost_duration(Duration::ZERO),
            ..Default::default()
        },
        pb::HealthPolicy {
            memory_limit_mb: -5.0,
            ..Default::default()
        },
    ] {
        let error = client
            .spawn(with_health("refused", vec!["true".into()], policy))
            .await
            .expect_err("bad policy");
        assert_eq!(error.code(), Code::InvalidArgument, "{}", error.message());
    }
    stop(&mut client, &["steady"], true).await;
}

#[tokio::test]
async fn an_ended_agent_still_says_what_its_run_cost() {
    // About 0.4 s of CPU and 64 MiB written, then a pause the sampler sees, then done.
    let script = "import time\n\
                  held = b'x' * (64 << 20)\n\
                  end = time.process_time() + 0.4\n\
                  while time.process_time() < end:\n    pass\n\
                  time.sleep(0.5)";
    for options in [&[][..], &["--cgroups", "off"]] {
        let daemon = Daemon::builder().options(options).start().await;
        let mut client = daemon.client().await;
        let command = vec!["python3".into(), "-c".into(), script.into()];
        spawn(&mut client, "busy", command).await;
        let ended = wait_for_state(&mut client, "busy", pb::AgentState::Completed).await;
        assert!(
            (0.35..5.0).contains(&ended.cpu_seconds),
            "{options:?}: cpu_seconds {}",
            ended.cpu_seconds
        );
        assert!(
            (60.0..1024.0).contains(&ended.peak_memory_mb),
            "{options:?}: peak_memory_mb {}",
            ended.peak_memory_mb
        );
    }
}
