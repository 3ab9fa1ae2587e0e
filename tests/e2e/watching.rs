//! The WatchAgents event stream.

use agentd_proto::v1 as pb;
use pb::{AgentState, EventKind};

use crate::harness::*;

#[tokio::test]
async fn watchers_get_every_lifecycle_event_in_order() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let lifecycle = [
        EventKind::Spawned,
        EventKind::Exited,
        EventKind::Failed,
        EventKind::Stopping,
        EventKind::Killed,
    ];
    // The call returns once the daemon has subscribed, so nothing after it is missed.
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            kinds: lifecycle.iter().map(|k| *k as i32).collect(),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    spawn(&mut client, "quick", vec!["true".into()]).await;
    spawn(&mut client, "crash", sh("exit 4")).await;
    spawn(&mut client, "sleeper", vec!["sleep".into(), "300".into()]).await;
    stop(&mut client, &["sleeper"], false).await;

    let mut seen = Vec::new();
    let mut last_sequence = 0;
    while seen.len() < 7 {
        let event = next_event(&mut events).await;
        assert!(
            event.sequence > last_sequence,
            "sequence went back: {event:?}"
        );
        last_sequence = event.sequence;
        let status = event.status.expect("status on every event");
        assert_eq!(status.agent_id, event.agent_id);
        seen.push((
            event.agent_id,
            EventKind::try_from(event.kind).expect("kind"),
            status.state,
        ));
    }
    let of = |agent: &str| -> Vec<(EventKind, i32)> {
        seen.iter()
            .filter(|(id, _, _)| id == agent)
            .map(|(_, kind, state)| (*kind, *state))
            .collect()
    };
    let running = AgentState::Running as i32;
    assert_eq!(
        of("quick"),
        [
            (EventKind::Spawned, running),
            (EventKind::Exited, AgentState::Completed as i32)
        ]
    );
    assert_eq!(
        of("crash"),
        [
            (EventKind::Spawned, running),
            (EventKind::Failed, AgentState::Failed as i32)
        ]
    );
    assert_eq!(
        of("sleeper"),
        [
            (EventKind::Spawned, running),
            (EventKind::Stopping, AgentState::Stopping as i32),
            (EventKind::Killed, AgentState::Killed as i32),
        ]
    );
}

#[tokio::test]
async fn a_snapshot_comes_first_then_filtered_health_samples() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let spawned = spawn(&mut client, "watched", vec!["sleep".into(), "300".into()]).await;
    spawn(&mut client, "other", vec!["sleep".into(), "300".into()]).await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["watched".into()],
            kinds: vec![EventKind::Health as i32],
            include_snapshot: true,
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let snapshot = next_event(&mut events).await;
    assert_eq!(snapshot.kind, EventKind::Snapshot as i32);
    assert_eq!(snapshot.agent_id, "watched");
    assert_eq!(snapshot.status.as_ref().map(|s| s.pid), Some(spawned.pid));

    for _ in 0..3 {
        let sample = next_event(&mut events).await;
        assert_eq!(sample.kind, EventKind::Health as i32);
        assert_eq!(sample.agent_id, "watched");
        assert!(sample.sequence > snapshot.sequence);
        let status = sample.status.expect("status");
        assert!(
            status.memory_mb > 0.0 && status.num_threads >= 1,
            "{status:?}"
        );
    }
    stop(&mut client, &["watched", "other"], true).await;
}
