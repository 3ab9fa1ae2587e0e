//! The stop ladder, process groups and concurrent stops.

use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use pb::{AgentState, StopOutcome};

use crate::harness::*;

/// Waits until the agent created `ready` in its folder: its traps are set.
async fn wait_ready(agent: &pb::AgentStatus) {
    let ready = std::path::Path::new(&agent.agent_dir).join("ready");
    eventually("the agent set its traps", async || ready.exists()).await;
}

fn with_quick_ladder(agent_id: &str, command: Vec<String>) -> pb::SpawnRequest {
    pb::SpawnRequest {
        stop_policy: quick_ladder(),
        ..spawn_request(agent_id, command)
    }
}

#[tokio::test]
async fn an_agent_that_exits_on_sigterm_stops_at_once() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "polite", vec!["sleep".into(), "300".into()]).await;
    let [result] = stop(&mut client, &["polite"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::ExitedOnFirstSignal as i32);
    assert_eq!(result.exit_signal, Some(15));
    assert!(seconds(result.duration.as_ref()) < 5.0, "{result:?}");
    let status = status(&mut client, "polite").await;
    assert_eq!(status.state, AgentState::Killed as i32);

    let [again] = stop(&mut client, &["polite"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(again.outcome, StopOutcome::AlreadyExited as i32);
    assert_eq!(again.exit_signal, Some(15));
}

#[tokio::test]
async fn an_agent_that_ignores_sigterm_is_escalated_to_sigkill() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let request = with_quick_ladder(
        "stubborn",
        sh("trap '' TERM; touch ready; while :; do sleep 0.05; done"),
    );
    wait_ready(&spawn_with(&mut client, request).await).await;
    let [result] = stop(&mut client, &["stubborn"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::Killed as i32);
    assert_eq!(result.exit_signal, Some(9));
    let took = seconds(result.duration.as_ref());
    assert!(
        (0.55..5.0).contains(&took),
        "took {took}s for a 0.3s + 0.3s ladder"
    );
}

#[tokio::test]
async fn an_agent_that_needs_the_second_sigterm_is_escalated() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The first SIGTERM only resets the trap; the second one ends the shell.
    let request = with_quick_ladder(
        "second",
        sh("trap 'trap - TERM' TERM; touch ready; while :; do sleep 0.05; done"),
    );
    wait_ready(&spawn_with(&mut client, request).await).await;
    let [result] = stop(&mut client, &["second"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::Escalated as i32, "{result:?}");
    assert_eq!(result.exit_signal, Some(15));
}

#[tokio::test]
async fn a_lingering_child_keeps_the_ladder_going_and_dies_with_its_agent() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The leader exits on SIGTERM; its child ignores SIGTERM and must be killed too.
    let request = with_quick_ladder(
        "family",
        sh(
            "sh -c 'trap \"\" TERM; echo $$ > child.pid; while :; do sleep 0.05; done' & \
            exec sleep 300",
        ),
    );
    let spawned = spawn_with(&mut client, request).await;
    let pid_file = std::path::Path::new(&spawned.agent_dir).join("child.pid");
    eventually("the child wrote its pid", async || {
        std::fs::read_to_string(&pid_file).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    let child: i32 = std::fs::read_to_string(&pid_file)
        .expect("child.pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(process_exists(child));

    let [result] = stop(&mut client, &["family"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::Killed as i32, "{result:?}");
    // The leader itself went on the first SIGTERM.
    assert_eq!(result.exit_signal, Some(15));
    assert!(!process_exists(child), "the child outlived its agent");
}

#[tokio::test]
async fn force_kills_at_once() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "forced", sh("trap '' TERM; exec sleep 300")).await;
    let [result] = stop(&mut client, &["forced"], true)
        .await
        .try_into()
        .expect("one");
    assert_eq!(result.outcome, StopOutcome::Killed as i32);
    assert_eq!(result.exit_signal, Some(9));
    assert!(seconds(result.duration.as_ref()) < 2.0);
}

#[tokio::test]
async fn many_stubborn_agents_stop_in_about_one_ladder() {
    const AGENTS: usize = 100;
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let request = with_quick_ladder(
            &format!("stubborn-{i}"),
            sh("trap '' TERM; touch ready; exec sleep 300"),
        );
        agents.push(spawn_with(&mut client, request).await);
    }
    for agent in &agents {
        wait_ready(agent).await;
    }
    let started = Instant::now();
    let results = client
        .cleanup(pb::CleanupRequest {
            all: true,
            ..Default::default()
        })
        .await
        .expect("cleanup all")
        .into_inner()
        .results;
    let took = started.elapsed();
    assert_eq!(results.len(), AGENTS);
    assert!(
        results
            .iter()
            .all(|r| r.outcome == StopOutcome::Killed as i32)
    );
    // One ladder is 0.6 s; one after another would be a minute.
    assert!(
        took < Duration::from_secs(20),
        "stopping {AGENTS} agents took {took:?}"
    );
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.killed as usize, AGENTS);
}
