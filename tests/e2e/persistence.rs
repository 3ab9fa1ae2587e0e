//! Records survive the daemon: a crash keeps every record, re-adopts running agents and
//! learns how every agent that ended meanwhile ended; a SIGTERM stops every agent and exits
//! cleanly.

use agentd_proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pb::{AgentState, StopOutcome};

use crate::harness::*;

#[tokio::test]
async fn a_crashed_daemon_keeps_records_and_adopts_running_agents() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "done", sh("exit 3")).await;
    wait_for_state(&mut client, "done", AgentState::Failed).await;
    // Spawn answers once its record and every earlier write are on disk.
    let survivor = spawn(&mut client, "survivor", vec!["sleep".into(), "300".into()]).await;
    let victim = spawn(&mut client, "victim", vec!["sleep".into(), "300".into()]).await;
    drop(client);

    let dir = daemon.crash();
    assert!(
        process_exists(survivor.pid as i32),
        "agents outlive a crashed daemon"
    );
    kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).expect("kill victim");
    eventually("the victim is gone", async || {
        !process_exists(victim.pid as i32)
    })
    .await;

    let daemon = Daemon::builder().dir(dir).start().await;
    let mut client = daemon.client().await;
    let adopted = status(&mut client, "survivor").await;
    assert_eq!(adopted.state, AgentState::Running as i32);
    assert_eq!(adopted.pid, survivor.pid);
    assert!(adopted.adopted && adopted.process_alive);
    // It was killed while agentd was down, and its keeper saw how.
    let victim = status(&mut client, "victim").await;
    assert_eq!(
        (victim.state, victim.exit_signal, victim.end_reason),
        (
            AgentState::Failed as i32,
            Some(9),
            pb::EndReason::Signaled as i32
        ),
        "{victim:#?}"
    );
    let done = status(&mut client, "done").await;
    assert_eq!(
        (done.state, done.exit_code),
        (AgentState::Failed as i32, Some(3))
    );

    wait_for(&mut client, "survivor", "sampled after adoption", |s| {
        s.memory_mb > 0.0
    })
    .await;
    let [result] = stop(&mut client, &["survivor"], false)
        .await
        .try_into()
        .expect("one");
    assert_eq!(
        result.outcome,
        StopOutcome::ExitedOnFirstSignal as i32,
        "{result:?}"
    );
    // An adopted agent's exit status comes from its keeper.
    assert_eq!(result.exit_code, Some(128 + 15));
    assert!(!process_exists(survivor.pid as i32));
}

#[tokio::test]
async fn sigterm_stops_every_agent_and_exits_zero() {
    let mut daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let agent = spawn(&mut client, "worker", vec!["sleep".into(), "300".into()]).await;
    drop(client);
    let exit = daemon.terminate().await;
    assert!(exit.success(), "agentd exited with {exit}");
    assert!(!process_exists(agent.pid as i32));
    assert!(!daemon.socket.exists(), "the socket is removed on exit");
    eventually("the keeper left with nothing to keep", async || {
        keeper_of(&daemon.data_dir).is_none()
    })
    .await;

    let daemon = Daemon::builder().dir(daemon.crash()).start().await;
    let mut client = daemon.client().await;
    let stopped = status(&mut client, "worker").await;
    assert_eq!(stopped.state, AgentState::Killed as i32);
    assert_eq!(stopped.exit_signal, Some(15));
}
