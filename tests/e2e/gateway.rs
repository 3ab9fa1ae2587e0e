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

#[tokio::test]
async fn agents_reach_providers_with_their_own_keys_and_their_spend_is_counted() {
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
        .options(&["--llm-providers", &providers])
        .start()
        .await;
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
    kill_all(&mut client).await;
}
