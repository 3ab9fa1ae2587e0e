//! `run`: spawn an agent, copy its output to agentctl's own as it is written, and exit with
//! the agent's status, the way `docker run` does. It follows the agent through StreamLogs; it
//! does not poll.

use std::io::Write;

use agentd_proto::v1 as pb;
use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::client::Client;
use crate::spawn::{self, SpawnArgs};
use crate::wait::exit_status;

/// `run --detach-on-interrupt` interrupted: the shell's status for SIGINT.
pub const INTERRUPTED: u8 = 130;

#[derive(clap::Args)]
pub struct RunArgs {
    /// On Ctrl-C leave the agent running and exit 130, instead of stopping it
    #[arg(long)]
    detach_on_interrupt: bool,
    #[command(flatten)]
    spawn: SpawnArgs,
}

pub async fn run_command(
    client: &mut Client,
    args: RunArgs,
    here: Option<&std::path::Path>,
) -> anyhow::Result<u8> {
    run(
        client,
        spawn::request(args.spawn, here)?,
        args.detach_on_interrupt,
    )
    .await
}

/// Spawns, copies the agent's stdout and stderr to agentctl's own as they are written, and
/// once the agent has ended for good and its output is drained, returns its exit status.
/// Ctrl-C stops the agent with its ladder (the output goes on until it ends); a second one
/// kills it; with `detach`, Ctrl-C leaves it running and returns at once.
async fn run(client: &mut Client, request: pb::SpawnRequest, detach: bool) -> anyhow::Result<u8> {
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
