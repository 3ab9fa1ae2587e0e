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

/// `EVENT_VIEW_FIGURES`: health samples carry the figures a table shows and nothing else,
/// beside a watcher of the whole status on the same events; the snapshot and lifecycle
/// events stay whole. An unknown view is refused.
#[tokio::test]
async fn a_figures_view_trims_health_samples_only() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let watch = |view: pb::EventView| pb::WatchAgentsRequest {
        agent_ids: vec!["counted".into()],
        kinds: vec![EventKind::Health as i32, EventKind::Killed as i32],
        include_snapshot: true,
        view: view.into(),
        ..Default::default()
    };
    let spawned = spawn(&mut client, "counted", vec!["sleep".into(), "300".into()]).await;
    let mut whole = client
        .watch_agents(watch(pb::EventView::Full))
        .await
        .expect("watch")
        .into_inner();
    let mut figures = client
        .watch_agents(watch(pb::EventView::Figures))
        .await
        .expect("watch")
        .into_inner();
    for events in [&mut whole, &mut figures] {
        let snapshot = next_event(events).await.status.expect("status");
        assert_eq!((snapshot.pid, snapshot.cmdline.len()), (spawned.pid, 2));
    }
    // The whole watcher subscribed first: it may have a sample more.
    let figures_sample = next_event(&mut figures).await;
    let whole_sample = loop {
        let event = next_event(&mut whole).await;
        if event.sequence >= figures_sample.sequence {
            break event;
        }
    };
    assert_eq!(whole_sample.sequence, figures_sample.sequence);
    assert_eq!(figures_sample.kind, EventKind::Health as i32);
    let (all, some) = (
        whole_sample.status.expect("status"),
        figures_sample.status.expect("status"),
    );
    assert!(some.memory_mb > 0.0 && some.num_threads >= 1, "{some:?}");
    assert_eq!(
        (
            some.agent_id.as_str(),
            some.state,
            some.memory_mb,
            some.process_status.as_str()
        ),
        (
            all.agent_id.as_str(),
            all.state,
            all.memory_mb,
            all.process_status.as_str()
        )
    );
    let trimmed = pb::AgentStatus {
        agent_id: all.agent_id.clone(),
        state: all.state,
        process_alive: all.process_alive,
        process_status: all.process_status.clone(),
        cpu_percent: all.cpu_percent,
        memory_mb: all.memory_mb,
        peak_memory_mb: all.peak_memory_mb,
        cpu_seconds: all.cpu_seconds,
        runtime_seconds: all.runtime_seconds,
        num_threads: all.num_threads,
        num_processes: all.num_processes,
        health: all.health,
        health_reason: all.health_reason.clone(),
        progress: all.progress,
        progress_message: all.progress_message.clone(),
        egress: all.egress,
        denials: all.denials,
        spend: all.spend.clone(),
        tree_spend: all.tree_spend,
        budget: all.budget,
        budget_reached: all.budget_reached.clone(),
        ..Default::default()
    };
    assert_eq!(some, trimmed, "only the figures");
    assert!(
        prost::Message::encoded_len(&some) * 2 < prost::Message::encoded_len(&all),
        "{some:?} against {all:?}"
    );

    stop(&mut client, &["counted"], true).await;
    let killed = loop {
        let event = next_event(&mut figures).await;
        if event.kind == EventKind::Killed as i32 {
            break event;
        }
    };
    assert_eq!(
        killed.status.expect("status").cmdline.len(),
        2,
        "lifecycle events stay whole"
    );

    let refused = client
        .watch_agents(pb::WatchAgentsRequest {
            view: 7,
            ..Default::default()
        })
        .await
        .expect_err("an unknown view");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("view"), "{}", refused.message());
}

/// With `EVENT_VIEW_FIGURES`, a HEALTH sample comes only when an agent's figures changed (a
/// busy agent's every round, an idle one's next to never); one that resumes gets every
/// agent's status as of now after the replay. A whole-status watcher, or one with a
/// `health_interval`, gets every agent's sample every round, and while one is subscribed, so
/// does everyone.
#[tokio::test]
async fn a_figures_view_gets_only_the_samples_that_changed() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "idle", vec!["sleep".into(), "300".into()]).await;
    spawn(&mut client, "busy", sh("while :; do :; done")).await;
    let watch = |view: pb::EventView| pb::WatchAgentsRequest {
        agent_ids: vec!["idle".into(), "busy".into()],
        kinds: vec![EventKind::Health as i32],
        view: view.into(),
        ..Default::default()
    };
    let mut figures = client
        .watch_agents(watch(pb::EventView::Figures))
        .await
        .expect("watch")
        .into_inner();
    // Samples of each until `agent` has had `rounds` (the daemon samples every 100 ms).
    async fn count(
        events: &mut tonic::Streaming<pb::AgentEvent>,
        agent: &str,
        rounds: usize,
    ) -> [usize; 2] {
        let mut seen = [0, 0];
        while seen[usize::from(agent == "busy")] < rounds {
            let event = next_event(events).await;
            let id = event.status.expect("status").agent_id;
            seen[usize::from(id == "busy")] += 1;
        }
        seen
    }
    // The idle agent's first ones may differ (its start, a memory reading taken again).
    let [idle, _] = count(&mut figures, "busy", 20).await;
    assert!(idle <= 2, "{idle} samples of an idle agent in 20 rounds");
    // A watcher that resumes gets, after the replay, every agent's status as of now: the
    // idle agent's figures, which no sample will tell again.
    let mut later = client
        .watch_agents(pb::WatchAgentsRequest {
            after_sequence: Some(0),
            ..watch(pb::EventView::Figures)
        })
        .await
        .expect("watch")
        .into_inner();
    let current = loop {
        let event = next_event(&mut later).await;
        if event.kind == EventKind::Snapshot as i32 && event.agent_id == "idle" {
            break event.status.expect("status");
        }
    };
    assert!(
        current.memory_mb > 0.0 && current.cmdline.len() == 2,
        "{current:?}"
    );
    drop(later);

    // An interval thins the samples: a change dropped would never be seen, so every
    // round comes, as to a whole-status watcher.
    let mut thinned = client
        .watch_agents(pb::WatchAgentsRequest {
            health_interval: Some(std::time::Duration::from_millis(1).into()),
            ..watch(pb::EventView::Figures)
        })
        .await
        .expect("watch")
        .into_inner();
    count(&mut thinned, "idle", 5).await;
    drop(thinned);
    let mut whole = client
        .watch_agents(watch(pb::EventView::Full))
        .await
        .expect("watch")
        .into_inner();
    let [_, busy] = count(&mut whole, "idle", 5).await;
    assert!(busy >= 4, "{busy}");
    // Every round now reaches the figures watcher too.
    count(&mut figures, "idle", 5).await;
    stop(&mut client, &["idle", "busy"], true).await;
}
