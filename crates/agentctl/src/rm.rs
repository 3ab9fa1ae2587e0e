//! `rm`: agents that have ended deleted, record, folder and output, one call each.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::output::Output;

pub async fn rm(client: &mut Client, agent_ids: Vec<String>, out: Output) -> anyhow::Result<()> {
    for agent_id in agent_ids {
        let request = pb::RemoveRequest {
            agent_id: agent_id.clone(),
        };
        let response = client.remove(request).await?.into_inner();
        out.item(&response, |_| println!("removed {agent_id}"));
    }
    Ok(())
}
