//! agentctl for people and scripts: `run`, `wait`, `describe`, `completions`, and the exit
//! status each gives.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};

use agentd_proto::v1 as pb;

use crate::harness::*;

fn agentctl(daemon: &Daemon) -> Command {
    let mut command = Command::new(agentctl_path());
    command.arg("--socket").arg(&daemon.socket);
    command
}

fn output(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().expect("agentctl")
}

/// Waits for a child agentctl to exit, failing at the deadline.
async fn exit_of(child: &mut Child) -> i32 {
    let exit = eventually("agentctl exits", async || {
        child.try_wait().expect("wait agentctl")
    });
    exit.await.code().expect("an exit code")
}

#[tokio::test]
async fn run_copies_both_streams_and_exits_with_the_agents_status() {
    let daemon = Daemon::start().await;
    let ran = output(
        agentctl(&daemon)
            .args(["run", "--", "sh", "-c"])
            .arg("echo out; echo err >&2; exit 3"),
    );
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&ran.stderr), "err\n");
    assert_eq!(ran.status.code(), Some(3));
    let killed = output(agentctl(&daemon).args(["run", "--", "sh", "-c", "kill -9 $$"]));
    assert_eq!(killed.status.code(), Some(137), "128 + SIGKILL");
    let unknown = output(agentctl(&daemon).args(["run", "--", "/no/such/program"]));
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("InvalidArgument"),
        "{unknown:?}"
    );
    let usage = output(agentctl(&daemon).args(["run", "--no-such-flag"]));
    assert_eq!(usage.status.code(), Some(2));
}

#[tokio::test]
async fn ctrl_c_stops_a_run_through_its_ladder() {
    let daemon = Daemon::start().await;
    let script = "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.05; done";
    let (mut run, mut stdout) = run_until_ready(&daemon, &["--id", "trapper"], script);
    interrupt(&run);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).expect("the rest");
    assert_eq!(rest, "got TERM\n", "the agent saw SIGTERM");
    assert_eq!(exit_of(&mut run).await, 7);
    let mut client = daemon.client().await;
    assert_eq!(
        status(&mut client, "trapper").await.state,
        pb::AgentState::Killed as i32
    );
}

#[tokio::test]
async fn wait_returns_when_the_agent_ends_or_the_timeout_passes() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let flag = daemon.dir.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.02; done; exit 5",
        flag.display()
    );
    spawn(&mut client, "waited", sh(&script)).await;
    let timed_out = output(agentctl(&daemon).args(["wait", "waited", "--timeout", "200ms"]));
    assert_eq!(timed_out.status.code(), Some(124));
    assert!(
        status(&mut client, "waited").await.process_alive,
        "left running"
    );

    let mut wait = agentctl(&daemon)
        .args(["wait", "waited"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("agentctl wait");
    assert!(
        wait.try_wait().expect("try_wait").is_none(),
        "returned early"
    );
    // Only the end can tell it the code it prints and exits with.
    std::fs::write(&flag, "").expect("flag");
    assert_eq!(exit_of(&mut wait).await, 5);
    let mut printed = String::new();
    std::io::Read::read_to_string(&mut wait.stdout.take().expect("stdout"), &mut printed)
        .expect("stdout");
    assert_eq!(printed, "waited: FAILED, exit 5: exited with code 5\n");

    let missing = output(agentctl(&daemon).args(["wait", "ghost"]));
    assert_eq!(missing.status.code(), Some(1));
}

#[tokio::test]
async fn wait_is_not_fooled_by_a_pending_restart() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut flaky = spawn_request("flaky", sh("exit 4"));
    flaky.restart_policy = pb::RestartPolicy::OnFailure as i32;
    flaky.max_restarts = 2;
    flaky.restart_backoff = Some(pb::RestartBackoff {
        initial: Some(std::time::Duration::from_millis(100).into()),
        ..Default::default()
    });
    spawn_with(&mut client, flaky).await;
    let waited = output(agentctl(&daemon).args(["--json", "wait", "flaky"]));
    assert_eq!(waited.status.code(), Some(4));
    let last: serde_json::Value = serde_json::from_slice(&waited.stdout).expect("JSON status");
    assert_eq!(last["restartCount"], 2, "returned only after the last run");
    assert_eq!(last["state"], "AGENT_STATE_FAILED");
}

/// The field names of `message AgentStatus` in the proto file.
fn agent_status_fields() -> Vec<String> {
    let proto = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../proto/agentd/v1/agentd.proto"
    ))
    .expect("proto");
    let body = proto
        .split_once("message AgentStatus {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .expect("message AgentStatus")
        .0;
    body.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with("//") && line.ends_with(';'))
        .filter_map(|line| line.split_once('=').map(|(declared, _)| declared))
        .filter_map(|declared| declared.split_whitespace().last())
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn describe_shows_every_field_of_the_status_its_output_and_children() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(&mut client, "parent", sh("echo one; echo two; sleep 30")).await;
    let mut child = spawn_request("child", vec!["sleep".into(), "30".into()]);
    child.parent_agent_id = "parent".into();
    spawn_with(&mut client, child).await;
    wait_for(&mut client, "parent", "has written", |s| s.process_alive).await;
    let described = eventually("describe shows the output", async || {
        let described = output(agentctl(&daemon).args(["describe", "parent"]));
        let text = String::from_utf8_lossy(&described.stdout).into_owned();
        if text.contains("  two\n") {
            Ok(text)
        } else {
            Err(Shown(text))
        }
    })
    .await;
    let fields = agent_status_fields();
    assert!(fields.len() > 40, "{fields:?}");
    for field in &fields {
        assert!(
            described
                .lines()
                .any(|line| line.trim_start().starts_with(&format!("{field} "))),
            "describe lacks `{field}`:\n{described}"
        );
    }
    assert!(!described.contains("Other:"), "{described}");
    assert!(described.contains("  one\n  two\n"), "{described}");
    assert!(described.contains("ago)"), "a relative time: {described}");
    assert!(
        described.contains("  history:\n") && described.contains(" SPAWNED "),
        "{described}"
    );
    assert!(
        described
            .lines()
            .any(|line| line.trim_start().starts_with("child ")),
        "{described}"
    );
    let json = output(agentctl(&daemon).args(["--json", "describe", "parent"]));
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON");
    assert_eq!(json["status"]["agentId"], "parent");
    assert_eq!(json["stdoutTail"], "one\ntwo\n");
    assert_eq!(json["children"][0]["agentId"], "child");
    kill_all(&mut client).await;
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let script = Command::new(agentctl_path())
            .args(["completions", shell])
            .output()
            .expect("agentctl");
        assert!(script.status.success(), "{shell}: {script:?}");
        let text = String::from_utf8_lossy(&script.stdout);
        assert!(
            text.contains("agentctl") && text.contains("describe"),
            "{shell}: {text}"
        );
    }
}

async fn stdout_of(client: &mut Client, agent_id: &str) -> String {
    let request = pb::StreamLogsRequest {
        agent_id: agent_id.into(),
        stream: pb::LogStream::Stdout.into(),
        ..Default::default()
    };
    let mut chunks = client
        .stream_logs(request)
        .await
        .expect("logs")
        .into_inner();
    let mut text = Vec::new();
    while let Some(chunk) = chunks.message().await.expect("chunk") {
        text.extend_from_slice(&chunk.data);
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[tokio::test]
async fn restart_keeps_the_id_starts_a_new_process_and_says_so_in_order() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let mut worker = spawn_request("worker", sh("echo run; exec sleep 30"));
    worker.stop_policy = quick_ladder();
    let first = spawn_with(&mut client, worker).await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["worker".into()],
            health_interval: Some(std::time::Duration::ZERO.into()),
            ..Default::default()
        })
        .await
        .expect("watch")
        .into_inner();
    let restarted = client
        .restart(pb::RestartRequest {
            agent_ids: vec!["worker".into()],
        })
        .await
        .expect("restart")
        .into_inner()
        .statuses;
    let [restarted] = restarted.try_into().expect("one status");
    assert_eq!(restarted.agent_id, "worker");
    assert_eq!(restarted.state, pb::AgentState::Running as i32);
    assert_ne!(restarted.pid, first.pid, "a new process");
    assert_eq!(restarted.restart_count, 1);
    assert_eq!(restarted.agent_dir, first.agent_dir);
    let mut seen = Vec::new();
    loop {
        let event = next_event(&mut events).await;
        let kind = pb::EventKind::try_from(event.kind).expect("kind");
        seen.push((kind, event.message));
        if kind == pb::EventKind::Spawned {
            break;
        }
    }
    let kinds: Vec<_> = seen.iter().map(|(kind, _)| *kind).collect();
    use pb::EventKind::*;
    assert_eq!(kinds, [Stopping, Killed, Restarting, Spawned]);
    assert_eq!(seen[2].1, "restart requested");
    eventually("the second run's output is appended", async || {
        let stdout = stdout_of(&mut client, "worker").await;
        if stdout == "run\nrun\n" {
            Ok(())
        } else {
            Err(stdout)
        }
    })
    .await;

    // The agent's history ends with the replay when asked to.
    let mut history = client
        .watch_agents(pb::WatchAgentsRequest {
            agent_ids: vec!["worker".into()],
            kinds: vec![Restarting as i32],
            after_sequence: Some(0),
            replay_only: true,
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    let restarting = next_event(&mut history).await;
    assert_eq!(restarting.message, "restart requested");
    assert!(history.message().await.expect("ends cleanly").is_none());
    let without_after = client
        .watch_agents(pb::WatchAgentsRequest {
            replay_only: true,
            ..Default::default()
        })
        .await
        .expect_err("replay_only needs after_sequence");
    assert_eq!(without_after.code(), tonic::Code::InvalidArgument);

    // A completed agent runs again, through agentctl.
    spawn(&mut client, "once", sh("echo once")).await;
    wait_for_state(&mut client, "once", pb::AgentState::Completed).await;
    let again = output(agentctl(&daemon).args(["restart", "once"]));
    assert!(again.status.success(), "{again:?}");
    let done = wait_for(&mut client, "once", "completed again", |s| {
        s.state == pb::AgentState::Completed as i32 && s.restart_count == 1
    })
    .await;
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(stdout_of(&mut client, "once").await, "once\nonce\n");

    let unknown = client
        .restart(pb::RestartRequest {
            agent_ids: vec!["worker".into(), "ghost".into()],
        })
        .await
        .expect_err("unknown agent");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert_eq!(
        status(&mut client, "worker").await.restart_count,
        1,
        "all or none: nothing restarted"
    );
    kill_all(&mut client).await;
}

/// Starts `agentctl run` on a script that prints `ready` and waits for it.
fn run_until_ready(
    daemon: &Daemon,
    options: &[&str],
    script: &str,
) -> (Child, BufReader<std::process::ChildStdout>) {
    let mut run = agentctl(daemon)
        .arg("run")
        .args(options)
        .args(["--", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agentctl run");
    let mut stdout = BufReader::new(run.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("first line");
    assert_eq!(line, "ready\n");
    (run, stdout)
}

fn interrupt(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT agentctl");
}

#[tokio::test]
async fn a_second_ctrl_c_kills_and_detach_leaves_the_agent_running() {
    let daemon = Daemon::start().await;
    let stubborn = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
    let (mut run, _stdout) = run_until_ready(&daemon, &["--grace", "60s"], stubborn);
    interrupt(&run);
    let mut stderr = BufReader::new(run.stderr.take().expect("stderr"));
    let mut line = String::new();
    stderr.read_line(&mut line).expect("a line");
    assert!(line.contains("Ctrl-C again to kill it"), "{line}");
    interrupt(&run);
    assert_eq!(exit_of(&mut run).await, 137, "killed by SIGKILL");

    let (mut run, _stdout) = run_until_ready(
        &daemon,
        &["--id", "detached", "--detach-on-interrupt"],
        "echo ready; exec sleep 30",
    );
    interrupt(&run);
    assert_eq!(exit_of(&mut run).await, 130);
    let mut client = daemon.client().await;
    assert!(status(&mut client, "detached").await.process_alive);
    kill_all(&mut client).await;
}

#[tokio::test]
async fn tables_keep_one_line_per_agent_cut_to_the_width() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    spawn(
        &mut client,
        "multi",
        vec!["sh".into(), "-c".into(), "sleep 30\n# naïve".into()],
    )
    .await;
    let whole = output(agentctl(&daemon).args(["list"]));
    let whole = String::from_utf8_lossy(&whole.stdout).into_owned();
    assert_eq!(whole.lines().count(), 2, "{whole}");
    assert!(whole.contains("sleep 30\\n# naïve"), "{whole}");
    let cut = output(agentctl(&daemon).env("COLUMNS", "50").args(["list"]));
    let cut = String::from_utf8_lossy(&cut.stdout).into_owned();
    assert!(cut.lines().all(|line| line.chars().count() <= 50), "{cut}");
    assert!(
        cut.lines().nth(1).is_some_and(|line| line.ends_with('…')),
        "{cut}"
    );
    kill_all(&mut client).await;
}
