//! `status`: one agent, as the table row every command that answers with statuses prints.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::names::{exit_text, health_name, state_name};
use crate::output::{Output, Row, print_rows};

pub async fn status(client: &mut Client, agent_id: String, out: Output) -> anyhow::Result<()> {
    let request = pb::StatusRequest { agent_id };
    let response = client.status(request).await?.into_inner();
    match response.status {
        Some(status) => out.answer(&status, |status| print_rows(std::slice::from_ref(status))),
        None => print_rows::<pb::AgentStatus>(&[]),
    }
    Ok(())
}

impl Row for pb::AgentStatus {
    const HEADER: &'static [&'static str] = &[
        "AGENT", "STATE", "HEALTH", "PID", "CPU%", "MEM_MB", "THREADS", "RUNTIME", "PROGRESS",
        "EXIT", "COMMAND",
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            self.agent_id.clone(),
            state_name(self.state),
            health_name(self.health),
            self.pid.to_string(),
            format!("{:.1}", self.cpu_percent),
            format!("{:.1}", self.memory_mb),
            self.num_threads.to_string(),
            format!("{:.0}s", self.runtime_seconds),
            format!("{:.0}%", self.progress),
            exit_text(self.exit_code, self.exit_signal),
            self.cmdline.join(" "),
        ]
    }
}
