//! The HTTP API (`--http-listen`): REST/JSON routes that answer as gRPC does, their error
//! statuses, output over HTTP, pagination, server-sent events and `/metrics`.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use agentd_proto::v1 as pb;
use pb::AgentState;
use serde_json::{Value, json};

use crate::harness::*;

const HTTP: [&str; 2] = ["--http-listen", "127.0.0.1:0"];

fn to_json(message: &impl serde::Serialize) -> Value {
    serde_json::to_value(message).expect("proto3 JSON")
}

fn assert_error(answer: &HttpAnswer, status: u16, code: &str) {
    let body = answer.json();
    assert_eq!(
        (answer.status, body["code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn rest_routes_answer_with_the_json_of_the_grpc_messages() {
    let daemon = Daemon::builder().options(&HTTP).start().await;
    let http = daemon.http();
    let mut client = daemon.client().await;

    let spawned = http
        .post(
            "/v1/agents",
            json!({
                "agentId": "web",
                "command": ["sh", "-c", "echo out; echo err >&2; exit 3"],
                "labels": {"team": "a"},
                "stopPolicy": {"firstGrace": "0.3s"},
            }),
        )
        .await;
    assert_eq!(spawned.status, 201, "{}", spawned.text());
    assert_eq!(spawned.json()["status"]["agentId"], "web");
    wait_for_state(&mut client, "web", AgentState::Failed).await;

    // The same agent over both APIs is the same JSON.
    let rest = http.get("/v1/agents/web").await.json();
    assert_eq!(rest, to_json(&status(&mut client, "web").await));
    assert_eq!(rest["state"], "AGENT_STATE_FAILED");
    assert_eq!(rest["exitCode"], 3);
    let listed = http
        .get("/v1/agents?state=AGENT_STATE_FAILED&label=team=a")
        .await
        .json();
    let grpc_listed = client
        .list_agents(pb::ListAgentsRequest {
            states: vec![AgentState::Failed as i32],
            labels: [("team".to_string(), "a".to_string())].into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed, to_json(&grpc_listed));
    assert_eq!(listed["agents"].as_array().map(Vec::len), Some(1));
    assert_eq!(listed["nextPageToken"], "");

    let health = http.get("/v1/agents/web/health").await.json();
    assert_eq!(
        (&health["healthy"], &health["state"]),
        (&json!(false), &json!("AGENT_STATE_FAILED"))
    );
    let stdout = http.get("/v1/agents/web/logs?stream=stdout").await;
    assert_eq!(
        (stdout.status, stdout.text().as_str()),
        (200, "out\n"),
        "{:?}",
        stdout.headers
    );
    assert_eq!(stdout.header("agentd-stdout-offset"), Some("0"));
    let stderr = http.get("/v1/agents/web/logs?stream=STDERR&tail=1").await;
    assert_eq!(stderr.text(), "err\n");
    assert_eq!(http.get("/v1/summary").await.json()["failed"], 1);

    // A running agent: progress, pause and resume, a forced stop, removal.
    let runner = json!({"agentId": "runner", "command": ["sleep", "30"]});
    assert_eq!(http.post("/v1/agents", runner).await.status, 201);
    let progress = http
        .post(
            "/v1/agents/runner/progress",
            json!({"progress": 40, "message": "half"}),
        )
        .await
        .json();
    assert_eq!(progress["status"]["progress"], 40.0);
    assert_eq!(progress["status"]["progressMessage"], "half");
    let paused = http.post("/v1/agents/runner:pause", json!({})).await.json();
    assert_eq!(paused["statuses"][0]["state"], "AGENT_STATE_PAUSED");
    let resumed = http
        .post("/v1/agents/runner:resume", json!({}))
        .await
        .json();
    assert_eq!(resumed["statuses"][0]["state"], "AGENT_STATE_RUNNING");
    let stopped = http
        .post("/v1/agents/runner:stop", json!({"force": true}))
        .await
        .json();
    assert_eq!(stopped["results"][0]["outcome"], "STOP_OUTCOME_KILLED");
    assert!(
        stopped["results"][0]["duration"]
            .as_str()
            .is_some_and(|d| d.ends_with('s')),
        "durations are \"1.5s\": {stopped}"
    );
    let removed = http.call("DELETE", "/v1/agents/runner", None).await;
    assert_eq!(removed.json()["status"]["agentId"], "runner");
    assert_error(&http.get("/v1/agents/runner").await, 404, "NOT_FOUND");
    let all = http
        .post("/v1/agents:stop", json!({"all": true}))
        .await
        .json();
    assert_eq!(all["results"][0]["outcome"], "STOP_OUTCOME_ALREADY_EXITED");

    let reaped = http.post("/v1/zombies:reap", json!({})).await;
    assert_eq!(reaped.json()["agentIds"], json!([]));
    assert_eq!(http.get("/healthz").await.status, 200);
    assert_eq!(http.get("/readyz").await.status, 200);
    // agentctl --json prints the same mapping.
    let printed = Command::new(agentctl_path())
        .args(["--socket", daemon.socket.to_str().expect("path")])
        .args(["status", "web", "--json"])
        .output()
        .expect("agentctl");
    let printed: Value = serde_json::from_slice(&printed.stdout).expect("agentctl JSON");
    assert_eq!(printed, http.get("/v1/agents/web").await.json());
}

#[tokio::test]
async fn every_error_has_its_http_twin() {
    let daemon = Daemon::builder()
        .options(&[
            "--http-listen",
            "127.0.0.1:0",
            "--max-agents",
            "1",
            "--event-retention-count",
            "3",
        ])
        .start()
        .await;
    let http = daemon.http();
    let spawn = |id: &str| json!({"agentId": id, "command": ["sleep", "30"]});

    let no_command = http.call("POST", "/v1/agents", None).await;
    assert_error(&no_command, 400, "INVALID_ARGUMENT");
    let typo = http.post("/v1/agents", json!({"comand": ["x"]})).await;
    assert_error(&typo, 400, "INVALID_ARGUMENT");
    assert!(typo.text().contains("comand"), "{}", typo.text());
    let bad_enum = http.get("/v1/agents?state=RUNNING").await;
    assert_error(&bad_enum, 400, "INVALID_ARGUMENT");
    assert!(bad_enum.text().contains("state"), "{}", bad_enum.text());
    assert_error(
        &http.get("/v1/agents?page_token=../x").await,
        400,
        "INVALID_ARGUMENT",
    );
    // Just over the limit, so the whole body is sent before the answer comes.
    let huge = json!({"command": ["true"], "prompt": "x".repeat(4 << 20)});
    assert_error(
        &http.post("/v1/agents", huge).await,
        429,
        "RESOURCE_EXHAUSTED",
    );
    assert_error(&http.get("/v1/agents/ghost").await, 404, "NOT_FOUND");
    assert_error(&http.get("/v2/anything").await, 404, "NOT_FOUND");
    assert_error(
        &http.post("/v1/agents/ghost:frobnicate", json!({})).await,
        404,
        "NOT_FOUND",
    );

    assert_eq!(http.post("/v1/agents", spawn("one")).await.status, 201);
    assert_error(
        &http.post("/v1/agents", spawn("one")).await,
        409,
        "ALREADY_EXISTS",
    );
    assert_error(
        &http.post("/v1/agents", spawn("two")).await,
        429,
        "RESOURCE_EXHAUSTED",
    );
    assert_error(
        &http.call("DELETE", "/v1/agents/one", None).await,
        412,
        "FAILED_PRECONDITION",
    );
    // Events beyond the three kept: resuming from the first is gone.
    http.post("/v1/agents/one:stop", json!({"force": true}))
        .await;
    // One at a time (`--max-agents 1`): each has ended before the next is asked for.
    let mut client = daemon.client().await;
    for id in ["a", "b"] {
        http.post("/v1/agents", json!({"agentId": id, "command": ["true"]}))
            .await;
        wait_for_state(&mut client, id, AgentState::Completed).await;
    }
    let gone = http
        .send("GET", "/v1/events", &[("last-event-id", "1")], None)
        .await;
    assert_eq!(gone.status(), 410);
}

#[tokio::test]
async fn a_daemon_shutting_down_is_not_ready_and_refuses_spawns() {
    let mut daemon = Daemon::builder().options(&HTTP).start().await;
    let http = daemon.http();
    // An agent that ignores SIGTERM keeps the shutdown's ladder busy for a while.
    let stubborn = json!({
        "agentId": "stubborn",
        "command": ["sh", "-c", "trap '' TERM; echo up; while :; do sleep 0.1; done"],
        "stopPolicy": {"firstGrace": "3s", "secondGrace": "0.1s"},
    });
    assert_eq!(http.post("/v1/agents", stubborn).await.status, 201);
    let mut client = daemon.client().await;
    wait_for(&mut client, "stubborn", "up", |s| s.process_alive).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM agentd");
    eventually("/readyz answers 503", async || {
        http.get("/readyz").await.status == 503
    })
    .await;
    let refused = http.post("/v1/agents", json!({"command": ["true"]})).await;
    assert_error(&refused, 503, "UNAVAILABLE");
    assert_eq!(http.get("/healthz").await.status, 200);
    assert!(daemon.wait_exit("after the shutdown").await.success());
}

#[tokio::test]
async fn followed_output_streams_until_the_end_and_resumes_from_an_offset() {
    let daemon = Daemon::builder().options(&HTTP).start().await;
    let http = daemon.http();
    let script = "for i in 1 2 3; do echo line$i; sleep 0.2; done";
    let spawned = http
        .post(
            "/v1/agents",
            json!({"agentId": "writer", "command": ["sh", "-c", script]}),
        )
        .await;
    assert_eq!(spawned.status, 201);
    let followed = http
        .get("/v1/agents/writer/logs?stream=stdout&follow=true")
        .await;
    assert_eq!(followed.text(), "line1\nline2\nline3\n");
    assert_eq!(followed.header("agentd-stdout-offset"), Some("0"));
    assert_eq!(followed.header("agentd-stderr-offset"), None);
    // A client that got the first six bytes resumes after them.
    let resumed = http
        .get("/v1/agents/writer/logs?stream=stdout&stdout_offset=6")
        .await;
    assert_eq!(resumed.text(), "line2\nline3\n");
    assert_eq!(resumed.header("agentd-stdout-offset"), Some("6"));
    let past_end = http
        .get("/v1/agents/writer/logs?stream=stdout&stdoutOffset=999")
        .await;
    assert_error(&past_end, 400, "OUT_OF_RANGE");
}

#[tokio::test]
async fn pages_list_every_one_of_2500_agents_exactly_once() {
    let daemon = Daemon::builder()
        .options(&[
            "--http-listen",
            "127.0.0.1:0",
            "--retain-finished-count",
            "5000",
        ])
        .start()
        .await;
    let client = daemon.client().await;
    let mut spawners = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let mut client = client.clone();
        spawners.spawn(async move {
            for i in (worker..2500).step_by(8) {
                spawn(&mut client, &format!("agent-{i:04}"), vec!["true".into()]).await;
            }
        });
    }
    while let Some(done) = spawners.join_next().await {
        done.expect("spawner");
    }
    let expected: BTreeSet<String> = (0..2500).map(|i| format!("agent-{i:04}")).collect();

    // REST, 300 at a time, with agents spawned meanwhile (listed or not, never twice).
    let http = daemon.http();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut client = client.clone();
    for page in 0.. {
        let answer = http
            .get(&format!("/v1/agents?page_size=300&page_token={token}"))
            .await
            .json();
        let agents = answer["agents"].as_array().expect("agents");
        assert!(agents.len() <= 300);
        seen.extend(
            agents
                .iter()
                .map(|a| a["agentId"].as_str().expect("id").to_string()),
        );
        spawn(&mut client, &format!("late-{page}"), vec!["true".into()]).await;
        token = answer["nextPageToken"].as_str().expect("token").to_string();
        if token.is_empty() {
            break;
        }
    }
    check_pages(&seen, &expected);

    // gRPC, default page size.
    let mut seen = Vec::new();
    let mut request = pb::ListAgentsRequest::default();
    loop {
        let page = client
            .list_agents(request.clone())
            .await
            .expect("list")
            .into_inner();
        assert!(page.agents.len() <= 1000);
        seen.extend(page.agents.into_iter().map(|a| a.agent_id));
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    check_pages(&seen, &expected);
}

fn check_pages(seen: &[String], expected: &BTreeSet<String>) {
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an agent listed twice");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "not in id order");
    let missed: Vec<&String> = expected.iter().filter(|id| !unique.contains(id)).collect();
    assert!(
        missed.is_empty(),
        "missed {} agents: {missed:?}",
        missed.len()
    );
}

/// Lifecycle events only: health samples are live-only and never replayed.
const LIFECYCLE: &str = "kind=EVENT_KIND_SPAWNED&kind=EVENT_KIND_EXITED&kind=EVENT_KIND_STOPPING&kind=EVENT_KIND_KILLED&kind=EVENT_KIND_ADOPTED";

#[tokio::test]
async fn events_resume_with_last_event_id_across_a_daemon_restart() {
    let daemon = Daemon::builder()
        .options(&["--http-listen", "127.0.0.1:0", "--on-shutdown", "detach"])
        .start()
        .await;
    let http = daemon.http();
    let mut events = SseReader::new(
        http.send("GET", &format!("/v1/events?{LIFECYCLE}"), &[], None)
            .await,
    );
    http.post(
        "/v1/agents",
        json!({"agentId": "first", "command": ["true"]}),
    )
    .await;
    http.post(
        "/v1/agents",
        json!({"agentId": "second", "command": ["sleep", "30"]}),
    )
    .await;
    let mut seen = events
        .until(|e| e.event == "EVENT_KIND_SPAWNED" && e.json()["agentId"] == "second")
        .await;
    let last = seen.last().expect("an event").sequence();
    drop(events);

    // The daemon goes away; what happens meanwhile is for the next one to tell.
    let dir = daemon.crash();
    let daemon = Daemon::builder().dir(dir).options(&HTTP).start().await;
    let http = daemon.http();
    let mut client = daemon.client().await;
    let third = spawn_request("third", vec!["true".into()]);
    spawn_with(&mut client, third).await;
    stop(&mut client, &["second"], true).await;

    // A browser reconnects to the same URL with the last id it saw.
    let mut resumed = SseReader::new(
        http.send(
            "GET",
            &format!("/v1/events?{LIFECYCLE}&snapshot=true"),
            &[("last-event-id", &last.to_string())],
            None,
        )
        .await,
    );
    seen.extend(
        resumed
            .until(|e| e.event == "EVENT_KIND_KILLED" && e.json()["agentId"] == "second")
            .await,
    );
    // Exactly the log's lifecycle events, in order: no gap, no duplicate, no snapshot.
    let mut log = client
        .watch_agents(pb::WatchAgentsRequest {
            after_sequence: Some(0),
            kinds: [
                pb::EventKind::Spawned,
                pb::EventKind::Exited,
                pb::EventKind::Stopping,
                pb::EventKind::Killed,
                pb::EventKind::Adopted,
            ]
            .map(|k| k as i32)
            .into(),
            ..Default::default()
        })
        .await
        .expect("replay")
        .into_inner();
    let mut expected = Vec::new();
    while expected.len() < seen.len() {
        expected.push(next_event(&mut log).await);
    }
    let expected: Vec<(u64, Value)> = expected.iter().map(|e| (e.sequence, to_json(e))).collect();
    let got: Vec<(u64, Value)> = seen.iter().map(|e| (e.sequence(), e.json())).collect();
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        expected.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    for ((_, got), (_, expected)) in got.iter().zip(&expected) {
        assert_eq!(got["kind"], expected["kind"]);
        assert_eq!(got["agentId"], expected["agentId"]);
    }
    assert!(seen.iter().any(|e| e.json()["agentId"] == "third"));
}

/// Every sample of `/metrics` as the Prometheus project's own Python parser reads it.
fn parse_metrics(text: &str, format: &str) -> Vec<Value> {
    use std::io::Write;
    let mut parser = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/python/parse_metrics.py"
        ))
        .arg(format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    parser
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let output = parser.wait_with_output().expect("parser");
    assert!(
        output.status.success(),
        "{format} did not parse: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("sample"))
        .collect()
}

fn sample(samples: &[Value], name: &str, labels: Value) -> f64 {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .as_object()
                    .expect("labels")
                    .iter()
                    .all(|(k, v)| &s["labels"][k] == v)
        })
        .and_then(|s| s["value"].as_f64())
        .unwrap_or_else(|| panic!("no sample {name} {labels}"))
}

#[tokio::test]
async fn metrics_parse_in_both_formats_and_count_what_happens() {
    if !requires(Need::Python("prometheus_client")) {
        return;
    }
    let daemon = Daemon::builder()
        .options(&[
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-per-agent",
            "--metrics-agent-label",
            "team",
        ])
        .start()
        .await;
    let http = daemon.http();
    let mut client = daemon.client().await;
    let scrape = || async {
        let classic = http.get("/metrics").await;
        assert!(
            classic
                .header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4"))
        );
        let samples = parse_metrics(&classic.text(), "text");
        let answer = http
            .send(
                "GET",
                "/metrics",
                &[("accept", "application/openmetrics-text; version=1.0.0")],
                None,
            )
            .await;
        use http_body_util::BodyExt;
        let text = answer.into_body().collect().await.expect("body").to_bytes();
        parse_metrics(&String::from_utf8_lossy(&text), "openmetrics");
        samples
    };
    let before = scrape().await;
    assert_eq!(
        sample(&before, "agentd_spawns_total", json!({"result": "started"})),
        0.0
    );
    assert_eq!(sample(&before, "agentd_build_info", json!({})), 1.0);

    // One that fails twice (a restart between), one that runs, one rejected.
    let mut flaky = spawn_request("flaky", sh("exit 1"));
    flaky.restart_policy = pb::RestartPolicy::OnFailure as i32;
    flaky.max_restarts = 1;
    flaky.restart_backoff = Some(pb::RestartBackoff {
        initial: Some(std::time::Duration::from_millis(50).into()),
        ..Default::default()
    });
    spawn_with(&mut client, flaky).await;
    let mut worker = spawn_request("worker", vec!["sleep".into(), "30".into()]);
    worker.labels = [("team".to_string(), "blue".to_string())].into();
    spawn_with(&mut client, worker).await;
    let rejected = http.post("/v1/agents", json!({"command": []})).await;
    assert_eq!(rejected.status, 400);
    wait_for(&mut client, "flaky", "given up", |s| {
        s.state == AgentState::Failed as i32 && s.restart_count == 1
    })
    .await;
    stop(&mut client, &["worker"], false).await;
    let after = scrape().await;
    let count = |name: &str, labels: Value| sample(&after, name, labels);
    assert_eq!(
        count("agentd_spawns_total", json!({"result": "started"})),
        2.0
    );
    assert_eq!(
        count("agentd_spawns_total", json!({"result": "rejected"})),
        1.0
    );
    assert_eq!(count("agentd_restarts_total", json!({})), 1.0);
    assert_eq!(
        count("agentd_agent_exits_total", json!({"end_reason": "exited"})),
        2.0
    );
    assert_eq!(
        count("agentd_agent_exits_total", json!({"end_reason": "stopped"})),
        1.0
    );
    assert_eq!(
        count("agentd_events_total", json!({"kind": "restarting"})),
        1.0
    );
    assert_eq!(count("agentd_agents", json!({"state": "failed"})), 1.0);
    assert_eq!(count("agentd_agents", json!({"state": "killed"})), 1.0);
    assert_eq!(
        count(
            "agentd_stop_duration_seconds_count",
            json!({"outcome": "exited_on_first_signal"})
        ),
        1.0
    );
    assert!(
        count(
            "agentd_rpc_duration_seconds_count",
            json!({"method": "Spawn", "code": "INVALID_ARGUMENT"})
        ) >= 1.0
    );
    assert!(count("agentd_sample_duration_seconds_count", json!({})) >= 1.0);
    assert!(count("agentd_store_bytes", json!({})) > 0.0);

    // Per-agent series while an agent runs, with the label asked for.
    let mut live = spawn_request("live", vec!["sleep".into(), "30".into()]);
    live.labels = [("team".to_string(), "red".to_string())].into();
    spawn_with(&mut client, live).await;
    wait_for(&mut client, "live", "sampled", |s| s.memory_mb > 0.0).await;
    let samples = scrape().await;
    assert!(
        sample(
            &samples,
            "agentd_agent_memory_bytes",
            json!({"agent_id": "live", "label_team": "red"})
        ) > 0.0
    );
    assert!(
        !samples.iter().any(|s| s["labels"]["agent_id"] == "worker"),
        "an ended agent keeps no per-agent series"
    );
    kill_all(&mut client).await;
}

/// Two spellings of the same proto3 JSON made one: numbers as f64 (Go writes `0`, serde
/// `0.0`), and no `null` fields (Go's -emit-defaults writes an unset message as `null`;
/// pbjson leaves it out).
fn normalized(value: Value) -> Value {
    match value {
        Value::Number(n) => json!(n.as_f64()),
        Value::Array(items) => Value::Array(items.into_iter().map(normalized).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, normalized(v)))
                .collect(),
        ),
        other => other,
    }
}

#[tokio::test]
async fn rest_json_is_the_json_protobuf_itself_writes() {
    if !requires(Need::Grpcurl) {
        return;
    }
    let daemon = Daemon::builder().options(&HTTP).start().await;
    let http = daemon.http();
    let mut client = daemon.client().await;
    let mut request = spawn_request("mapped", sh("echo hi; exit 2"));
    request.labels = [("team".to_string(), "a".to_string())].into();
    request.max_runtime = Some(std::time::Duration::from_millis(1500).into());
    spawn_with(&mut client, request).await;
    wait_for_state(&mut client, "mapped", AgentState::Failed).await;
    // grpcurl prints Go's protojson (with -emit-defaults, every field as ours does).
    let output = Command::new("grpcurl")
        .args([
            "-plaintext",
            "-unix",
            "-authority",
            "localhost",
            "-emit-defaults",
        ])
        .args(["-d", r#"{"agent_id": "mapped"}"#])
        .arg(&daemon.socket)
        .arg("agentd.v1.AgentSupervisor/Status")
        .output()
        .expect("grpcurl");
    assert!(output.status.success(), "{output:?}");
    let go: Value = serde_json::from_slice(&output.stdout).expect("grpcurl JSON");
    let ours = json!({"status": http.get("/v1/agents/mapped").await.json()});
    assert_eq!(normalized(ours.clone()), normalized(go));
    let started = ours["status"]["startedAt"].as_str().expect("startedAt");
    assert!(started.ends_with('Z'), "{started}");
}

#[tokio::test]
async fn an_event_stream_that_is_not_read_is_ended_as_a_slow_watcher() {
    if !requires(Need::Python("prometheus_client")) {
        return;
    }
    let daemon = Daemon::builder()
        .options(&[
            "--http-listen",
            "127.0.0.1:0",
            "--watch-buffer",
            "1",
            "--sample-interval",
            "10ms",
        ])
        .start()
        .await;
    let http = daemon.http();
    let mut client = daemon.client().await;
    for i in 0..20 {
        spawn(
            &mut client,
            &format!("busy-{i}"),
            vec!["sleep".into(), "30".into()],
        )
        .await;
    }
    // Health samples of 20 agents every 10 ms fill the socket's buffers, then the queue.
    let response = http.send("GET", "/v1/events", &[], None).await;
    eventually("the slow watcher is ended", async || {
        let samples = parse_metrics(&http.get("/metrics").await.text(), "text");
        let ended = sample(
            &samples,
            "agentd_watchers_ended_total",
            json!({"reason": "slow"}),
        );
        if ended == 1.0 { Ok(()) } else { Err(ended) }
    })
    .await;
    // Reading now: what was buffered, then why it ended.
    let mut events = SseReader::new(response);
    let last = loop {
        let event = events.next().await.expect("an error before the end");
        if event.event == "error" {
            break event;
        }
    };
    assert_eq!(last.json()["code"], "RESOURCE_EXHAUSTED", "{}", last.data);
    assert!(last.data.contains("after_sequence"), "{}", last.data);
    assert!(
        events.next().await.is_none(),
        "the stream ends after the error"
    );
    kill_all(&mut client).await;
}

#[tokio::test]
async fn the_summary_tells_what_the_host_offers() {
    let daemon = Daemon::builder().options(&HTTP).start().await;
    let host = daemon.http().get("/v1/summary").await.json()["host"].clone();
    let online = std::fs::read_to_string("/proc/stat")
        .expect("/proc/stat")
        .lines()
        .filter(|line| {
            line.strip_prefix("cpu")
                .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .count();
    assert_eq!(host["cpus"], online, "{host}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let total_kb: f64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("MemTotal");
    let total = host["memoryTotalMb"].as_f64().expect("total");
    assert!((total - total_kb / 1024.0).abs() < 1.0, "{host}");
    let available = host["memoryAvailableMb"].as_f64().expect("available");
    assert!(available > 0.0 && available <= total, "{host}");
    for load in ["loadAverage1m", "loadAverage5m", "loadAverage15m"] {
        assert!(host[load].as_f64().is_some_and(|l| l >= 0.0), "{host}");
    }
}

/// `view=figures` on `/v1/events`: a health sample's data is the figures a table shows, about
/// a tenth of the whole; an unknown view is a 400.
#[tokio::test]
async fn events_with_the_figures_view_send_short_health_samples() {
    let daemon = Daemon::builder().options(&HTTP).start().await;
    let http = daemon.http();
    http.post(
        "/v1/agents",
        json!({"agentId": "sampled", "command": ["sleep", "30"]}),
    )
    .await;
    let health = "kind=EVENT_KIND_HEALTH&agent=sampled";
    let mut whole = SseReader::new(
        http.send("GET", &format!("/v1/events?{health}"), &[], None)
            .await,
    );
    let mut figures = SseReader::new(
        http.send(
            "GET",
            &format!("/v1/events?{health}&view=figures"),
            &[],
            None,
        )
        .await,
    );
    let short = figures
        .until(|e| e.event == "EVENT_KIND_HEALTH")
        .await
        .pop()
        .expect("a sample");
    let long = whole
        .until(|e| e.sequence() >= short.sequence())
        .await
        .pop()
        .expect("a sample");
    assert_eq!(long.sequence(), short.sequence());
    let (short, long) = (
        short.json()["status"].clone(),
        long.json()["status"].clone(),
    );
    assert_eq!(short["agentId"], "sampled");
    assert_eq!(short["state"], "AGENT_STATE_RUNNING");
    assert_eq!(short["memoryMb"], long["memoryMb"]);
    assert!(
        long["cmdline"].is_array() && short.get("cmdline").is_none(),
        "{short}"
    );
    let fields: Vec<&String> = short.as_object().expect("an object").keys().collect();
    let figures = agentd_proto::figures::FIGURES_JSON;
    assert!(
        fields.iter().all(|field| figures.contains(&field.as_str())),
        "only the figures: {short}"
    );
    assert!(
        short.to_string().len() * 2 < long.to_string().len(),
        "{short} against {long}"
    );

    let refused = http.get("/v1/events?view=all").await;
    assert_error(&refused, 400, "INVALID_ARGUMENT");
}
