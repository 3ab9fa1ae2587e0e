//! The fleet example against three daemons on this machine, one killed and restarted in the
//! middle: placement by free capacity, merged event streams resumed per node, nothing missed.

use std::process::Command;

use crate::harness::{Need, requires};

#[test]
fn the_fleet_coordinator_places_follows_and_survives_a_node_restart() {
    if !requires(Need::Python("grpc_tools")) {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new("python3")
        .arg(root.join("examples/fleet_coordinator.py"))
        .args(["self-test", "--agentd", env!("CARGO_BIN_EXE_agentd")])
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("fleet ok"),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
