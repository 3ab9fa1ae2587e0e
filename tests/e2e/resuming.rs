//! A stream dashboards can trust: resume without gaps or duplicates, OUT_OF_RANGE past the
//! log, sequences that survive restarts, slow watchers ended without hurting anyone.

use std::time::Duration;

use agentd_proto::v1 as pb;
use pb::EventKind;
use tonic::Code;

use crate::harness::*;

const LIFECYCLE: [EventKind; 5] = [
    EventKind::Spawned,
    EventKind::Exited,
    EventKind::Failed,
    EventKind::Stopping,
    EventKind::Killed,
];

fn lifecycle_watch(after_sequence: Option<u64>) -> pb::WatchAgentsRequest {
    pb::WatchAgentsRequest {
        kinds: LIFECYCLE.iter().map(|k| *k as i32).collect(),
        after_sequence,
        ..Default::default()
    }
}

async fn watch(
    client: &mut Client,
    request: pb::WatchAgentsRequest,
) -> tonic::Streaming<pb::AgentEvent> {
    client
        .watch_agents(request)
        .await
        .expect("watch")
        .into_inner()
}

/// Reads events until one of `kind` for `agent_id` arrives; returns all read.
async fn read_until(
    events: &mut tonic::Streaming<pb::AgentEvent>,
    agent_id: &str,
    kind: EventKind,
) -> Vec<(u64, String, i32)> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(events).await;
        let done = event.agent_id == agent_id && event.kind == kind as i32;
        seen.push((event.sequence, event.agent_id, event.kind));
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_resumed_watch_gets_exactly_the_missed_events_then_live_ones() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // One watcher stays connected throughout: it is the record of what happened.
    let mut witness = watch(&mut client, lifecycle_watch(None)).await;
    let mut leaving = watch(&mut client, lifecycle_watch(None)).await;
    spawn(&mut client, "first", vec!["sleep".into(), "300".into()]).await;
    let last_seen = next_event(&mut leaving).await.sequence;
    drop(leaving);

    spawn(&mut client, "second", vec!["true".into()]).await;
    spawn(&mut client, "third", vec!["sleep".into(), "300".into()]).await;
    stop(&mut client, &["third", "first"], false).await;
    spawn(&mut client, "fourth", sh("exit 2")).await;
    let happened = read_until(&mut witness, "fourth", EventKind::Failed).await;
    let missed: Vec<_> = happened
        .into_iter()
        .filter(|(seq, _, _)| *seq > last_seen)
        .collect();
    assert!(missed.len() >= 9, "{missed:?}");

    let mut resumed = watch(&mut client, lifecycle_watch(Some(last_seen))).await;
    let mut replayed = Vec::new();
    while replayed.len() < missed.len() {
        let event = next_event(&mut resumed).await;
        replayed.push((event.sequence, event.agent_id, event.kind));
    }
    assert_eq!(replayed, missed, "the replay differs from what happened");
    // Then live, with nothing repeated at the seam.
    spawn(&mut client, "fifth", vec!["true".into()]).await;
    let live = next_event(&mut resumed).await;
    assert_eq!(
        (live.agent_id.as_str(), live.kind),
        ("fifth", EventKind::Spawned as i32)
    );
    assert!(live.sequence > replayed.last().expect("replayed").0);
}

#[tokio::test]
async fn resuming_from_a_trimmed_or_unknown_sequence_is_out_of_range() {
    let daemon = Daemon::builder()
        .options(&["--event-retention-count", "3"])
        .start()
        .await;
    let mut client = daemon.client().await;
    for i in 0..4 {
        let id = format!("short-{i}");
        spawn(&mut client, &id, vec!["true".into()]).await;
        wait_for_state(&mut client, &id, pb::AgentState::Completed).await;
    }
    for after in [1, 1_000_000] {
        let error = client
            .watch_agents(lifecycle_watch(Some(after)))
            .await
            .expect_err("out of range");
        assert_eq!(error.code(), Code::OutOfRange, "{}", error.message());
        assert!(
            error.message().contains("include_snapshot"),
            "{}",
            error.message()
        );
    }
    let both = client
        .watch_agents(pb::WatchAgentsRequest {
            include_snapshot: true,
            after_sequence: Some(1),
            ..Default::default()
        })
        .await
        .expect_err("snapshot and resume together");
    assert_eq!(both.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn sequences_keep_increasing_across_a_restart() {
    let mut daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut events = watch(&mut client, lifecycle_watch(None)).await;
    spawn(&mut client, "before", vec!["true".into()]).await;
    let before = read_until(&mut events, "before", EventKind::Exited).await;
    let last_before = before.last().expect("events").0;
    drop((events, client));
    assert!(daemon.terminate().await.success());

    let daemon = Daemon::builder().dir(daemon.crash()).start().await;
    let mut client = daemon.client().await;
    // The log survived: a resume from before the restart still works.
    let mut replay = watch(&mut client, lifecycle_watch(Some(0))).await;
    let replayed = read_until(&mut replay, "before", EventKind::Exited).await;
    assert_eq!(replayed, before);

    let mut events = watch(&mut client, lifecycle_watch(None)).await;
    spawn(&mut client, "after", vec!["true".into()]).await;
    let after = next_event(&mut events).await;
    assert_eq!(after.agent_id, "after");
    assert!(
        after.sequence > last_before,
        "{} after {last_before}",
        after.sequence
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_never_reads_is_ended_and_the_rest_see_everything() {
    const READERS: usize = 49;
    const AGENTS: usize = 100;
    const HEALTH_EVENTS: usize = 3000;
    let daemon = Daemon::builder()
        .options(&["--watch-buffer", "32"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let mut readers = Vec::new();
    for _ in 0..READERS {
        // Each watcher on its own connection, as separate dashboards would be.
        let mut own = daemon.client().await;
        let mut events = watch(&mut own, lifecycle_watch(None)).await;
        readers.push(tokio::spawn(async move {
            read_until(&mut events, "marker", EventKind::Exited).await
        }));
    }
    // A client that never reads, with a small HTTP/2 window so the daemon feels it soon.
    let stuck_channel =
        tonic::transport::Endpoint::from_shared(format!("unix://{}", daemon.socket.display()))
            .expect("endpoint")
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .expect("connect");
    let mut stuck = watch(
        &mut Client::new(stuck_channel),
        pb::WatchAgentsRequest::default(),
    )
    .await;
    // Counts health samples as they are published, so the test knows how much the stuck
    // watcher was offered.
    let mut counter = watch(
        &mut daemon.client().await,
        pb::WatchAgentsRequest {
            kinds: vec![EventKind::Health as i32],
            ..Default::default()
        },
    )
    .await;

    for i in 0..AGENTS {
        spawn(
            &mut client,
            &format!("busy-{i}"),
            vec!["sleep".into(), "300".into()],
        )
        .await;
    }
    for _ in 0..HEALTH_EVENTS {
        next_event(&mut counter).await;
    }
    client
        .cleanup(pb::CleanupRequest {
            all: true,
            ..Default::default()
        })
        .await
        .expect("cleanup");
    spawn(&mut client, "marker", vec!["true".into()]).await;

    let mut seen_by_all = None;
    for reader in readers {
        let seen = reader.await.expect("reader");
        let killed = seen
            .iter()
            .filter(|e| e.2 == EventKind::Killed as i32)
            .count();
        assert_eq!(killed, AGENTS);
        match &seen_by_all {
            None => seen_by_all = Some(seen),
            Some(first) => assert_eq!(&seen, first, "two readers saw different streams"),
        }
    }

    // The stuck watcher, once it reads, finds it was ended and where to resume from.
    let ended = tokio::time::timeout(DEADLINE, async {
        loop {
            match stuck.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stuck watcher's stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stuck watcher was ended");
    assert_eq!(ended.code(), Code::ResourceExhausted, "{}", ended.message());
    assert_eq!(reason(&ended).as_deref(), Some("WATCHER_TOO_SLOW"));
    assert!(
        ended.message().contains("after_sequence"),
        "{}",
        ended.message()
    );
    let status = status(&mut client, "marker").await;
    assert_eq!(status.state, pb::AgentState::Completed as i32);
}

#[tokio::test]
async fn health_samples_can_be_limited_or_turned_off_per_watcher() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let request = |interval: Option<Duration>| pb::WatchAgentsRequest {
        agent_ids: vec!["sampled".into()],
        health_interval: interval.map(Into::into),
        ..Default::default()
    };
    let mut every = watch(&mut client, request(None)).await;
    let mut limited = watch(&mut client, request(Some(Duration::from_secs(60)))).await;
    let mut none = watch(&mut client, request(Some(Duration::ZERO))).await;
    spawn(&mut client, "sampled", vec!["sleep".into(), "300".into()]).await;
    let mut samples = 0;
    while samples < 5 {
        if next_event(&mut every).await.kind == EventKind::Health as i32 {
            samples += 1;
        }
    }
    stop(&mut client, &["sampled"], false).await;
    let kinds =
        |seen: Vec<(u64, String, i32)>| -> Vec<i32> { seen.into_iter().map(|e| e.2).collect() };
    let limited = kinds(read_until(&mut limited, "sampled", EventKind::Killed).await);
    let health = EventKind::Health as i32;
    assert_eq!(
        limited.iter().filter(|k| **k == health).count(),
        1,
        "{limited:?}"
    );
    let none = kinds(read_until(&mut none, "sampled", EventKind::Killed).await);
    assert!(!none.contains(&health), "{none:?}");
    assert_eq!(
        none,
        [
            EventKind::Spawned as i32,
            EventKind::Stopping as i32,
            EventKind::Killed as i32
        ]
    );
}
