//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, each call is a span exported over
//! OTLP/gRPC (here to a Python stand-in collector), continuing the caller's `traceparent`,
//! with child spans for a spawn's steps, a stop ladder's signals and a restart; the spawned
//! agent gets the trace in `TRACEPARENT`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use agentd_proto::v1 as pb;
use serde_json::Value;

use crate::harness::*;

const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The stand-in collector and every span it has printed so far.
struct Collector {
    process: Child,
    endpoint: String,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    spans: Vec<Value>,
}

impl Collector {
    async fn start() -> Collector {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let mut process = Command::new("python3")
            .arg(root.join("tests/python/otlp_collector.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the collector stand-in");
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = process.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines_tx.send(line).is_err() {
                    return;
                }
            }
        });
        let port = tokio::time::timeout(DEADLINE, lines.recv())
            .await
            .ok()
            .flatten()
            .expect("the collector's port");
        Collector {
            process,
            endpoint: format!("http://127.0.0.1:{port}"),
            lines,
            spans: Vec::new(),
        }
    }

    /// An agentd exporting to it, a batch of spans at least every `batch_ms`.
    async fn daemon(&self, options: &[&str], batch_ms: &str) -> Daemon {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", self.endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", batch_ms),
        ];
        Daemon::builder().options(options).env(&env).start().await
    }

    /// The first span received (now or within the deadline) that `wanted` picks.
    async fn span(&mut self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        self.spans(what, 1, wanted).await.remove(0)
    }

    /// The first `count` spans received (now or within the deadline) that `wanted` picks.
    async fn spans(
        &mut self,
        what: &str,
        count: usize,
        wanted: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let found: Vec<Value> = self.spans.iter().filter(|s| wanted(s)).cloned().collect();
            if found.len() >= count {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, self.lines.recv())
                .await
                .ok()
                .flatten()
                .unwrap_or_else(|| {
                    panic!("no {what} within the deadline; received {:#?}", self.spans)
                });
            self.spans
                .push(serde_json::from_str(&line).expect("a span as JSON"));
        }
    }

    /// The span of the first call of `method` (of agentd.v1.AgentSupervisor) in `trace`.
    async fn call(&mut self, method: &str, trace: &str) -> Value {
        let name = format!("agentd.v1.AgentSupervisor/{method}");
        self.span(method, |span| {
            span["name"] == name && span["trace_id"] == trace
        })
        .await
    }

    /// The span named `name` whose parent is `parent` (a span id), in trace `trace`.
    async fn child(&mut self, name: &str, trace: &Value, parent: &Value) -> Value {
        let what = format!("{name} under {parent}");
        self.span(&what, |span| {
            span["name"] == name && span["trace_id"] == *trace && span["parent_span_id"] == *parent
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

fn traced<T>(message: T, trace_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let traceparent = format!("00-{trace_id}-{CALLER_SPAN}-01");
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().expect("metadata"));
    request
}

#[tokio::test]
async fn spans_continue_the_callers_trace_and_reach_the_agent() {
    if !requires(Need::Python("grpc")) {
        return;
    }
    if !requires(Need::Python("opentelemetry.proto")) {
        return;
    }
    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut collector = Collector::start().await;
    let daemon = collector
        .daemon(&["--http-listen", "127.0.0.1:0"], "100")
        .await;
    let mut client = daemon.client().await;

    let request = spawn_request("traced", sh("echo \"trace=$TRACEPARENT\""));
    client.spawn(traced(request, TRACE)).await.expect("spawn");
    wait_for_state(&mut client, "traced", pb::AgentState::Completed).await;

    // The Spawn span, in the caller's trace, with its method, status and agent.
    let spawn = collector.call("Spawn", TRACE).await;
    assert_eq!(spawn["trace_id"], TRACE, "{spawn}");
    assert_eq!(spawn["parent_span_id"], CALLER_SPAN, "{spawn}");
    assert_eq!(spawn["attributes"]["rpc.grpc.status_code"], 0, "{spawn}");
    assert_eq!(spawn["attributes"]["agent.id"], "traced", "{spawn}");
    assert_eq!(spawn["resource"]["service.name"], "agentd", "{spawn}");
    assert_eq!(
        spawn["resource"]["service.version"],
        env!("CARGO_PKG_VERSION"),
        "{spawn}"
    );
    assert!(spawn["resource"]["host.name"].is_string(), "{spawn}");

    // The agent's own spans would be children of the Spawn span.
    let span_id = spawn["span_id"].as_str().expect("a span id");
    let out = std::fs::read_to_string(daemon.data_dir.join("agents/traced/stdout.log"))
        .expect("the agent's output");
    assert_eq!(out.trim(), format!("trace=00-{TRACE}-{span_id}-01"));

    // Its steps, in order, inside it.
    let trace = &spawn["trace_id"];
    let id = &spawn["span_id"];
    let folder = collector.child("agentd.spawn.folder", trace, id).await;
    let exec = collector.child("agentd.spawn.exec", trace, id).await;
    let flush = collector.child("agentd.spawn.flush", trace, id).await;
    assert_eq!(exec["attributes"]["agent.id"], "traced", "{exec}");
    let times = |span: &Value| (span["start"].as_u64(), span["end"].as_u64());
    let steps = [times(&folder), times(&exec), times(&flush)];
    for pair in steps.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "steps overlap: {steps:?}");
    }
    assert!(times(&spawn).0 <= steps[0].0 && steps[2].1 <= times(&spawn).1);
    // An HTTP request continues the caller's trace the same way.
    let traceparent = format!("00-{TRACE}-{CALLER_SPAN}-01");
    let answer = daemon
        .http()
        .send(
            "GET",
            "/v1/agents/traced",
            &[("traceparent", &traceparent)],
            None,
        )
        .await;
    assert_eq!(answer.status(), 200);
    drop(answer);
    let get = collector
        .span("the HTTP request", |span| {
            span["name"] == "GET /v1/agents/traced"
        })
        .await;
    assert_eq!(get["trace_id"], TRACE, "{get}");
    assert_eq!(get["parent_span_id"], CALLER_SPAN, "{get}");
    assert_eq!(get["attributes"]["http.response.status_code"], 200, "{get}");
    assert_eq!(get["attributes"]["agent.id"], "traced", "{get}");

    let log = daemon.log();
    assert!(
        log.contains("Spawned") && !log.contains("rpc{") && !log.contains("agentd.spawn"),
        "the log reads as with tracing off:\n{log}"
    );
}

#[tokio::test]
async fn a_stop_ladder_and_restarts_are_spans() {
    if !requires(Need::Python("grpc")) {
        return;
    }
    if !requires(Need::Python("opentelemetry.proto")) {
        return;
    }
    const STOP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const RESTART_TRACE: &str = "a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const WATCH_TRACE: &str = "5c6d7e8f90a1b2c3d4e5f60718293a4b";
    let mut collector = Collector::start().await;
    let daemon = collector.daemon(&[], "100").await;
    let mut client = daemon.client().await;
    // A stream's span lasts as long as the stream.
    let mut events = client
        .watch_agents(traced(pb::WatchAgentsRequest::default(), WATCH_TRACE))
        .await
        .expect("watch")
        .into_inner();

    // A stop that needs every step: the agent ignores SIGTERM (and so does its sleep).
    let mut stubborn = spawn_request(
        "stubborn",
        sh("trap '' TERM; echo ready; while :; do sleep 0.05; done"),
    );
    stubborn.stop_policy = quick_ladder();
    spawn_with(&mut client, stubborn).await;
    assert_eq!(next_event(&mut events).await.agent_id, "stubborn");
    let stdout = daemon.data_dir.join("agents/stubborn/stdout.log");
    eventually("the agent ignores SIGTERM", async || {
        std::fs::read_to_string(&stdout).is_ok_and(|out| out.contains("ready"))
    })
    .await;
    let cleanup = pb::CleanupRequest {
        agent_ids: vec!["stubborn".into()],
        ..Default::default()
    };
    client
        .cleanup(traced(cleanup, STOP_TRACE))
        .await
        .expect("cleanup");
    let call = collector.call("Cleanup", STOP_TRACE).await;
    assert_eq!(call["attributes"]["agent.id"], "stubborn", "{call}");
    let ladder = collector
        .child("agentd.stop", &call["trace_id"], &call["span_id"])
        .await;
    assert_eq!(ladder["trace_id"], STOP_TRACE);
    assert_eq!(ladder["attributes"]["agent.id"], "stubborn", "{ladder}");
    assert_eq!(ladder["attributes"]["stop.reason"], "requested", "{ladder}");
    assert_eq!(ladder["attributes"]["stop.outcome"], "killed", "{ladder}");
    let mut steps = collector
        .spans("three signal steps", 3, |span| {
            span["name"] == "agentd.stop.signal" && span["parent_span_id"] == ladder["span_id"]
        })
        .await;
    steps.sort_by_key(|span| span["start"].as_u64());
    let signals: Vec<&Value> = steps.iter().map(|s| &s["attributes"]["signal"]).collect();
    assert_eq!(signals, ["SIGTERM", "SIGTERM", "SIGKILL"], "{steps:#?}");

    let stream_closed = std::time::SystemTime::now();
    drop(events);
    let watch = collector.call("WatchAgents", WATCH_TRACE).await;
    let closed_ns = stream_closed
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as u64;
    assert!(watch["end"].as_u64() >= Some(closed_ns), "{watch}");
    assert_eq!(
        watch["attributes"]["rpc.grpc.status_code"], 1,
        "CANCELLED: {watch}"
    );

    // A restart the policy decides is a trace of its own, with the new process's start.
    let mut flaky = spawn_request("flaky", sh("exit 3"));
    flaky.restart_policy = pb::RestartPolicy::OnFailure as i32;
    flaky.max_restarts = 1;
    flaky.restart_backoff = Some(pb::RestartBackoff {
        initial: Some(std::time::Duration::from_millis(100).into()),
        ..Default::default()
    });
    spawn_with(&mut client, flaky).await;
    let restart = collector
        .span("the policy's restart", |span| {
            span["name"] == "agentd.restart" && span["attributes"]["agent.id"] == "flaky"
        })
        .await;
    assert_eq!(restart["parent_span_id"], "", "{restart}");
    assert_eq!(
        restart["attributes"]["restart.outcome"], "started",
        "{restart}"
    );
    assert!(
        restart["attributes"]["restart.reason"]
            .as_str()
            .is_some_and(|why| why.starts_with("restarting in")),
        "{restart}"
    );
    let exec = collector
        .child(
            "agentd.spawn.exec",
            &restart["trace_id"],
            &restart["span_id"],
        )
        .await;
    assert_eq!(exec["attributes"]["agent.id"], "flaky", "{exec}");

    // A restart a client asks for: its ladder and the new start are the call's children.
    spawn(&mut client, "again", vec!["sleep".into(), "600".into()]).await;
    let restart = pb::RestartRequest {
        agent_ids: vec!["again".into()],
    };
    client
        .restart(traced(restart, RESTART_TRACE))
        .await
        .expect("restart");
    let call = collector.call("Restart", RESTART_TRACE).await;
    assert_eq!(call["attributes"]["agent.id"], "again", "{call}");
    let (trace, id) = (&call["trace_id"], &call["span_id"]);
    let ladder = collector.child("agentd.stop", trace, id).await;
    assert_eq!(ladder["attributes"]["stop.reason"], "restart", "{ladder}");
    assert_eq!(
        ladder["attributes"]["stop.outcome"], "exited on first signal",
        "{ladder}"
    );
    let restart = collector.child("agentd.restart", trace, id).await;
    assert_eq!(
        restart["attributes"]["restart.outcome"], "started",
        "{restart}"
    );
    collector
        .child("agentd.spawn.exec", trace, &restart["span_id"])
        .await;
    kill_all(&mut client).await;
}

#[tokio::test]
async fn the_last_spans_are_sent_at_exit() {
    if !requires(Need::Python("grpc")) {
        return;
    }
    if !requires(Need::Python("opentelemetry.proto")) {
        return;
    }
    const EXIT_TRACE: &str = "6e7f8091a2b3c4d5e6f708192a3b4c5d";
    let mut collector = Collector::start().await;
    // Nothing would be sent for ten minutes but for the flush at exit.
    let mut daemon = collector.daemon(&[], "600000").await;
    let mut client = daemon.client().await;
    let request = pb::StatusRequest {
        agent_id: "nobody".into(),
    };
    let missing = client
        .status(traced(request, EXIT_TRACE))
        .await
        .expect_err("no such agent");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // The wait is async, so this runtime goes on to close the client's connection and
    // agentd need not wait for it.
    drop(client);
    assert!(daemon.terminate().await.success());
    let status = collector.call("Status", EXIT_TRACE).await;
    assert_eq!(status["attributes"]["rpc.grpc.status_code"], 5, "{status}");
    assert_eq!(status["attributes"]["agent.id"], "nobody", "{status}");
}
