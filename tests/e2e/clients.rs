//! The polyglot clients users reach for: Python generated with grpcio-tools, grpcurl
//! through server reflection, and agentctl.

use std::path::PathBuf;
use std::process::{Command, Output};

use crate::harness::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|e| {
        panic!("running {command:?}: {e} (see README: tests need it installed)")
    });
    assert!(
        output.status.success(),
        "{command:?} failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[tokio::test]
async fn a_generated_python_client_spawns_watches_and_cleans_up() {
    if !requires(Need::Python("grpc_tools")) {
        return;
    }
    let daemon = Daemon::start().await;
    let stubs = daemon.dir.path().join("python-stubs");
    std::fs::create_dir_all(&stubs).expect("stubs folder");
    let root = repo_root();
    run(Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg("agentd/v1/agentd.proto"));
    let output = run(Command::new("python3")
        .arg(root.join("tests/python/client.py"))
        .arg(&daemon.socket)
        .arg(&stubs));
    assert!(String::from_utf8_lossy(&output.stdout).contains("python client ok"));
}

#[tokio::test]
async fn grpcurl_lists_and_calls_the_service_through_reflection() {
    if !requires(Need::Grpcurl) {
        return;
    }
    let daemon = Daemon::start().await;
    let socket = daemon.socket.to_string_lossy().into_owned();
    // grpcurl [flags] ADDRESS [verb or method] [symbol]
    let grpcurl = |flags: &[&str], rest: &[&str]| {
        let output = run(Command::new("grpcurl")
            .args(["-plaintext", "-unix", "-authority", "localhost"])
            .args(flags)
            .arg(&socket)
            .args(rest));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let services = grpcurl(&[], &["list"]);
    assert!(services.contains("agentd.v1.AgentSupervisor"), "{services}");
    assert!(services.contains("grpc.health.v1.Health"), "{services}");
    let methods = grpcurl(&[], &["list", "agentd.v1.AgentSupervisor"]);
    for method in ["Spawn", "Status", "Cleanup", "WatchAgents", "GetSummary"] {
        assert!(methods.contains(method), "{method} missing from {methods}");
    }
    let described = grpcurl(&[], &["describe", "agentd.v1.AgentStatus"]);
    assert!(described.contains("process_alive"), "{described}");
    let spawned = grpcurl(
        &[
            "-d",
            r#"{"agent_id": "from-grpcurl", "command": ["sleep", "300"]}"#,
        ],
        &["agentd.v1.AgentSupervisor/Spawn"],
    );
    assert!(spawned.contains("AGENT_STATE_RUNNING"), "{spawned}");
    let health = grpcurl(&[], &["grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    let mut client = daemon.client().await;
    stop(&mut client, &["from-grpcurl"], true).await;
}

#[tokio::test]
async fn agentctl_spawns_shows_and_stops() {
    let daemon = Daemon::start().await;
    let agentctl = |args: &[&str]| {
        let output = run(Command::new(agentctl_path())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let table = agentctl(&[
        "spawn", "--id", "cli", "--model", "m1", "--", "sleep", "300",
    ]);
    assert!(
        table.lines().next().is_some_and(|h| h.starts_with("AGENT")),
        "{table}"
    );
    assert!(
        table.contains("cli") && table.contains("running"),
        "{table}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&agentctl(&["status", "cli", "--json"])).expect("json status");
    // The proto3 JSON mapping: enums by name, lowerCamelCase, defaults written.
    assert_eq!(json["state"], "AGENT_STATE_RUNNING");
    assert_eq!(json["model"], "m1");
    assert_eq!(json["restartCount"], 0);
    assert!(json["pid"].as_u64().is_some_and(|pid| pid > 0));
    assert!(
        json["startedAt"]
            .as_str()
            .is_some_and(|t| t.starts_with("20"))
    );
    let stopped = agentctl(&["stop", "cli"]);
    assert!(stopped.contains("exited_on_first_signal"), "{stopped}");

    // A reader that went away (`agentctl list | head`) ends agentctl quietly, not in a panic.
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let listed = Command::new(agentctl_path())
        .arg("--socket")
        .arg(&daemon.socket)
        .arg("list")
        .stdout(std::process::Stdio::from(writer))
        .output()
        .expect("agentctl");
    let stderr = String::from_utf8_lossy(&listed.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");

    let failed = Command::new(agentctl_path())
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["status", "nobody"])
        .output()
        .expect("agentctl");
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("no agent `nobody`") && stderr.contains("NotFound"),
        "{stderr}"
    );
}
