//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, each call is a span exported over
//! OTLP/gRPC (here to a Python stand-in collector), continuing the caller's `traceparent`,
//! and the spawned agent gets the trace in `TRACEPARENT`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use agentd_proto::v1 as pb;

use crate::harness::*;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

#[tokio::test]
async fn spans_continue_the_callers_trace_and_reach_the_agent() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut collector = Command::new("python3")
        .arg(root.join("tests/python/otlp_collector.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the collector stand-in");
    let (lines_tx, lines) = mpsc::channel();
    let stdout = collector.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let port = lines.recv_timeout(DEADLINE).expect("the collector's port");
    let endpoint = format!("http://127.0.0.1:{port}");
    let daemon = Daemon::start_with_env(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let mut client = daemon.client().await;

    let mut request =
        tonic::Request::new(spawn_request("traced", sh("echo \"trace=$TRACEPARENT\"")));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-00f067aa0ba902b7-01")
            .parse()
            .expect("metadata"),
    );
    client.spawn(request).await.expect("spawn");
    wait_for_state(&mut client, "traced", pb::AgentState::Completed).await;
    let out = std::fs::read_to_string(daemon.data_dir.join("agents/traced/stdout.log"))
        .expect("the agent's output");
    assert!(out.starts_with(&format!("trace=00-{TRACE_ID}-")), "{out}");

    // The Spawn span, in the caller's trace, with its method, status and agent.
    let deadline = Instant::now() + DEADLINE;
    let span = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the Spawn span within the deadline");
        let span: serde_json::Value = serde_json::from_str(&line).expect("a span as JSON");
        if span["name"] == "agentd.v1.AgentSupervisor/Spawn" {
            break span;
        }
    };
    assert_eq!(span["trace_id"], TRACE_ID, "{span}");
    assert_eq!(span["parent_span_id"], "00f067aa0ba902b7", "{span}");
    assert_eq!(span["attributes"]["rpc.grpc.status_code"], 0, "{span}");
    assert_eq!(span["attributes"]["agent.id"], "traced", "{span}");
    assert_eq!(span["resource"]["service.name"], "agentd", "{span}");
    assert_eq!(
        span["resource"]["service.version"],
        env!("CARGO_PKG_VERSION"),
        "{span}"
    );
    assert!(span["resource"]["host.name"].is_string(), "{span}");

    drop(collector.stdin.take());
    let _ = collector.wait();
}
