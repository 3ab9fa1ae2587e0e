//! `list`: every agent that matches, all pages as one answer.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::names::enum_arg;
use crate::output::{Output, print_rows};

#[derive(clap::Args)]
pub struct ListArgs {
    /// Only agents in this state; repeatable
    #[arg(long = "state", value_parser = enum_arg("AGENT_STATE_", pb::AgentState::as_str_name))]
    states: Vec<i32>,
    /// Only children of this parent
    #[arg(long)]
    parent: Option<String>,
    /// Only agents with this label, KEY=VALUE; repeatable
    #[arg(long = "label", value_parser = crate::key_value)]
    labels: Vec<(String, String)>,
    /// Only this agent and its descendants
    #[arg(long)]
    subtree: Option<String>,
}

pub async fn list(client: &mut Client, filter: ListArgs, out: Output) -> anyhow::Result<()> {
    let request = pb::ListAgentsRequest {
        states: filter.states,
        parent_agent_id: filter.parent.unwrap_or_default(),
        labels: filter.labels.into_iter().collect(),
        subtree_of: filter.subtree.unwrap_or_default(),
        page_size: 0,
        page_token: String::new(),
    };
    // Every page, printed as one answer.
    let all = all_pages(client, request).await?;
    out.answer(&all, |all| print_rows(&all.agents));
    Ok(())
}

/// Every page of a list, as one answer.
pub async fn all_pages(
    client: &mut Client,
    mut request: pb::ListAgentsRequest,
) -> anyhow::Result<pb::ListAgentsResponse> {
    let mut all = pb::ListAgentsResponse::default();
    loop {
        let page = client.list_agents(request.clone()).await?.into_inner();
        all.agents.extend(page.agents);
        if page.next_page_token.is_empty() {
            break;
        }
        request.page_token = page.next_page_token;
    }
    Ok(all)
}
