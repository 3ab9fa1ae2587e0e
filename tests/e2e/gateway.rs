//! The LLM gateway (`--llm-providers`): agents call a test provider
//! (`tests/python/llm_provider.py`) through agentd with the key agentd gave them, never the
//! real one, and what each request cost is counted in their status.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use agentd_proto::v1 as pb;

use crate::harness::*;

const REAL_KEY: &str = "sk-real-provider-key-never-shown";

/// The test provider, killed when dropped.
struct Provider {
    child: Child,
    port: u16,
}

impl Provider {
    fn start() -> Provider {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/llm_provider.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(REAL_KEY)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the test provider");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("its stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("the provider prints its port");
        let port = line.trim().parse().expect("a port");
        Provider { child, port }
    }
}

impl Provider {
    /// Each request the provider received: its model and when (the provider's clock).
    fn arrivals(&self) -> Vec<(String, f64)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("provider");
        stream
            .write_all(b"GET /arrivals HTTP/1.0\r\n\r\n")
            .expect("ask for arrivals");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("arrivals");
        let body = answer.split("\r\n\r\n").nth(1).expect("a body");
        serde_json::from_str(body).expect("JSON arrivals")
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` (sh) as an agent and answers its output once it has ended.
async fn run_agent(client: &mut Client, agent_id: &str, script: &str) -> String {
    spawn(client, agent_id, sh(script)).await;
    let status = wait_for(client, agent_id, "ended", |s| {
        s.state != pb::AgentState::Running as i32 && s.state != pb::AgentState::Starting as i32
    })
    .await;
    let read = |name: &str| {
        std::fs::read_to_string(PathBuf::from(&status.agent_dir).join(name)).unwrap_or_default()
    };
    let out = read("stdout.log");
    assert_eq!(
        status.state,
        pb::AgentState::Completed as i32,
        "{out}\n{}",
        read("stderr.log")
    );
    out
}

/// The test provider, and a daemon whose gateway serves it as `openai` and `anthropic`.
async fn gateway_daemon() -> (Provider, tempfile::TempDir, Daemon) {
    let provider = Provider::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let key_file = dir.path().join("provider.key");
    std::fs::write(&key_file, format!("{REAL_KEY}\n")).expect("key file");
    let providers = dir.path().join("providers.toml");
    let base = format!("http://127.0.0.1:{}", provider.port);
    std::fs::write(
        &providers,
        format!(
            r#"
[[provider]]
name = "openai"
kind = "openai"
base_url = "{base}/v1"
api_key_file = "{key}"
[provider.prices."gpt-test"]
input = 2.0
output = 10.0
cached_input = 0.5

[[provider]]
name = "anthropic"
kind = "anthropic"
base_url = "{base}"
api_key_file = "{key}"
[provider.prices."claude-test"]
input = 3.0
output = 15.0
"#,
            key = key_file.display()
        ),
    )
    .expect("providers file");
    let providers = providers.to_string_lossy().into_owned();
    let daemon = Daemon::builder()
        .options(&[
            "--llm-providers",
            &providers,
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-per-agent",
        ])
        .start()
        .await;
    (provider, dir, daemon)
}

#[tokio::test]
async fn agents_reach_providers_with_their_own_keys_and_their_spend_is_counted() {
    let (_provider, _dir, daemon) = gateway_daemon().await;
    let mut client = daemon.client().await;

    // Chat Completions whole and streamed (without asking for usage: the gateway asks, and
    // the client sees no usage), then Anthropic's Messages streamed, all by curl.
    let out = run_agent(
        &mut client,
        "caller",
        r#"
env | grep -c sk-real || true
curl -sS "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-test","messages":[{"role":"user","content":"one two three"}]}'
echo
curl -sSN "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" \
  -H 'content-type: application/json' \
  -d '{"model":"gpt-test","stream":true,"messages":[{"role":"user","content":"a b c d"}]}'
curl -sSN "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: $ANTHROPIC_API_KEY" \
  -H 'content-type: application/json' -H 'anthropic-version: 2023-06-01' \
  -d '{"model":"claude-test","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"x y"}]}'
"#,
    )
    .await;
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("0"),
        "the real key is in no variable: {out}"
    );
    assert!(out.contains("\"three two one\""), "{out}");
    assert!(out.contains("d c b a") || out.contains("\"d \""), "{out}");
    assert!(
        !out.contains("\"usage\":null") && !out.contains("\"choices\":[]"),
        "usage the client did not ask for is hidden: {out}"
    );
    assert!(out.contains("message_stop"), "{out}");
    assert!(!out.contains(REAL_KEY), "{out}");

    let spend = status(&mut client, "caller")
        .await
        .spend
        .expect("spend counted");
    let total = spend.total.expect("total");
    // Three requests of 7 input tokens each (2 cached); 3 + 4 + 2 output tokens.
    assert_eq!(total.requests, 3, "{spend:?}");
    assert_eq!(total.input_tokens, 21, "{spend:?}");
    assert_eq!(total.cached_input_tokens, 6, "{spend:?}");
    assert_eq!(total.output_tokens, 9, "{spend:?}");
    let chat = &spend.models["openai/gpt-test"];
    // Per request 5 fresh at $2, 2 cached at $0.5 per million: 11 micro-dollars, and the
    // output at $10: 30 and 40.
    assert_eq!(chat.cost_micros, 11 + 30 + 11 + 40, "{spend:?}");
    let claude = &spend.models["anthropic/claude-test"];
    assert_eq!(claude.cost_micros, 7 * 3 + 2 * 15, "{spend:?}");
    assert_eq!(total.cost_micros, chat.cost_micros + claude.cost_micros);

    // A key agentd did not give (or the real one) is refused in the provider's format, and
    // counted for nobody.
    let out = run_agent(
        &mut client,
        "forger",
        &format!(
            r#"
curl -sS -w ' %{{http_code}}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer {REAL_KEY}" -d '{{}}'
curl -sS -w ' %{{http_code}}\n' "$ANTHROPIC_BASE_URL/v1/messages" -H "x-api-key: agentd-0000" -d '{{}}'
"#
        ),
    )
    .await;
    let mut lines = out.lines();
    let openai = lines.next().unwrap_or_default();
    assert!(
        openai.ends_with(" 401")
            && openai.starts_with("{\"error\":{")
            && openai.contains("\"message\":\"not an agentd gateway key"),
        "{out}"
    );
    let anthropic = lines.next().unwrap_or_default();
    assert!(
        anthropic.ends_with(" 401") && anthropic.contains("\"type\":\"error\""),
        "{out}"
    );
    assert!(status(&mut client, "forger").await.spend.is_none());

    // Another agent's key is refused: it is honoured only from that agent's processes.
    spawn(
        &mut client,
        "holder",
        sh("echo $OPENAI_API_KEY; exec sleep 1000"),
    )
    .await;
    let holder_dir = PathBuf::from(status(&mut client, "holder").await.agent_dir);
    let key = eventually("the holder printed its key", async || {
        let out = std::fs::read_to_string(holder_dir.join("stdout.log")).unwrap_or_default();
        match out.trim() {
            key if key.starts_with("agentd-") => Ok(key.to_string()),
            other => Err(Shown(other.to_string())),
        }
    })
    .await;
    let out = run_agent(
        &mut client,
        "thief",
        &format!(
            r#"curl -sS -w ' %{{http_code}}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer {key}" -d '{{"model":"gpt-test","messages":[]}}'"#
        ),
    )
    .await;
    assert!(
        out.trim_end().ends_with(" 403") && out.contains("does not come from its processes"),
        "{out}"
    );
    assert!(status(&mut client, "holder").await.spend.is_none());
    assert!(status(&mut client, "thief").await.spend.is_none());

    // Prometheus: the gateway's requests by outcome, each agent's spend.
    let metrics = daemon.http().get("/metrics").await.text();
    for line in [
        r#"agentd_llm_requests_total{provider="openai",outcome="forwarded"} 2"#,
        r#"agentd_llm_requests_total{provider="anthropic",outcome="forwarded"} 1"#,
        r#"agentd_llm_requests_total{provider="openai",outcome="refused_key"} 2"#,
        r#"agentd_llm_requests_total{provider="anthropic",outcome="refused_key"} 1"#,
        r#"agentd_llm_tokens_total{provider="openai",kind="output"} 7"#,
        r#"agentd_agent_llm_requests{agent_id="caller"} 3"#,
        r#"agentd_agent_llm_tokens{agent_id="caller",kind="cached_input"} 6"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    let cost = format!(
        r#"agentd_agent_llm_cost_micros{{agent_id="caller"}} {}"#,
        total.cost_micros
    );
    assert!(
        metrics.lines().any(|l| l == cost),
        "no `{cost}` in\n{metrics}"
    );
    // The real key shows nowhere agentd writes.
    assert!(!metrics.contains(REAL_KEY) && !daemon.log().contains(REAL_KEY));
    kill_all(&mut client).await;
}

#[tokio::test]
async fn the_openai_and_anthropic_sdks_work_through_the_gateway_from_the_environment_alone() {
    if !requires(Need::Python("openai")) || !requires(Need::Python("anthropic")) {
        return;
    }
    let (_provider, _dir, daemon) = gateway_daemon().await;
    let mut client = daemon.client().await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python/llm_agent.py");
    let script = std::fs::canonicalize(script).expect("the agent script");
    let out = run_agent(
        &mut client,
        "sdk",
        &format!("exec python3 {}", script.display()),
    )
    .await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "chat two one 7",
            "chat-stream c b a no-usage",
            "responses-stream 4",
            "messages q p 2",
            "messages-stream r s t 3",
        ]
        .map(|line| line.replace("r s t", "t s r")),
        "{out}"
    );
    let spend = status(&mut client, "sdk").await.spend.expect("spend");
    let total = spend.total.expect("total");
    assert_eq!(total.requests, 5, "{spend:?}");
    // 7 input tokens each; output 2 + 3 + 4 + 2 + 3.
    assert_eq!(
        (total.input_tokens, total.output_tokens),
        (35, 14),
        "{spend:?}"
    );
    kill_all(&mut client).await;
}

/// A child's request as `sh` runs it: Chat Completions with at most 5 output tokens, whose
/// answer uses 7 input and 3 output tokens; prints the HTTP status.
const ASK: &str = r#"ask() { curl -sS -o /dev/null -w '%{http_code}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -d '{"model":"gpt-test","max_tokens":5,"messages":[{"role":"user","content":"a b c"}]}'; }"#;

fn with_budget(
    agent_id: &str,
    parent: &str,
    script: &str,
    budget: Option<pb::Budget>,
) -> pb::SpawnRequest {
    pb::SpawnRequest {
        parent_agent_id: parent.to_string(),
        budget,
        ..spawn_request(agent_id, sh(&format!("{ASK}\n{script}")))
    }
}

fn tokens(tokens: u64, on_limit: pb::OnLimit) -> Option<pb::Budget> {
    Some(pb::Budget {
        tokens,
        on_limit: on_limit as i32,
        ..Default::default()
    })
}

#[tokio::test]
async fn a_tree_spending_into_its_budget_is_paused_at_the_limit_and_resumed_when_raised() {
    let (_provider, _dir, daemon) = gateway_daemon().await;
    let mut client = daemon.client().await;
    let mut events = client
        .watch_agents(pb::WatchAgentsRequest::default())
        .await
        .expect("watch")
        .into_inner();
    spawn_with(
        &mut client,
        with_budget("boss", "", "sleep 1000", tokens(100, pb::OnLimit::Pause)),
    )
    .await;
    // A child may not ask for more than its parent has left.
    let refused = client
        .spawn(with_budget(
            "greedy",
            "boss",
            "true",
            tokens(1000, pb::OnLimit::Pause),
        ))
        .await
        .expect_err("a child budget above the parent's is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused
            .message()
            .contains("budget.tokens 1000 is more than parent `boss` has left (100)"),
        "{refused:?}"
    );
    // Three children spend into the parent's budget at once, 10 tokens a request.
    for child in ["w1", "w2", "w3"] {
        spawn_with(
            &mut client,
            with_budget(
                child,
                "boss",
                "for i in $(seq 30); do until [ \"$(ask)\" = 200 ]; do sleep 0.1; done; done",
                None,
            ),
        )
        .await;
    }
    let reached = loop {
        let event = next_event(&mut events).await;
        if event.kind == pb::EventKind::BudgetExhausted as i32 {
            break event;
        }
    };
    assert_eq!(reached.agent_id, "boss");
    assert!(
        reached.message.contains("budget reached (tokens)"),
        "{reached:?}"
    );
    for agent in ["boss", "w1", "w2", "w3"] {
        wait_for(&mut client, agent, "paused at the budget", |s| {
            s.state == pb::AgentState::Paused as i32
        })
        .await;
    }
    let boss = status(&mut client, "boss").await;
    let tree = boss.tree_spend.expect("tree spend");
    // At the limit, passed by at most one request in flight (its reservation: 5 output
    // tokens and a token per 4 bytes of its body).
    assert!(
        (100..=100 + 60).contains(&(tree.input_tokens + tree.output_tokens)),
        "{tree:?}"
    );
    assert_eq!(boss.budget_reached, "tokens");
    let mut children = pb::Usage::default();
    for child in ["w1", "w2", "w3"] {
        let own = status(&mut client, child)
            .await
            .spend
            .and_then(|s| s.total)
            .unwrap_or_default();
        children.requests += own.requests;
        children.input_tokens += own.input_tokens;
        children.output_tokens += own.output_tokens;
        children.cost_micros += own.cost_micros;
    }
    assert_eq!(
        (
            tree.requests,
            tree.input_tokens,
            tree.output_tokens,
            tree.cost_micros
        ),
        (
            children.requests,
            children.input_tokens,
            children.output_tokens,
            children.cost_micros
        )
    );
    assert_eq!(tree.input_tokens, 7 * tree.requests);

    // Raised: the tree resumes, and the children finish their requests.
    let raised = client
        .set_budget(pb::SetBudgetRequest {
            agent_id: "boss".into(),
            budget: tokens(100_000, pb::OnLimit::Pause),
        })
        .await
        .expect("SetBudget")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(raised.budget_reached, "");
    for child in ["w1", "w2", "w3"] {
        wait_for_state(&mut client, child, pb::AgentState::Completed).await;
    }
    assert_eq!(
        status(&mut client, "boss").await.state,
        pb::AgentState::Running as i32
    );
    let tree = status(&mut client, "boss")
        .await
        .tree_spend
        .expect("tree spend");
    // Each child retried its refused request until it passed: 30 requests each, counted
    // exactly.
    assert_eq!(
        (tree.requests, tree.input_tokens, tree.output_tokens),
        (90, 630, 270)
    );
    kill_all(&mut client).await;
}

#[tokio::test]
async fn at_a_stop_budget_the_agent_is_stopped_and_at_a_reject_budget_refused() {
    let (_provider, _dir, daemon) = gateway_daemon().await;
    let mut client = daemon.client().await;
    let requests = |requests, on_limit: pb::OnLimit| {
        Some(pb::Budget {
            requests,
            on_limit: on_limit as i32,
            ..Default::default()
        })
    };
    spawn_with(
        &mut client,
        with_budget(
            "stopper",
            "",
            "for i in 1 2 3; do ask; done; sleep 1000",
            requests(2, pb::OnLimit::Stop),
        ),
    )
    .await;
    let stopped = wait_for(&mut client, "stopper", "stopped at its budget", |s| {
        s.state == pb::AgentState::Killed as i32
    })
    .await;
    assert_eq!(
        stopped.end_reason,
        pb::EndReason::Budget as i32,
        "{stopped:?}"
    );
    assert_eq!(
        stopped.spend.and_then(|s| s.total).map(|t| t.requests),
        Some(2)
    );

    spawn_with(
        &mut client,
        with_budget(
            "rejected",
            "",
            "for i in 1 2 3 4; do ask; done",
            requests(2, pb::OnLimit::Reject),
        ),
    )
    .await;
    let done = wait_for_state(&mut client, "rejected", pb::AgentState::Completed).await;
    let out =
        std::fs::read_to_string(PathBuf::from(&done.agent_dir).join("stdout.log")).expect("output");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["200", "200", "429", "429"]
    );
    assert_eq!(
        done.spend.and_then(|s| s.total).map(|t| t.requests),
        Some(2)
    );
    assert_eq!(done.budget_reached, "requests");

    // An agent that calls a provider itself reports what it spent: counted the same way,
    // against its budget, and shown apart.
    spawn_with(
        &mut client,
        with_budget(
            "self-caller",
            "",
            "exec sleep 1000",
            requests(3, pb::OnLimit::Reject),
        ),
    )
    .await;
    let report = |agent_id: &str, model: &str, requests: u64| pb::ReportUsageRequest {
        agent_id: agent_id.into(),
        model: model.into(),
        usage: Some(pb::Usage {
            input_tokens: 1200,
            output_tokens: 300,
            requests,
            cost_micros: 960,
            ..Default::default()
        }),
    };
    let reported = client
        .report_usage(report("self-caller", "openai/gpt-own", 2))
        .await
        .expect("ReportUsage")
        .into_inner()
        .status
        .expect("status");
    let spend = reported.spend.expect("spend");
    assert_eq!(
        spend.reported.map(|r| (r.requests, r.input_tokens)),
        Some((2, 1200))
    );
    assert_eq!(spend.total.map(|t| t.cost_micros), Some(960));
    assert!(spend.models.contains_key("openai/gpt-own"), "{spend:?}");
    assert_eq!(reported.budget_reached, "");
    let bad = client
        .report_usage(report("self-caller", "", 1))
        .await
        .expect_err("no model");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    let bad = client
        .report_usage(report("nobody", "m", 1))
        .await
        .expect_err("unknown agent");
    assert_eq!(bad.code(), tonic::Code::NotFound, "{bad:?}");
    let over = client
        .report_usage(report("self-caller", "openai/gpt-own", 1))
        .await
        .expect("ReportUsage")
        .into_inner()
        .status
        .expect("status");
    assert_eq!(over.budget_reached, "requests");

    // Or in its status file, as running totals: what they grow by is counted.
    let script = r#"echo '{"progress": 10, "usage": {"openai/own": {"input_tokens": 100, "output_tokens": 10, "requests": 1, "cost_micros": 50}}}' > "$AGENTD_STATUS_FILE"
until [ -e go ]; do sleep 0.05; done
echo '{"progress": 20, "usage": {"openai/own": {"input_tokens": 250, "output_tokens": 30, "requests": 2, "cost_micros": 120}}}' > "$AGENTD_STATUS_FILE.new"
mv "$AGENTD_STATUS_FILE.new" "$AGENTD_STATUS_FILE"
exec sleep 1000"#;
    let status_writer = spawn(&mut client, "status-writer", sh(script)).await;
    let reported = |requests: u64| {
        move |s: &pb::AgentStatus| {
            s.spend
                .as_ref()
                .and_then(|spend| spend.reported)
                .is_some_and(|r| r.requests == requests)
        }
    };
    wait_for(
        &mut client,
        "status-writer",
        "the first totals counted",
        reported(1),
    )
    .await;
    std::fs::write(PathBuf::from(&status_writer.agent_dir).join("go"), "").expect("go");
    let counted = wait_for(
        &mut client,
        "status-writer",
        "their growth counted",
        reported(2),
    )
    .await;
    let total = counted.spend.and_then(|s| s.total).expect("total");
    assert_eq!(
        (total.input_tokens, total.output_tokens, total.cost_micros),
        (250, 30, 120)
    );

    // Under a cost budget, a model without a price is refused (it would cost nothing here);
    // and only the APIs whose answers say their usage are forwarded.
    let cost = Some(pb::Budget {
        cost_micros: 1_000_000,
        ..Default::default()
    });
    let script = r#"curl -sS -w ' %{http_code}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -d '{"model":"gpt-unpriced","messages":[]}'
curl -sS -w ' %{http_code}\n' "$OPENAI_BASE_URL/batches" -H "Authorization: Bearer $OPENAI_API_KEY" -d '{}'"#;
    spawn_with(&mut client, with_budget("careful", "", script, cost)).await;
    let done = wait_for_state(&mut client, "careful", pb::AgentState::Completed).await;
    let out =
        std::fs::read_to_string(PathBuf::from(&done.agent_dir).join("stdout.log")).expect("output");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].ends_with(" 400") && lines[0].contains("no price"),
        "{out}"
    );
    assert!(
        lines[1].ends_with(" 404") && lines[1].contains("does not forward POST /batches"),
        "{out}"
    );
    assert!(done.spend.is_none(), "{done:?}");
    kill_all(&mut client).await;
}

#[tokio::test]
async fn a_429_with_retry_after_holds_every_agents_requests_to_that_provider() {
    let (provider, _dir, daemon) = gateway_daemon().await;
    let mut client = daemon.client().await;
    let ask = |model: &str| {
        format!(
            r#"curl -sS -o /dev/null -w '%{{http_code}}\n' "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" -d '{{"model":"{model}","max_tokens":5,"messages":[{{"role":"user","content":"a"}}]}}'"#
        )
    };
    // The provider answers the first agent 429, Retry-After: 1 (passed on to it as it is).
    let out = run_agent(&mut client, "first", &ask("busy")).await;
    assert_eq!(out.trim(), "429");
    // The second agent's request waits out the provider's second instead of hitting it.
    let out = run_agent(&mut client, "second", &ask("gpt-test")).await;
    assert_eq!(out.trim(), "200");
    let arrivals = provider.arrivals();
    let at = |model: &str| {
        arrivals
            .iter()
            .find(|(m, _)| m == model)
            .map(|(_, at)| *at)
            .unwrap_or_else(|| panic!("no {model} in {arrivals:?}"))
    };
    assert!(at("gpt-test") - at("busy") >= 0.95, "{arrivals:?}");
    kill_all(&mut client).await;
}

#[tokio::test]
async fn a_proxy_sandboxed_agent_reaches_the_gateway_in_its_own_namespace() {
    if !requires(Need::Root) {
        return;
    }
    let (_provider, _dir, daemon) = gateway_daemon().await;
    let mut client = daemon.client().await;
    // Its own network (nothing but its proxy, and the gateway on the same URL as on the
    // host): the request goes straight to the gateway, which knows it by the namespace.
    let request = pb::SpawnRequest {
        sandbox: Some(pb::Sandbox::default()),
        ..spawn_request(
            "boxed",
            sh(&format!(
                "{ASK}\nask; curl -sS -o /dev/null -w '%{{http_code}}\\n' http://example.com/ || true"
            )),
        )
    };
    spawn_with(&mut client, request).await;
    let done = wait_for(&mut client, "boxed", "ended", |s| {
        s.state != pb::AgentState::Running as i32 && s.state != pb::AgentState::Starting as i32
    })
    .await;
    let out =
        std::fs::read_to_string(PathBuf::from(&done.agent_dir).join("stdout.log")).expect("output");
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("200"), "{out}");
    // Everything else still goes through its proxy, which allows no host.
    assert_eq!(lines.next(), Some("403"), "{out}");
    assert_eq!(
        done.spend.and_then(|s| s.total).map(|t| t.requests),
        Some(1)
    );
    kill_all(&mut client).await;
}
