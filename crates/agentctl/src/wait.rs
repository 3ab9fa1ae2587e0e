//! `wait`: an agent's end as agentctl's exit status, the way `systemd-run --wait` and
//! `timeout` give one (`run` too ends with it). It follows the agents through WatchAgents;
//! it does not poll.

use std::collections::BTreeMap;
use std::time::Duration;

use agentd_proto::v1 as pb;
use anyhow::bail;

use crate::client::Client;
use crate::names::{ended_for_good, state_upper_name};
use crate::output::{Output, one_line};

/// agentctl's exit status when `--timeout` passes first, as `timeout` has it.
pub const TIMED_OUT: u8 = 124;

/// Waits for the agents, prints how each ended, and returns the status to exit with.
pub async fn wait_command(
    client: &mut Client,
    agent_ids: &[String],
    timeout: Option<Duration>,
    out: Output,
) -> anyhow::Result<u8> {
    let Some(statuses) = wait(client, agent_ids, timeout).await? else {
        eprintln!(
            "agentctl: still running after {:?}",
            timeout.unwrap_or_default()
        );
        return Ok(TIMED_OUT);
    };
    for status in &statuses {
        out.item(status, |status| {
            println!("{}: {}", status.agent_id, one_line(&how_it_ended(status)))
        });
    }
    Ok(first_failure(&statuses))
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
    let state = state_upper_name(status.state);
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
async fn wait(
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
            if let Some(status) = event.status.filter(|s| removed || ended_for_good(s.state)) {
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
fn first_failure(statuses: &[pb::AgentStatus]) -> u8 {
    statuses
        .iter()
        .map(exit_status)
        .find(|&code| code != 0)
        .unwrap_or(0)
}
