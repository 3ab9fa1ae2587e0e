//! `wait` and `run`: an agent's end as agentctl's exit status, the way `docker run`,
//! `systemd-run --wait` and `timeout` give one. Both follow the agent through WatchAgents or
//! StreamLogs; neither polls.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use agentd_proto::v1 as pb;
use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};

use crate::Client;

/// agentctl's exit status when `--timeout` passes first, as `timeout` has it.
pub const TIMED_OUT: u8 = 124;
/// `run --detach-on-interrupt` interrupted: the shell's status for SIGINT.
pub const INTERRUPTED: u8 = 130;

/// COMPLETED, FAILED, KILLED, TIMED_OUT or LOST: nothing will start it again by itself.
fn ended_for_good(status: &pb::AgentStatus) -> bool {
    use pb::AgentState::*;
    matches!(
        pb::AgentState::try_from(status.state),
        Ok(Completed | Failed | Killed | TimedOut | Lost)
    )
}

/// The agent's own exit status (agentd's `exit_code` is 128 + signal for a signal); 1 for an
/// agent that never started or whose end could not be learned.
pub fn exit_status(status: &pb::AgentStatus) -> u8 {
    status
        .exit_code
        .and_then(|code| u8::try_from(code).ok())
        .unwrap_or(1)
}

/// "COMPLETED, exit 0", "KILLED by signal 15 (exit 143)", "LOST: ...".
pub fn how_it_ended(status: &pb::AgentStatus) -> String {
    let state = pb::AgentState::try_from(status.state)
        .map(|s| s.as_str_name().trim_start_matches("AGENT_STATE_"))
        .unwrap_or("UNKNOWN");
    let how = match (status.exit_signal, status.exit_code) {
        (Some(signal), Some(code)) => format!(" by signal {signal} (exit {code})"),
        (None, Some(code)) => format!(", exit {code}"),
        _ => String::new(),
    };
    match status.error.as_str() {
        "" => format!("{state}{how}"),
        error => format!("{state}{how}: {error}"),
    }
}

/// Waits until every agent has ended for good (a restart pending is not an end) and returns
/// their last statuses in the order given. `None` when `timeout` passed first.
pub async fn wait(
    client: &mut Client,
    agent_ids: &[String],
    timeout: Option<Duration>,
) -> anyhow::Result<Option<Vec<pb::AgentStatus>>> {
    // An unknown id is NOT_FOUND now, not a wait forever.
    for agent_id in agent_ids {
        let request = pb::StatusRequest {
            agent_id: agent_id.clone(),
        };
        client.status(request).await?;
    }
    // The snapshot says where each agent is now; then every lifecycle event, no samples.
    let request = pb::WatchAgentsRequest {
        agent_ids: agent_ids.to_vec(),
        include_snapshot: true,
        health_interval: Some(Duration::ZERO.into()),
        ..Default::default()
    };
    let mut events = client.watch_agents(request).await?.into_inner();
    let mut ended = BTreeMap::new();
    let watching = async {
        while ended.len() < agent_ids.len() {
            let Some(event) = events.message().await? else {
                bail!("agentd ended the event stream (is it shutting down?)");
            };
            let removed = event.kind == pb::EventKind::Removed as i32;
            if let Some(status) = event.status.filter(|s| removed || ended_for_good(s)) {
                ended.insert(status.agent_id.clone(), status);
            }
        }
        Ok(())
    };
    match timeout {
        Some(timeout) => match tokio::time::timeout(timeout, watching).await {
            Ok(watched) => watched?,
            Err(_) => return Ok(None),
        },
        None => watching.await?,
    }
    Ok(Some(
        agent_ids.iter().filter_map(|id| ended.remove(id)).collect(),
    ))
}

/// The status agentctl exits with for several agents: the first that did not succeed.
pub fn first_failure(statuses: &[pb::AgentStatus]) -> u8 {
    statuses
        .iter()
        .map(exit_status)
        .find(|&code| code != 0)
        .unwrap_or(0)
}

/// Spawns, copies the agent's stdout and stderr to agentctl's own as they are written, and
/// once the agent has ended for good and its output is drained, returns its exit status.
/// Ctrl-C stops the agent with its ladder (the output goes on until it ends); a second one
/// kills it; with `detach`, Ctrl-C leaves it running and returns at once.
pub async fn run(
    client: &mut Client,
    request: pb::SpawnRequest,
    detach: bool,
) -> anyhow::Result<u8> {
    let mut interrupts = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let spawned = client.spawn(request).await?.into_inner();
    let agent_id = spawned.status.context("no status in the answer")?.agent_id;
    let request = pb::StreamLogsRequest {
        agent_id: agent_id.clone(),
        follow: true,
        ..Default::default()
    };
    let mut chunks = client.stream_logs(request).await?.into_inner();
    let mut interrupted = 0;
    loop {
        tokio::select! {
            chunk = chunks.message() => {
                let Some(chunk) = chunk? else { break };
                // Raw bytes as written; a closed stdout (`| head`) ends nothing but the copy.
                let _ = match pb::LogStream::try_from(chunk.stream) {
                    Ok(pb::LogStream::Stderr) => {
                        std::io::stderr().write_all(&chunk.data)
                    }
                    _ => std::io::stdout().write_all(&chunk.data).and_then(|()| std::io::stdout().flush()),
                };
            }
            _ = interrupts.recv() => {
                if detach {
                    eprintln!("agentctl: detached; {agent_id} goes on running");
                    return Ok(INTERRUPTED);
                }
                interrupted += 1;
                let force = interrupted > 1;
                match force {
                    false => eprintln!("agentctl: stopping {agent_id} (Ctrl-C again to kill it)"),
                    true => eprintln!("agentctl: killing {agent_id}"),
                }
                // In the background: the output keeps coming until the agent has ended.
                let mut stopper = client.clone();
                let request = pb::CleanupRequest {
                    agent_ids: vec![agent_id.clone()],
                    force,
                    ..Default::default()
                };
                tokio::spawn(async move { stopper.cleanup(request).await });
            }
        }
    }
    let request = pb::StatusRequest { agent_id };
    let status = client.status(request).await?.into_inner().status;
    Ok(status.as_ref().map_or(1, exit_status))
}
