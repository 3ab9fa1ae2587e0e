//! `watch`: events as they happen, one line each.

use std::time::Duration;

use agentd_proto::settings;
use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::names::{enum_arg, event_kind_name, exit_text, state_name};
use crate::output::{Output, one_line};

#[derive(clap::Args)]
pub struct WatchArgs {
    /// Only this agent; repeatable
    #[arg(long = "agent")]
    agent_ids: Vec<String>,
    /// Only children of this parent
    #[arg(long)]
    parent: Option<String>,
    /// Only this kind of event; repeatable
    #[arg(long = "kind", value_parser = enum_arg("EVENT_KIND_", pb::EventKind::as_str_name))]
    kinds: Vec<i32>,
    /// First print the current status of every matching agent
    #[arg(long, conflicts_with = "after")]
    snapshot: bool,
    /// Resume: first replay the retained events after this sequence
    #[arg(long)]
    after: Option<u64>,
    /// With --after: end after the replay instead of going on live
    #[arg(long, requires = "after")]
    replay_only: bool,
    /// At most one health sample per agent per interval (0 for none)
    #[arg(long, value_parser = settings::parse_duration)]
    health_interval: Option<Duration>,
}

pub async fn watch(client: &mut Client, args: WatchArgs, out: Output) -> anyhow::Result<()> {
    let request = pb::WatchAgentsRequest {
        agent_ids: args.agent_ids,
        parent_agent_id: args.parent.unwrap_or_default(),
        kinds: args.kinds,
        include_snapshot: args.snapshot,
        after_sequence: args.after,
        health_interval: args.health_interval.map(Into::into),
        replay_only: args.replay_only,
        view: pb::EventView::Full.into(),
    };
    let mut events = client.watch_agents(request).await?.into_inner();
    while let Some(event) = events.message().await? {
        out.item(&event, print_event);
    }
    Ok(())
}

fn print_event(event: &pb::AgentEvent) {
    let status = event.status.clone().unwrap_or_default();
    println!(
        "#{} {:<9} {} state={} pid={} cpu={:.1}% mem={:.1}MB exit={} {}",
        event.sequence,
        event_kind_name(event.kind),
        event.agent_id,
        state_name(status.state),
        status.pid,
        status.cpu_percent,
        status.memory_mb,
        exit_text(status.exit_code, status.exit_signal),
        one_line(&event.message)
    );
}
