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
