//! agentctl on its own, without a daemon: what it says when it is used wrongly or cannot
//! reach agentd. Everything it does with a daemon is tested end to end in `tests/e2e/`
//! (which also finds this binary: building this test is what builds it under
//! `cargo test --workspace`).

// The rule that only the daemon's reaper waits for children is the daemon's; a test is
// another process and waits for what it starts.
#![allow(clippy::disallowed_methods)]

use std::process::{Command, Output};

fn agentctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_agentctl"))
        .args(args)
        .env_remove("AGENTD_SOCKET")
        .env_remove("AGENTD_ADDR")
        .env_remove("AGENTD_TOKEN")
        .output()
        .expect("running agentctl")
}

#[test]
fn a_usage_error_exits_2() {
    let output = agentctl(&["wait", "a1", "--timeout", "soon"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a duration"), "{stderr}");

    let output = agentctl(&["list", "--label", "no-equals-sign"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
}

#[test]
fn no_daemon_exits_1_naming_where_it_looked() {
    let output = agentctl(&["--socket", "/nonexistent/agentd.sock", "list"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("agentctl: connecting to agentd at unix:///nonexistent/agentd.sock"),
        "{stderr}"
    );
}

#[test]
fn https_needs_the_ca() {
    let output = agentctl(&["--addr", "https://127.0.0.1:1", "list"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("give --ca-cert"), "{stderr}");
}
