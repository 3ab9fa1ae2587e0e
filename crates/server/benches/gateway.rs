//! The LLM gateway's cost (BENCHMARKS.md, "LLM gateway"): what it adds to a request over
//! calling the provider directly, whole and streamed (time to the first byte), and many
//! streams at once. A provider written here answers at once (Chat Completions, whole or as
//! server-sent events); a release `agentd` serves it through its gateway.
//!
//! The gateway honours a key only from its agent's processes, so the client runs as an agent:
//! this program again, with `--client`, reading the gateway's URL and key from the
//! environment agentd gave it. Direct and gateway requests take turns in one process, so
//! both see the same machine.
//!
//! ```sh
//! cargo bench -p agentd-server --bench gateway                # 2000 requests, 200 streams
//! cargo bench -p agentd-server --bench gateway -- --smoke
//! ```

#![allow(clippy::disallowed_methods)] // it waits for the daemon it starts

use std::convert::Infallible;
use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

const KEY: &str = "sk-bench";

#[derive(Parser)]
struct Options {
    /// Sequential requests of each kind, direct and through the gateway.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Streams at once through the gateway.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Tiny sizes, so CI can check that the program still works.
    #[arg(long)]
    smoke: bool,
    /// Run as the agent that measures (internal): the provider's URL.
    #[arg(long, hide = true)]
    client: Option<String>,
    /// Accepted for `cargo bench`, which passes it.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The provider: Chat Completions answered at once, with usage; streamed in three chunks.
async fn provider(
    request: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<http_body_util::combinators::BoxBody<Bytes, Infallible>>, Infallible> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let stream = body.windows(13).any(|w| w == b"\"stream\":true");
    let usage = r#"{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}"#;
    if !stream {
        let answer = format!(
            r#"{{"id":"c","object":"chat.completion","model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"a b c"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
        );
        let response = hyper::Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(answer)).boxed())
            .unwrap_or_default();
        return Ok(response);
    }
    let mut events: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|word| format!("data: {{\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}],\"usage\":null}}\n\n"))
        .collect();
    events.push(format!(
        "data: {{\"model\":\"m\",\"choices\":[],\"usage\":{usage}}}\n\n"
    ));
    events.push("data: [DONE]\n\n".into());
    let frames = tokio_stream::iter(events.into_iter().map(|e| Ok(Frame::data(Bytes::from(e)))));
    let response = hyper::Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(frames).boxed())
        .unwrap_or_default();
    Ok(response)
}

async fn serve_provider() -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(provider)),
            );
        }
    });
    Ok(format!("http://{address}/v1"))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// One request: the time to the first byte of the body and to its end.
async fn call(
    client: &HttpClient,
    base: &str,
    key: &str,
    stream: bool,
) -> Result<(Duration, Duration)> {
    let body = format!(
        r#"{{"model":"m","stream":{stream},"max_tokens":16,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let request = hyper::Request::post(format!("{base}/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let start = Instant::now();
    let response = client.request(request).await?;
    ensure!(
        response.status().is_success(),
        "answered {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        if frame?.is_data() && first.is_none() {
            first = Some(start.elapsed());
        }
    }
    Ok((first.unwrap_or_default(), start.elapsed()))
}

fn percentile(values: &mut [Duration], p: f64) -> f64 {
    values.sort();
    let index = ((values.len() as f64 - 1.0) * p).round() as usize;
    values.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// In the agent: direct and gateway requests in turns, then many streams at once.
async fn client(provider: &str, options: &Options) -> Result<()> {
    let gateway = std::env::var("OPENAI_BASE_URL").context("OPENAI_BASE_URL from agentd")?;
    let key = std::env::var("OPENAI_API_KEY").context("OPENAI_API_KEY from agentd")?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let http: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
    let mut rows = serde_json::Map::new();
    for stream in [false, true] {
        let (mut direct, mut through) = (Vec::new(), Vec::new());
        for i in 0..options.requests + 20 {
            let d = call(&http, provider, KEY, stream).await?;
            let g = call(&http, &gateway, &key, stream).await?;
            // The first 20 of each warm connections and caches.
            if i >= 20 {
                direct.push(if stream { d.0 } else { d.1 });
                through.push(if stream { g.0 } else { g.1 });
            }
        }
        let what = if stream {
            "stream, first byte"
        } else {
            "request"
        };
        let (d50, g50) = (percentile(&mut direct, 0.5), percentile(&mut through, 0.5));
        rows.insert(format!("{what}: direct p50 (ms)"), d50.into());
        rows.insert(format!("{what}: gateway p50 (ms)"), g50.into());
        rows.insert(
            format!("{what}: gateway p99 (ms)"),
            percentile(&mut through, 0.99).into(),
        );
        rows.insert(
            format!("{what}: gateway adds, p50 (ms)"),
            (g50 - d50).into(),
        );
    }
    let start = Instant::now();
    let calls = (0..options.streams).map(|_| {
        let (http, gateway, key) = (http.clone(), gateway.clone(), key.clone());
        tokio::spawn(async move { call(&http, &gateway, &key, true).await })
    });
    let mut firsts = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        firsts.push(call.await??.0);
    }
    rows.insert(
        format!("{} streams at once: all done (ms)", options.streams),
        (start.elapsed().as_secs_f64() * 1e3).into(),
    );
    rows.insert(
        format!("{} streams at once: first byte p50 (ms)", options.streams),
        percentile(&mut firsts, 0.5).into(),
    );
    println!("{}", serde_json::Value::Object(rows));
    Ok(())
}

/// Starts agentd with the provider, runs the client as an agent, prints its rows and what
/// agentd counted.
async fn bench(options: &Options) -> Result<()> {
    let provider = serve_provider().await?;
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, KEY)?;
    let providers = dir.path().join("providers.toml");
    std::fs::write(
        &providers,
        format!(
            "[[provider]]\nname = \"bench\"\nkind = \"openai\"\nbase_url = \"{provider}\"\napi_key_file = \"{}\"\n[provider.prices.m]\ninput = 1.0\noutput = 2.0\n",
            key_file.display()
        ),
    )?;
    let socket = dir.path().join("agentd.sock");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "warn", "--llm-providers"])
        .arg(&providers)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting agentd")?;
    let result = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            ensure!(Instant::now() < deadline, "agentd did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let channel =
            tonic::transport::Endpoint::from_shared(format!("unix://{}", socket.display()))?
                .connect()
                .await?;
        let mut agentd = pb::agent_supervisor_client::AgentSupervisorClient::new(channel);
        let exe = std::env::current_exe()?;
        let mut command = vec![
            exe.to_string_lossy().into_owned(),
            "--client".into(),
            provider.clone(),
            "--requests".into(),
            options.requests.to_string(),
            "--streams".into(),
            options.streams.to_string(),
        ];
        if options.smoke {
            command.push("--smoke".into());
        }
        let status = agentd
            .spawn(pb::SpawnRequest {
                agent_id: "bench-client".into(),
                command,
                ..Default::default()
            })
            .await?
            .into_inner()
            .status
            .context("a status")?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let ended = loop {
            let now = agentd
                .status(pb::StatusRequest {
                    agent_id: "bench-client".into(),
                })
                .await?
                .into_inner()
                .status
                .context("a status")?;
            if !matches!(
                pb::AgentState::try_from(now.state),
                Ok(pb::AgentState::Starting | pb::AgentState::Running)
            ) {
                break now;
            }
            ensure!(Instant::now() < deadline, "the client did not finish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let dir = std::path::PathBuf::from(&status.agent_dir);
        let out = std::fs::read_to_string(dir.join("stdout.log"))?;
        if ended.state != pb::AgentState::Completed as i32 {
            bail!(
                "the client failed: {out}{}",
                std::fs::read_to_string(dir.join("stderr.log"))?
            );
        }
        let rows: serde_json::Map<String, serde_json::Value> = serde_json::from_str(out.trim())?;
        let width = rows.keys().map(String::len).max().unwrap_or(0);
        for (row, value) in &rows {
            println!(
                "{row:<width$}  {:>10.3}",
                value.as_f64().unwrap_or(f64::NAN)
            );
        }
        let counted = ended.spend.and_then(|s| s.total).unwrap_or_default();
        let expected = (options.requests + 20) as u64 * 2 + options.streams as u64;
        println!(
            "requests counted by agentd: {} of {expected}",
            counted.requests
        );
        ensure!(
            counted.requests == expected,
            "agentd counted {} requests, not {expected}",
            counted.requests
        );
        Ok(())
    }
    .await;
    let _ = daemon.kill();
    let _ = daemon.wait();
    result
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut options = Options::parse();
    if options.smoke {
        options.requests = 20;
        options.streams = 10;
    }
    match options.client.clone() {
        Some(provider) => client(&provider, &options).await,
        None => bench(&options).await,
    }
}
