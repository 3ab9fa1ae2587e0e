//! The web dashboard in a real headless Chromium: `tests/python/dashboard.py` starts its own
//! agentd (it kills and restarts it), drives the page with Playwright and asserts what a
//! person would see.

use std::process::Command;

use crate::harness::{Need, requires};

#[test]
fn the_dashboard_follows_agents_stops_one_and_survives_a_daemon_restart() {
    if !requires(Need::Chromium) {
        return;
    }
    if !requires(Need::Python("playwright")) {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new("python3")
        .arg(root.join("tests/python/dashboard.py"))
        .arg(env!("CARGO_BIN_EXE_agentd"))
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("dashboard ok"),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
