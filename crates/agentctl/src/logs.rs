//! `logs`: an agent's output as it was written, raw bytes (output need not be UTF-8), each
//! stream to agentctl's own.

use std::io::Write;

use agentd_proto::v1 as pb;

use crate::client::Client;

#[derive(clap::Args)]
pub struct LogsArgs {
    agent_id: String,
    /// Keep printing new output until the agent has ended
    #[arg(short, long)]
    follow: bool,
    /// Start at the last N lines of each stream
    #[arg(long, default_value_t = 0)]
    tail: u32,
    #[arg(long, conflicts_with = "stderr")]
    stdout: bool,
    #[arg(long)]
    stderr: bool,
}

pub async fn logs(client: &mut Client, args: LogsArgs) -> anyhow::Result<()> {
    let stream = match (args.stdout, args.stderr) {
        (true, _) => pb::LogStream::Stdout,
        (_, true) => pb::LogStream::Stderr,
        _ => pb::LogStream::Unspecified,
    };
    let request = pb::StreamLogsRequest {
        agent_id: args.agent_id,
        stream: stream.into(),
        tail: args.tail,
        follow: args.follow,
        ..Default::default()
    };
    let mut chunks = client.stream_logs(request).await?.into_inner();
    while let Some(chunk) = chunks.message().await? {
        let written = if chunk.stream == pb::LogStream::Stderr as i32 {
            std::io::stderr().write_all(&chunk.data)
        } else {
            std::io::stdout().write_all(&chunk.data)
        };
        if written.is_err() {
            break;
        }
    }
    Ok(())
}
