//! Spawning, sampling, exits, reaping.

use agentd_proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pb::AgentState;
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn spawned_agent_runs_with_its_pid_and_live_samples() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // A busy loop, so CPU is measurably above zero.
    let spawned = spawn(&mut client, "busy", sh("while :; do :; done")).await;
    assert_eq!(spawned.state, AgentState::Running as i32);
    assert!(spawned.pid > 0 && process_exists(spawned.pid as i32));
    assert!(spawned.process_alive);
    // The first reading is taken at spawn, not a sampling interval later. (Its memory may
    // still read 0: the kernel folds a new process's per-CPU RSS counters lazily.)
    assert!(
        spawned.num_threads >= 1 && spawned.num_processes == 1 && spawned.health != 0,
        "{spawned:#?}"
    );
    assert_ne!(spawned.process_status, "unknown");

    let sampled = wait_for(&mut client, "busy", "sampled", |s| {
        s.cpu_percent > 0.0 && s.memory_mb > 0.0 && s.num_threads >= 1
    })
    .await;
    assert_eq!(sampled.pid, spawned.pid);
    assert_eq!(sampled.health, pb::Health::Healthy as i32);
    assert!(["running", "sleeping"].contains(&sampled.process_status.as_str()));
    assert_eq!(sampled.cmdline, sh("while :; do :; done"));
    assert!(!sampled.is_zombie);

    let health = client
        .check_health(pb::CheckHealthRequest {
            agent_id: "busy".into(),
        })
        .await
        .expect("check health")
        .into_inner();
    assert!(health.healthy);
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!((summary.total, summary.running), (1, 1));
    assert!(summary.total_memory_mb > 0.0);
    stop(&mut client, &["busy"], true).await;
}

#[tokio::test]
async fn many_spawns_in_flight_on_one_connection_all_answer() {
    let daemon = Daemon::start().await;
    let client = daemon.client().await;
    // Each Spawn answers after a flush; flushes that all ran at once used to take every one
    // of sled's I/O threads and never finish.
    let mut spawns = tokio::task::JoinSet::new();
    for i in 0..300 {
        let mut client = client.clone();
        spawns.spawn(async move {
            let sleeper = vec!["sleep".to_string(), "300".to_string()];
            spawn(&mut client, &format!("p{i}"), sleeper).await
        });
    }
    let answered = tokio::time::timeout(std::time::Duration::from_secs(30), spawns.join_all())
        .await
        .expect("every spawn answered");
    assert!(
        answered
            .iter()
            .all(|status| status.state == AgentState::Running as i32)
    );
    let mut client = client;
    kill_all(&mut client).await;
}

#[tokio::test]
async fn a_keeper_killed_under_a_spawn_storm_fails_the_spawns_and_agentd_exits() {
    let mut daemon = Daemon::start().await;
    let client = daemon.client().await;
    let sleeper = || vec!["sleep".to_string(), "300".to_string()];
    spawn(&mut client.clone(), "first", sleeper()).await;
    let keeper = keeper_of(&daemon.data_dir).expect("a keeper runs");
    let mut spawns = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut client = client.clone();
        let request = spawn_request(&format!("s{i}"), sleeper());
        spawns.spawn(async move { client.spawn(request).await.map(drop) });
    }
    kill(Pid::from_raw(keeper), Signal::SIGKILL).expect("kill the keeper");
    // Orders the keeper never answered fail; none waits forever.
    tokio::time::timeout(DEADLINE, spawns.join_all())
        .await
        .expect("every spawn answered");
    let exit = daemon.wait_exit("once its keeper is gone").await;
    assert!(!exit.success(), "{exit:?}");
}

#[tokio::test]
async fn processes_forked_under_an_idle_leader_are_counted_and_dropped() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The leader sleeps in `wait` throughout, so the sampler skips re-reading it: the tree
    // changes below it, where processes do run.
    spawn(
        &mut client,
        "deep",
        sh("( sleep 1; sleep 300 & sleep 300 & wait ) & wait"),
    )
    .await;
    wait_for(&mut client, "deep", "the grandchildren are counted", |s| {
        s.num_processes == 4
    })
    .await;
    let children = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default()
    };
    let leader = status(&mut client, "deep").await.pid;
    let subshell: u32 = children(leader)
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("the subshell");
    let grandchild: i32 = children(subshell)
        .split_whitespace()
        .next()
        .and_then(|pid| pid.parse().ok())
        .expect("a grandchild");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(grandchild),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill a grandchild");
    wait_for(
        &mut client,
        "deep",
        "the killed grandchild is dropped",
        |s| s.num_processes == 3,
    )
    .await;
    stop(&mut client, &["deep"], true).await;
}

#[tokio::test]
async fn cpu_of_worker_threads_counts_while_the_main_thread_waits() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // The main thread blocks in join() for good; only the worker thread runs.
    let script = "import threading\n\
        def spin():\n    while True: pass\n\
        worker = threading.Thread(target=spin)\n\
        worker.start()\n\
        worker.join()\n";
    spawn(
        &mut client,
        "threads",
        vec!["python3".into(), "-c".into(), script.into()],
    )
    .await;
    let mut samples = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["threads".into()],
            kinds: vec![pb::EventKind::Health as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // Every sample sees the worker burn CPU: not a few zeros and then a sample that adds them
    // all up. (On a loaded machine one 100 ms sample may still catch no clock tick.)
    let (mut measured, mut zeros_in_a_row) = (0, 0);
    while measured < 20 {
        let status = next_event(&mut samples).await.status.expect("status");
        if status.num_threads < 2 {
            continue;
        }
        measured += 1;
        zeros_in_a_row = if status.cpu_percent == 0.0 {
            zeros_in_a_row + 1
        } else {
            0
        };
        assert!(zeros_in_a_row < 3, "three samples in a row measured no CPU");
        assert!(
            status.cpu_percent <= 250.0,
            "one busy thread measured {}% CPU",
            status.cpu_percent
        );
    }
    stop(&mut client, &["threads"], true).await;
}

#[tokio::test]
async fn tree_memory_counts_children_and_identity_reaches_the_agent() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut request = spawn_request(
        "tree",
        sh(
            "echo \"$AGENTD_AGENT_ID $AGENTD_PARENT_AGENT_ID $AGENTD_MODEL $GREETING\"; \
            cat \"$AGENTD_PROMPT_FILE\"; echo oops >&2; sleep 300 & sleep 300 & wait",
        ),
    );
    request.parent_agent_id = "@coordinator".into();
    request.model = "claude".into();
    request.prompt = "summarise the logs".into();
    request.load_percentage = 12.5;
    request.env.insert("GREETING".into(), "hello".into());
    request.labels.insert("team".into(), "research".into());
    spawn_with(&mut client, request).await;

    // Processes and threads are read one after the other: a sample may see a child in one
    // and not yet in the other.
    let status = wait_for(&mut client, "tree", "sampled with its children", |s| {
        s.num_processes >= 3 && s.num_threads >= 3
    })
    .await;
    assert_eq!(status.model, "claude");
    assert_eq!(status.parent_agent_id, "@coordinator");
    assert_eq!(
        status.labels.get("team").map(String::as_str),
        Some("research")
    );
    let dir = std::path::PathBuf::from(&status.agent_dir);
    assert!(dir.starts_with(&daemon.data_dir));
    let stdout = std::fs::read_to_string(dir.join("stdout.log")).expect("stdout.log");
    assert_eq!(stdout, "tree @coordinator claude hello\nsummarise the logs");
    let stderr = std::fs::read_to_string(dir.join("stderr.log")).expect("stderr.log");
    assert_eq!(stderr, "oops\n");
    assert!(!daemon.log().contains("summarise the logs"));

    let listed = client
        .list_agents(pb::ListAgentsRequest {
            labels: [("team".to_string(), "research".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(listed.len(), 1);
    let none = client
        .list_agents(pb::ListAgentsRequest {
            states: vec![AgentState::Completed as i32],
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert!(none.is_empty());
    let summary = client
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.total_load_percentage, 12.5);
    stop(&mut client, &["tree"], true).await;
}

#[tokio::test]
async fn exit_codes_and_signals_are_recorded() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "zero", vec!["true".into()]).await;
    spawn(&mut client, "three", sh("exit 3")).await;
    spawn(&mut client, "killed", sh("kill -KILL $$")).await;

    let zero = wait_for_state(&mut client, "zero", AgentState::Completed).await;
    assert_eq!((zero.exit_code, zero.exit_signal), (Some(0), None));
    assert_eq!(zero.health, pb::Health::Completed as i32);
    assert!(!zero.process_alive && zero.ended_at.is_some());

    let three = wait_for_state(&mut client, "three", AgentState::Failed).await;
    assert_eq!((three.exit_code, three.exit_signal), (Some(3), None));
    assert_eq!(three.health, pb::Health::Failed as i32);

    let killed = wait_for_state(&mut client, "killed", AgentState::Failed).await;
    assert_eq!((killed.exit_code, killed.exit_signal), (Some(137), Some(9)));
    assert!(killed.error.contains("signal 9"), "{}", killed.error);
}

#[tokio::test]
async fn progress_from_the_status_file_is_read_and_bad_files_ignored() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(
        &mut client,
        "reporter",
        sh("echo 'not json' > \"$AGENTD_STATUS_FILE\"; sleep 0.3; \
            echo '{\"progress\": 40, \"message\": \"halfway\"}' > \"$AGENTD_STATUS_FILE.tmp\"; \
            mv \"$AGENTD_STATUS_FILE.tmp\" \"$AGENTD_STATUS_FILE\"; sleep 300"),
    )
    .await;
    let status = wait_for(&mut client, "reporter", "at 40%", |s| s.progress == 40.0).await;
    assert_eq!(status.progress_message, "halfway");
    assert_eq!(status.state, AgentState::Running as i32);
    assert!(daemon.log().contains("ignoring status file"));
    stop(&mut client, &["reporter"], true).await;
}

#[tokio::test]
async fn unstartable_commands_fail_at_once_with_a_record() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;

    let missing = client
        .spawn(spawn_request("missing", vec!["/no/such/program".into()]))
        .await
        .expect_err("missing program");
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert!(
        missing.message().contains("/no/such/program"),
        "{}",
        missing.message()
    );
    let status = status(&mut client, "missing").await;
    assert_eq!(status.state, AgentState::Failed as i32);
    assert_eq!(status.pid, 0);
    let error_log =
        std::fs::read_to_string(std::path::Path::new(&status.agent_dir).join("error.log"))
            .expect("error.log");
    assert!(error_log.contains("No such file"), "{error_log}");

    let script = daemon.dir.path().join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\n").expect("write script");
    let denied = client
        .spawn(spawn_request(
            "denied",
            vec![script.to_string_lossy().into_owned()],
        ))
        .await
        .expect_err("not executable");
    assert_eq!(denied.code(), Code::FailedPrecondition);

    let mut request = spawn_request("nowhere", vec!["true".into()]);
    request.working_dir = "/no/such/folder".into();
    let nowhere = client.spawn(request).await.expect_err("bad working dir");
    assert_eq!(nowhere.code(), Code::FailedPrecondition);
    assert!(nowhere.message().contains("/no/such/folder"));
    // Once the cause is fixed, the same id starts; a started id is then taken.
    let fixed = spawn(&mut client, "nowhere", vec!["sleep".into(), "300".into()]).await;
    assert!(fixed.pid > 0 && fixed.error.is_empty());
    let taken = client
        .spawn(spawn_request("nowhere", vec!["true".into()]))
        .await
        .expect_err("taken id");
    assert_eq!(taken.code(), Code::AlreadyExists);
    stop(&mut client, &["nowhere"], true).await;
}

#[tokio::test]
async fn a_repeated_request_id_starts_no_second_process() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut request = spawn_request("", vec!["sleep".into(), "300".into()]);
    request.request_id = "req-1".into();
    let first = spawn_with(&mut client, request.clone()).await;
    let again = spawn_with(&mut client, request).await;
    assert!(first.agent_id.starts_with("agent-"), "{}", first.agent_id);
    assert_eq!(
        (first.agent_id.as_str(), first.pid),
        (again.agent_id.as_str(), again.pid)
    );
    let agents = client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    stop(&mut client, &[&first.agent_id], true).await;
}

#[tokio::test]
async fn orphans_are_reaped_and_no_zombie_remains() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    // Each subshell exits at once, orphaning its `sleep`; agentd's keeper is their subreaper.
    let agent = spawn(
        &mut client,
        "orphans",
        sh("for i in 1 2 3; do (sleep 0.5 &); done; exit 0"),
    )
    .await;
    let keeper = keeper_of(&daemon.data_dir).expect("a keeper runs");
    eventually("the keeper adopted the orphaned sleeps", async || {
        let children = children_of(keeper);
        children
            .iter()
            .filter(|(pid, _)| *pid != agent.pid as i32)
            .count()
            >= 3
    })
    .await;
    wait_for_state(&mut client, "orphans", AgentState::Completed).await;
    eventually("every orphan is reaped, no zombie left", async || {
        children_of(keeper).is_empty()
            && children_of(daemon.pid())
                .iter()
                .all(|(pid, _)| *pid == keeper)
    })
    .await;
    let reaped = client
        .reap_zombies(pb::ReapZombiesRequest {})
        .await
        .expect("reap")
        .into_inner();
    assert!(reaped.agent_ids.is_empty() && reaped.orphans_reaped == 0);
}
