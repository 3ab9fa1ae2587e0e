//! What a newcomer meets in the first hour, besides the README (`readme.rs`): usage errors
//! that list what is valid, errors that say what to do, start-up failures that leave nothing
//! behind, statuses that do not mislead, and relative paths that mean what they mean in a
//! shell.

use std::process::{Command, Output, Stdio};

use agentd_proto::v1 as pb;

use crate::harness::*;

fn agentctl(args: &[&str]) -> Output {
    Command::new(agentctl_path())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("agentctl")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn usage_errors_list_the_valid_values_and_exit_2() {
    for (args, valid) in [
        (&["list", "--state", "runing"][..], "backing-off"),
        (
            &["spawn", "--restart", "onfailure", "--", "true"],
            "on-failure",
        ),
        (&["watch", "--kind", "exit"], "exited"),
        (&["stop"], "--all"),
        (&["rm"], "AGENT_IDS"),
    ] {
        let output = agentctl(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        assert!(stderr(&output).contains(valid), "{args:?}: {output:?}");
    }
    // Every spelling of a value is taken: the table's, the option's, the API's.
    let output = agentctl(&[
        "--socket",
        "/nonexistent/agentd.sock",
        "list",
        "--state",
        "backing_off",
        "--state",
        "AGENT_STATE_TIMED_OUT",
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = stderr(&output);
    assert!(error.contains("is it running?"), "{error}");
    assert_eq!(
        error.matches("No such file or directory").count(),
        1,
        "the cause once: {error}"
    );
}

#[tokio::test]
async fn agentctl_at_the_http_port_is_told_to_use_the_grpc_address() {
    let daemon = Daemon::builder()
        .options(&["--http-listen", "127.0.0.1:0"])
        .start()
        .await;
    let http = daemon.http_address.clone().expect("the HTTP address");
    let output = agentctl(&["--addr", &format!("http://{http}"), "list"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = stderr(&output);
    assert!(
        error.contains("agentd's HTTP API") && error.contains("--listen"),
        "{error}"
    );
    assert!(!error.contains("compression flag"), "{error}");
}

#[tokio::test]
async fn start_up_errors_name_the_other_daemon_and_leave_nothing_behind() {
    let daemon = Daemon::builder()
        .options(&["--http-listen", "127.0.0.1:0"])
        .start()
        .await;
    let agentd = env!("CARGO_BIN_EXE_agentd");
    let second = |args: &[&str]| {
        Command::new(agentd)
            .args(args)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .output()
            .expect("agentd")
    };
    let pid = format!("(pid {})", daemon.pid());
    let other_socket = daemon.dir.path().join("other.sock");
    let data_dir = daemon.data_dir.to_str().expect("a UTF-8 path");
    for args in [
        vec![
            "--data-dir",
            data_dir,
            "--socket",
            other_socket.to_str().expect("UTF-8"),
        ],
        vec![
            "--data-dir",
            data_dir,
            "--socket",
            daemon.socket.to_str().expect("UTF-8"),
        ],
    ] {
        let output = second(&args);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let error = stderr(&output);
        assert!(
            error.contains("another agentd") && error.contains(&pid),
            "{error}"
        );
        assert!(!error.contains("backtrace"), "no stack trace: {error}");
        assert_eq!(error.trim().lines().count(), 1, "one line: {error}");
    }
    assert!(
        !other_socket.exists(),
        "no socket left by the refused start"
    );

    // A taken port fails the start before anything is made: no data folder (so no store,
    // socket or keeper) and no cgroup.
    let fresh = tempfile::tempdir().expect("temp dir");
    let fresh_data = fresh.path().join("data");
    let http = daemon.http_address.clone().expect("the HTTP address");
    let output = second(&[
        "--data-dir",
        fresh_data.to_str().expect("UTF-8"),
        "--http-listen",
        &http,
        "--insecure-listen",
    ]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(stderr(&output).contains("--http-listen"), "{output:?}");
    assert!(
        !fresh_data.exists(),
        "nothing made in {}",
        fresh_data.display()
    );
    assert!(keeper_of(&fresh_data).is_none());
    // The cgroup's name escapes the folder's path; its random part stays as it is.
    let random = fresh.path().file_name().expect("a name").to_string_lossy();
    let random = random.trim_start_matches(".tmp");
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
    {
        let ours = std::fs::read_dir(hierarchy.path().join("agentd"))
            .into_iter()
            .flatten()
            .flatten()
            .find(|cgroup| cgroup.file_name().to_string_lossy().contains(random));
        assert!(ours.is_none(), "{:?} left behind", ours.map(|c| c.path()));
    }
    // Its log is read by people and programs, not a terminal: no colour codes.
    assert!(!daemon.log().contains('\u{1b}'), "{}", daemon.log());
}

#[tokio::test]
async fn statuses_say_what_happened_to_this_run_of_this_agent() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;

    // Stopped on request: not "completed".
    spawn(&mut client, "stopped", sh("sleep 600")).await;
    stop(&mut client, &["stopped"], true).await;
    let stopped = wait_for_state(&mut client, "stopped", pb::AgentState::Killed).await;
    assert_eq!(stopped.health, pb::Health::Stopped as i32);

    // A new run starts with no progress.
    spawn(&mut client, "worker", sh("sleep 600")).await;
    let report = pb::ReportProgressRequest {
        agent_id: "worker".into(),
        progress: Some(40.0),
        message: "halfway".into(),
        ..Default::default()
    };
    client
        .report_progress(report)
        .await
        .expect("ReportProgress");
    assert_eq!(status(&mut client, "worker").await.progress, 40.0);
    let restart = pb::RestartRequest {
        agent_ids: vec!["worker".into()],
    };
    let restarted = client.restart(restart).await.expect("Restart").into_inner();
    let run = &restarted.statuses[0];
    assert_eq!((run.restart_count, run.progress), (1, 0.0), "{run:?}");
    assert_eq!(run.progress_message, "");

    // An id used again after a removal: describe shows this agent's events only, and only
    // the files its folder holds.
    spawn(&mut client, "again", sh("exit 0")).await;
    wait_for_state(&mut client, "again", pb::AgentState::Completed).await;
    let remove = pb::RemoveRequest {
        agent_id: "again".into(),
    };
    client.remove(remove).await.expect("Remove");
    spawn(&mut client, "again", sh("sleep 600")).await;
    let socket = daemon.socket.to_str().expect("UTF-8");
    let described = agentctl(&["--socket", socket, "describe", "again"]);
    assert!(described.status.success(), "{described:?}");
    let text = String::from_utf8_lossy(&described.stdout);
    assert_eq!(text.matches(" SPAWNED ").count(), 1, "{text}");
    assert!(!text.contains("EXITED"), "the earlier agent's exit: {text}");
    for absent in ["status.json", "error.log"] {
        assert!(!text.contains(absent), "{absent} listed: {text}");
    }
    assert!(text.contains("stdout.log"), "{text}");
    kill_all(&mut client).await;
}

#[tokio::test]
async fn relative_paths_are_relative_to_where_agentctl_runs() {
    let daemon = Daemon::start().await;
    let here = tempfile::tempdir().expect("temp dir");
    std::fs::write(here.path().join("data.txt"), "from data.txt\n").expect("data file");
    let job = here.path().join("job.sh");
    std::fs::write(&job, "#!/bin/sh\necho \"job in $(pwd)\"\ncat data.txt\n").expect("job");
    std::fs::set_permissions(&job, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let run = |args: &[&str]| {
        Command::new(agentctl_path())
            .arg("--socket")
            .arg(&daemon.socket)
            .args(args)
            .current_dir(here.path())
            .stdin(Stdio::null())
            .output()
            .expect("agentctl")
    };
    let ran = run(&["run", "--id", "job", "--", "./job.sh"]);
    assert!(ran.status.success(), "{ran:?}");
    let real = here.path().canonicalize().expect("canonical");
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        format!("job in {}\nfrom data.txt\n", real.display())
    );
    let mut client = daemon.client().await;
    let command = status(&mut client, "job").await.cmdline;
    assert_eq!(
        command,
        [real.join("job.sh").to_string_lossy()],
        "absolute in the API"
    );

    // --in-agent-folder: the agent works in its own folder, as the API's default.
    let ran = run(&["run", "--id", "home", "--in-agent-folder", "--", "pwd"]);
    let folder = status(&mut client, "home").await.agent_dir;
    assert_eq!(String::from_utf8_lossy(&ran.stdout).trim(), folder);
}
