//! What a user hits when things go wrong: odd process names, a daemon killed mid-work, a
//! supervisor that breaks. agentd must come back knowing every process it started, and must
//! never limp on.

use agentd_proto::v1 as pb;
use pb::AgentState;

use crate::harness::*;

/// The kernel cuts a process name at 15 bytes, here in the middle of a Cyrillic letter.
#[tokio::test]
async fn an_agent_with_a_non_ascii_name_is_sampled_adopted_and_stopped() {
    let daemon = Daemon::start().await;
    let program = daemon.dir.path().join("ai-агент-исследователь");
    std::fs::copy("/bin/sleep", &program).expect("copy sleep");
    let mut client = daemon.client().await;
    let mut request = spawn_request(
        "researcher",
        vec![program.display().to_string(), "300".into()],
    );
    request.restart_policy = pb::RestartPolicy::OnFailure as i32;
    let spawned = spawn_with(&mut client, request).await;
    wait_for(&mut client, "researcher", "sampled", |s| {
        s.memory_mb > 0.0 && s.num_threads == 1 && s.num_processes == 1
    })
    .await;
    drop(client);

    let daemon = Daemon::builder().dir(daemon.crash()).start().await;
    let mut client = daemon.client().await;
    let adopted = status(&mut client, "researcher").await;
    assert_eq!(
        (adopted.state, adopted.pid, adopted.adopted),
        (AgentState::Running as i32, spawned.pid, true),
        "{adopted:#?}"
    );
    assert_eq!(
        running_copies_of(&program),
        [spawned.pid as i32],
        "exactly one copy runs after the restart"
    );
    kill_all(&mut client).await;
    assert!(!process_exists(spawned.pid as i32), "the agent is stopped");
}

#[tokio::test]
async fn a_panicking_supervisor_makes_the_daemon_exit_non_zero() {
    let mut daemon = Daemon::builder()
        .options(&[])
        .env(&[("AGENTD_TEST_PANIC", "supervisor")])
        .start()
        .await;
    let mut client = daemon.client().await;
    let refused = client
        .spawn(spawn_request("a", vec!["sleep".into(), "300".into()]))
        .await
        .expect_err("the supervisor panics on a spawn");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let exit = daemon.wait_exit("after its supervisor panicked").await;
    assert!(!exit.success(), "agentd exited with {exit}");
    assert!(daemon.log().contains("supervisor stopped unexpectedly"));
}

#[tokio::test]
async fn a_panicking_sampler_makes_the_daemon_exit_non_zero() {
    let mut daemon = Daemon::builder()
        .options(&[])
        .env(&[("AGENTD_TEST_PANIC", "sampler")])
        .start()
        .await;
    let mut client = daemon.client().await;
    // The sampler only panics once it has an agent to sample.
    spawn(&mut client, "a", vec!["sleep".into(), "300".into()]).await;
    let exit = daemon.wait_exit("after its sampler panicked").await;
    assert!(!exit.success(), "agentd exited with {exit}");
    assert!(daemon.log().contains("the sampler thread panicked"));
}

/// Live processes running `program`.
fn running_copies_of(program: &std::path::Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            process_exists(pid)
                && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == program)
        })
        .collect()
}

/// 8 clients spawn as fast as they can and agentd is killed with SIGKILL while spawns are
/// in flight. After the restart every acknowledged agent runs once, and no process agentd
/// started runs unknown to it.
#[tokio::test]
async fn a_crash_during_a_spawn_storm_leaves_no_unknown_process() {
    let daemon = Daemon::start().await;
    let client = daemon.client().await;
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut storm = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (mut client, acknowledged) = (client.clone(), acknowledged.clone());
        storm.spawn(async move {
            for n in 0.. {
                let request = spawn_request(
                    &format!("w{worker}-{n}"),
                    vec!["sleep".into(), "300".into()],
                );
                match client.spawn(request).await {
                    Ok(answer) => {
                        let status = answer.into_inner().status.expect("status");
                        if let Ok(mut acknowledged) = acknowledged.lock() {
                            acknowledged.push((status.agent_id, status.pid));
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
    eventually("200 spawns are acknowledged", async || {
        acknowledged.lock().is_ok_and(|a| a.len() >= 200)
    })
    .await;
    let dir = daemon.crash();
    while storm.join_next().await.is_some() {}
    let acknowledged = acknowledged.lock().expect("lock").clone();

    let daemon = Daemon::builder().dir(dir).start().await;
    let mut client = daemon.client().await;
    let agents = client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents;
    for (agent_id, pid) in &acknowledged {
        let agent = agents.iter().find(|a| &a.agent_id == agent_id);
        assert!(
            agent.is_some_and(|a| a.state == AgentState::Running as i32 && a.pid == *pid),
            "acknowledged agent {agent_id} (pid {pid}) is not running as it was: {agent:#?}"
        );
    }
    let known: std::collections::HashSet<i32> = agents
        .iter()
        .filter(|a| a.state == AgentState::Running as i32)
        .map(|a| a.pid as i32)
        .collect();
    eventually(
        "every process agentd started is one of its running agents",
        async || {
            agents_under(&daemon.data_dir)
                .iter()
                .all(|pid| known.contains(pid))
        },
    )
    .await;
    kill_all(&mut client).await;
    let left = agents_under(&daemon.data_dir);
    assert!(left.is_empty(), "still running after cleanup: {left:?}");
}

/// The keeper stays the parent of every agent across a daemon crash, so an exit while agentd
/// is down, and one after it came back, are both known exactly.
#[tokio::test]
async fn exits_while_agentd_is_down_and_after_it_returns_are_reported_exactly() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let three = sh("trap 'exit 3' USR1; echo ready; while :; do sleep 0.05; done");
    let three = spawn(&mut client, "exits-3", three).await;
    let victim = spawn(&mut client, "victim", vec!["sleep".into(), "300".into()]).await;
    let stdout = std::path::Path::new(&three.agent_dir).join("stdout.log");
    eventually("the trap is set", async || {
        std::fs::read_to_string(&stdout).is_ok_and(|out| out.contains("ready"))
    })
    .await;
    drop(client);

    let dir = daemon.crash();
    kill(Pid::from_raw(three.pid as i32), Signal::SIGUSR1).expect("signal the agent");
    eventually("it exited while agentd was down", async || {
        !process_exists(three.pid as i32)
    })
    .await;

    let daemon = Daemon::builder().dir(dir).start().await;
    let mut client = daemon.client().await;
    let three = status(&mut client, "exits-3").await;
    assert_eq!(
        (three.state, three.exit_code, three.end_reason),
        (
            AgentState::Failed as i32,
            Some(3),
            pb::EndReason::Exited as i32
        ),
        "{three:#?}"
    );
    let adopted = status(&mut client, "victim").await;
    assert!(adopted.adopted && adopted.process_alive);
    kill(Pid::from_raw(victim.pid as i32), Signal::SIGKILL).expect("kill the adopted agent");
    let killed = wait_for(&mut client, "victim", "ended", |s| !s.process_alive).await;
    assert_eq!(
        (killed.state, killed.exit_signal, killed.end_reason),
        (
            AgentState::Failed as i32,
            Some(9),
            pb::EndReason::Signaled as i32
        ),
        "an adopted agent killed by a signal never ends COMPLETED: {killed:#?}"
    );
}
