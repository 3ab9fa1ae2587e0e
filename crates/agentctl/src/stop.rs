//! `stop`: agents stopped with their ladder (or killed), and how each stop went.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::names::{exit_text, stop_outcome_name};
use crate::output::{Output, Row, print_rows};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["agent_ids", "all"])))]
pub struct StopArgs {
    agent_ids: Vec<String>,
    /// Stop every agent
    #[arg(long, conflicts_with = "agent_ids")]
    all: bool,
    /// SIGKILL the process group at once
    #[arg(long)]
    force: bool,
    /// Also stop every descendant agent, children first
    #[arg(long)]
    cascade: bool,
}

pub async fn stop(client: &mut Client, args: StopArgs, out: Output) -> anyhow::Result<()> {
    let request = pb::CleanupRequest {
        agent_ids: args.agent_ids,
        all: args.all,
        force: args.force,
        cascade: args.cascade,
    };
    let response = client.cleanup(request).await?.into_inner();
    out.answer(&response, |response| print_rows(&response.results));
    Ok(())
}

impl Row for pb::StopResult {
    const HEADER: &'static [&'static str] = &["AGENT", "OUTCOME", "EXIT", "TOOK"];

    fn cells(&self) -> Vec<String> {
        let seconds = self
            .duration
            .as_ref()
            .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
        vec![
            self.agent_id.clone(),
            stop_outcome_name(self.outcome),
            exit_text(self.exit_code, self.exit_signal),
            format!("{seconds:.3}s"),
        ]
    }
}
