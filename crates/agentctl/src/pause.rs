//! `pause`, `resume`, `restart` and `sandbox`: each acts on agents by id and answers with
//! their statuses.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::output::{Output, print_rows};

pub async fn pause(client: &mut Client, agent_ids: Vec<String>, out: Output) -> anyhow::Result<()> {
    let request = pb::PauseRequest { agent_ids };
    let response = client.pause(request).await?.into_inner();
    out.answer(&response, |response| print_rows(&response.statuses));
    Ok(())
}

pub async fn resume(
    client: &mut Client,
    agent_ids: Vec<String>,
    out: Output,
) -> anyhow::Result<()> {
    let request = pb::ResumeRequest { agent_ids };
    let response = client.resume(request).await?.into_inner();
    out.answer(&response, |response| print_rows(&response.statuses));
    Ok(())
}

pub async fn restart(
    client: &mut Client,
    agent_ids: Vec<String>,
    out: Output,
) -> anyhow::Result<()> {
    let request = pb::RestartRequest { agent_ids };
    let response = client.restart(request).await?.into_inner();
    out.answer(&response, |response| print_rows(&response.statuses));
    Ok(())
}

pub async fn update_sandbox(
    client: &mut Client,
    agent_id: String,
    allow_hosts: Vec<String>,
    out: Output,
) -> anyhow::Result<()> {
    let request = pb::UpdateSandboxRequest {
        agent_id,
        allow_hosts,
    };
    let response = client.update_sandbox(request).await?.into_inner();
    out.answer(&response, |response| print_rows(response.status.as_slice()));
    Ok(())
}
