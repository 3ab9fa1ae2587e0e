//! Spawn latency of a release `agentd`, alone and with 100 watchers subscribed to every
//! event, measured from a Rust gRPC client in the same run. Run with
//! `cargo bench -p agentd-server --bench spawn_with_watchers`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use pb::agent_supervisor_client::AgentSupervisorClient;
use tonic::transport::{Channel, Endpoint};

const SPAWNS: usize = 300;
const WATCHERS: usize = 100;

type Client = AgentSupervisorClient<Channel>;

async fn connect(socket: &std::path::Path) -> Client {
    let channel = Endpoint::from_shared(format!("unix://{}", socket.display()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    AgentSupervisorClient::new(channel)
}

/// Spawns `SPAWNS` sleeping agents one at a time; returns (p50, p99, max) in milliseconds.
async fn spawn_round(client: &mut Client, round: &str) -> (f64, f64, f64) {
    let mut latencies = Vec::with_capacity(SPAWNS);
    for i in 0..SPAWNS {
        let request = pb::SpawnRequest {
            agent_id: format!("{round}-{i}"),
            command: vec!["sleep".into(), "3600".into()],
            ..Default::default()
        };
        let started = Instant::now();
        client.spawn(request).await.expect("spawn");
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    client
        .cleanup(pb::CleanupRequest {
            all: true,
            force: true,
            ..Default::default()
        })
        .await
        .expect("cleanup");
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    (at(0.5), at(0.99), latencies[latencies.len() - 1])
}

#[allow(clippy::disallowed_methods)] // the bench waits for the daemon it started
#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agentd.sock");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket")
        .arg(&socket)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .spawn()
        .expect("start agentd");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agentd did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = connect(&socket).await;

    let mut rows = vec![(
        "no watchers".to_string(),
        spawn_round(&mut client, "alone").await,
    )];
    for (label, kinds) in [
        ("100 watchers, every event", vec![]),
        (
            "100 watchers, lifecycle only",
            vec![pb::EventKind::Spawned as i32, pb::EventKind::Killed as i32],
        ),
    ] {
        let mut watchers = Vec::new();
        for _ in 0..WATCHERS {
            let mut own = connect(&socket).await;
            let request = pb::WatchAgentsRequest {
                kinds: kinds.clone(),
                ..Default::default()
            };
            let mut events = own.watch_agents(request).await.expect("watch").into_inner();
            watchers.push(tokio::spawn(async move {
                let mut received = 0u64;
                while let Ok(Some(_)) = events.message().await {
                    received += 1;
                }
                received
            }));
        }
        let round = label
            .split(',')
            .nth(1)
            .unwrap_or("w")
            .trim()
            .replace(' ', "-");
        rows.push((label.to_string(), spawn_round(&mut client, &round).await));
        for watcher in &watchers {
            watcher.abort();
        }
    }

    println!("spawn latency over {SPAWNS} sequential spawns of `sleep 3600` (ms)");
    println!("{:<32} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    for (label, (p50, p99, max)) in rows {
        println!("{label:<32} {p50:>8.2} {p99:>8.2} {max:>8.2}");
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
}
