//! systemd's `Type=notify`: READY once serving, WATCHDOG pings at half `$WATCHDOG_USEC`,
//! STOPPING when shutdown begins; and `--log-format json`.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::harness::*;

/// The next notification, failing at the deadline.
fn next(socket: &UnixDatagram) -> String {
    socket
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut buffer = [0u8; 4096];
    let len = socket
        .recv(&mut buffer)
        .expect("a notification within the deadline");
    String::from_utf8_lossy(&buffer[..len]).into_owned()
}

#[tokio::test]
async fn agentd_tells_systemd_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    let mut daemon = Daemon::builder()
        .options(&["--log-format", "json"])
        .env(&[
            ("NOTIFY_SOCKET", path.to_str().expect("path")),
            ("WATCHDOG_USEC", "200000"),
        ])
        .start()
        .await;
    let ready = next(&socket);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!("MAINPID={}", daemon.pid())),
        "{ready}"
    );

    // Pings at half the interval: several within a second.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        assert_eq!(next(&socket), "WATCHDOG=1");
        pings += 1;
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    let log = daemon.log();
    let first = log
        .lines()
        .find(|line| !line.is_empty())
        .expect("a log line");
    let parsed: serde_json::Value = serde_json::from_str(first).expect("JSON log lines");
    assert!(
        parsed["level"].is_string() && parsed["timestamp"].is_string(),
        "{first}"
    );

    assert!(daemon.terminate().await.success());
    let mut last = next(&socket);
    while last == "WATCHDOG=1" {
        last = next(&socket);
    }
    assert_eq!(last, "STOPPING=1");
}
