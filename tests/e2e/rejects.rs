//! Bad input gets the right status code, and nothing stored changes.

use agentd_proto::v1 as pb;
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn bad_requests_get_the_right_codes_and_change_nothing() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let original = spawn(&mut client, "keeper", vec!["sleep".into(), "300".into()]).await;

    let sleep = || vec!["sleep".to_string(), "1".to_string()];
    let mut cases: Vec<(&str, pb::SpawnRequest, Code)> = vec![
        (
            "empty command",
            spawn_request("a", vec![]),
            Code::InvalidArgument,
        ),
        (
            "empty program",
            spawn_request("a", vec![String::new()]),
            Code::InvalidArgument,
        ),
        (
            "escaping id",
            spawn_request("../etc", sleep()),
            Code::InvalidArgument,
        ),
        (
            "dot-dot id",
            spawn_request("..", sleep()),
            Code::InvalidArgument,
        ),
        (
            "slash id",
            spawn_request("a/b", sleep()),
            Code::InvalidArgument,
        ),
        (
            "long id",
            spawn_request(&"x".repeat(129), sleep()),
            Code::InvalidArgument,
        ),
        (
            "duplicate id",
            spawn_request("keeper", sleep()),
            Code::AlreadyExists,
        ),
    ];
    let mut over_load = spawn_request("a", sleep());
    over_load.load_percentage = 150.0;
    cases.push(("load over 100", over_load, Code::InvalidArgument));
    let mut negative_load = spawn_request("a", sleep());
    negative_load.load_percentage = -1.0;
    cases.push(("negative load", negative_load, Code::InvalidArgument));
    let mut big_prompt = spawn_request("a", sleep());
    big_prompt.prompt = "x".repeat(2 * 1024 * 1024);
    cases.push(("oversized prompt", big_prompt, Code::InvalidArgument));
    let mut big_env = spawn_request("a", sleep());
    big_env.env = (0..300).map(|i| (format!("K{i}"), "v".into())).collect();
    cases.push(("oversized env", big_env, Code::InvalidArgument));
    let mut bad_signal = spawn_request("a", sleep());
    bad_signal.stop_policy = Some(pb::StopPolicy {
        stop_signal: "SIGWHATEVER".into(),
        ..Default::default()
    });
    cases.push(("unknown signal", bad_signal, Code::InvalidArgument));

    for (what, request, code) in cases {
        let error = client.spawn(request).await.expect_err(what);
        assert_eq!(error.code(), code, "{what}: {}", error.message());
        assert!(!error.message().is_empty(), "{what}: empty message");
    }

    let missing = client
        .status(pb::StatusRequest {
            agent_id: "nobody".into(),
        })
        .await
        .expect_err("unknown agent");
    assert_eq!(missing.code(), Code::NotFound);
    let neither = client
        .cleanup(pb::CleanupRequest::default())
        .await
        .expect_err("cleanup of nothing");
    assert_eq!(neither.code(), Code::InvalidArgument);
    let unknown = client
        .cleanup(pb::CleanupRequest {
            agent_ids: vec!["keeper".into(), "nobody".into()],
            ..Default::default()
        })
        .await
        .expect_err("cleanup of an unknown agent");
    assert_eq!(unknown.code(), Code::NotFound);

    // Only the one good agent exists, untouched and still running.
    let agents = client
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].pid, original.pid);
    assert_eq!(agents[0].state, pb::AgentState::Running as i32);
    let folders = std::fs::read_dir(daemon.data_dir.join("agents"))
        .expect("agents folder")
        .count();
    assert_eq!(folders, 1, "a rejected spawn left a folder behind");
    stop(&mut client, &["keeper"], true).await;
}

#[tokio::test]
async fn a_working_dir_must_be_absolute() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut request = spawn_request("relative", vec!["pwd".into()]);
    request.working_dir = "../..".into();
    let error = client.spawn(request).await.expect_err("relative");
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(error.message().contains("absolute"), "{}", error.message());
}

#[tokio::test]
async fn a_symlink_planted_for_an_agent_folder_is_refused() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let outside = tempfile::tempdir().expect("outside");
    std::os::unix::fs::symlink(outside.path(), daemon.data_dir.join("agents/evil")).expect("plant");
    let error = client
        .spawn(spawn_request("evil", sh("echo written")))
        .await
        .expect_err("a planted symlink");
    assert_eq!(
        error.code(),
        Code::FailedPrecondition,
        "{}",
        error.message()
    );
    assert!(
        error.message().contains("not a folder agentd made"),
        "{}",
        error.message()
    );
    let written: Vec<_> = std::fs::read_dir(outside.path()).expect("list").collect();
    assert!(
        written.is_empty(),
        "agentd wrote outside its data folder: {written:?}"
    );
}

#[tokio::test]
async fn an_agent_cannot_point_its_output_elsewhere_for_the_next_run() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let outside = daemon.dir.path().join("precious");
    std::fs::write(&outside, "untouched\n").expect("outside file");
    // The agent swaps its own stdout.log for a link to a file it should not reach.
    let script = format!(
        "ln -sf {} \"$AGENTD_AGENT_DIR/stdout.log\"",
        outside.display()
    );
    spawn(&mut client, "swapper", sh(&script)).await;
    wait_for_state(&mut client, "swapper", pb::AgentState::Completed).await;
    let error = client
        .restart(pb::RestartRequest {
            agent_ids: vec!["swapper".into()],
        })
        .await
        .expect_err("the next run cannot open a link");
    assert_eq!(
        error.code(),
        Code::FailedPrecondition,
        "{}",
        error.message()
    );
    assert_eq!(
        std::fs::read_to_string(&outside).expect("outside file"),
        "untouched\n"
    );
}

#[tokio::test]
async fn a_fifo_for_a_status_file_does_not_stop_the_sampler() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(
        &mut client,
        "fifo",
        sh("mkfifo \"$AGENTD_STATUS_FILE\" && exec sleep 30"),
    )
    .await;
    wait_for(&mut client, "fifo", "its FIFO made", |_| {
        std::fs::symlink_metadata(daemon.data_dir.join("agents/fifo/status.json")).is_ok()
    })
    .await;
    spawn(&mut client, "after", vec!["sleep".into(), "30".into()]).await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["after".into()],
            kinds: vec![pb::EventKind::Health as i32],
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    // Samples keep coming, round after round.
    for _ in 0..3 {
        assert_eq!(
            next_event(&mut events).await.kind,
            pb::EventKind::Health as i32
        );
    }
    kill_all(&mut client).await;
}

#[tokio::test]
async fn an_env_value_never_shows_anywhere() {
    const SECRET: &str = "planted-secret-7f3a9c";
    let daemon = Daemon::builder()
        .options(&["--http-listen", "127.0.0.1:0", "--metrics-per-agent"])
        .start()
        .await;
    let mut client = daemon.client().await;
    let with_secret = |id: &str, command: Vec<String>| {
        let mut request = spawn_request(id, command);
        request.env = [("API_KEY".to_string(), SECRET.to_string())].into();
        request.labels = [("team".to_string(), "a".to_string())].into();
        request
    };
    spawn_with(
        &mut client,
        with_secret("quiet", vec!["sleep".into(), "30".into()]),
    )
    .await;
    spawn_with(&mut client, with_secret("failing", sh("exit 3"))).await;
    let refused = client
        .spawn(with_secret("missing", vec!["/no/such/program".into()]))
        .await
        .expect_err("no such program");
    wait_for_state(&mut client, "failing", pb::AgentState::Failed).await;

    let mut seen = vec![refused.message().to_string(), daemon.log()];
    let http = daemon.http();
    for path in ["/v1/agents", "/v1/agents/quiet", "/v1/summary", "/metrics"] {
        seen.push(http.get(path).await.text());
    }
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            after_sequence: Some(0),
            replay_only: true,
            ..Default::default()
        })
        .await
        .expect("events")
        .into_inner();
    while let Some(event) = events.message().await.expect("event") {
        seen.push(format!("{event:?}"));
    }
    for args in [
        &["list"][..],
        &["--json", "list"],
        &["describe", "quiet"],
        &["--json", "describe", "failing"],
        &["status", "failing"],
    ] {
        let output = std::process::Command::new(agentctl_path())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .output()
            .expect("agentctl");
        seen.push(String::from_utf8_lossy(&output.stdout).into_owned());
        seen.push(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    for (i, text) in seen.iter().enumerate() {
        assert!(
            !text.contains(SECRET),
            "the secret shows in output {i}:\n{text}"
        );
    }
    // The outputs were really read: the agents show in most of them.
    let naming = seen.iter().filter(|text| text.contains("quiet")).count();
    assert!(naming >= 6, "only {naming} outputs name the agent");
    kill_all(&mut client).await;
}
