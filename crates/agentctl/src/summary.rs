//! `summary`: counts, resource use and declared load of all agents.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::names::health_name;
use crate::output::{Output, one_line};

pub async fn summary(client: &mut Client, out: Output) -> anyhow::Result<()> {
    let request = pb::GetSummaryRequest {};
    let summary = client.get_summary(request).await?.into_inner();
    out.answer(&summary, print_summary);
    Ok(())
}

fn print_summary(s: &pb::GetSummaryResponse) {
    // The proto3 JSON field names, one per line, then the unhealthy agents.
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(s) {
        for (name, value) in fields.iter().filter(|(name, _)| *name != "unhealthy") {
            println!("{name:<22} {value}");
        }
    }
    for report in &s.unhealthy {
        println!(
            "unhealthy: {} {}: {}",
            report.agent_id,
            health_name(report.health),
            one_line(&report.reason)
        );
    }
}
