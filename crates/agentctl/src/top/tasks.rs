//! The tasks of `agentctl top` that talk to agentd: the event stream, the summary every two
//! seconds, the selected agent's output, and the calls the keys make (stop, kill, restart,
//! remove, pause, resume). Each tells the screen what it learned through one channel.

use std::time::Duration;

use agentd_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Code;

use super::{Action, Update};
use crate::client::Client;

/// Every event, from a snapshot on; after a broken stream, from the last sequence seen (a
/// snapshot again if the daemon no longer holds it). Health samples carry only the figures
/// the table shows.
pub(super) async fn watch(mut client: Client, updates: mpsc::Sender<Update>) {
    let mut after: Option<u64> = None;
    loop {
        let request = pb::WatchAgentsRequest {
            include_snapshot: after.is_none(),
            after_sequence: after,
            view: pb::EventView::Figures.into(),
            ..Default::default()
        };
        let why = match client.watch_agents(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            after = Some(after.map_or(event.sequence, |a| a.max(event.sequence)));
                            if updates.send(Update::Event(Box::new(event))).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break "the event stream ended".to_string(),
                        Err(status) => break status.message().to_string(),
                    }
                }
            }
            Err(status) if status.code() == Code::OutOfRange => {
                after = None;
                continue;
            }
            Err(status) => status.message().to_string(),
        };
        if updates
            .send(Update::Disconnected(format!("reconnecting: {why}")))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub(super) async fn summaries(mut client: Client, updates: mpsc::Sender<Update>) {
    loop {
        if let Ok(summary) = client.get_summary(pb::GetSummaryRequest {}).await
            && updates
                .send(Update::Summary(Box::new(summary.into_inner())))
                .await
                .is_err()
        {
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub(super) async fn follow_output(
    mut client: Client,
    agent_id: String,
    updates: mpsc::Sender<Update>,
) {
    let request = pb::StreamLogsRequest {
        agent_id: agent_id.clone(),
        tail: 50,
        follow: true,
        ..Default::default()
    };
    let Ok(stream) = client.stream_logs(request).await else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(chunk)) = stream.message().await {
        if updates
            .send(Update::Output(agent_id.clone(), chunk.data))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Does what a key asked of one agent and tells the screen how it went: the server's error
/// message when it refused.
pub(super) async fn act(
    mut client: Client,
    agent_id: String,
    action: Action,
    updates: mpsc::Sender<Update>,
) {
    let agent_ids = vec![agent_id.clone()];
    let result = match action {
        Action::Stop | Action::Kill => client
            .cleanup(pb::CleanupRequest {
                agent_ids,
                force: action == Action::Kill,
                ..Default::default()
            })
            .await
            .map(drop),
        Action::Restart => client
            .restart(pb::RestartRequest { agent_ids })
            .await
            .map(drop),
        Action::Remove => client
            .remove(pb::RemoveRequest {
                agent_id: agent_id.clone(),
            })
            .await
            .map(drop),
        Action::Pause => client.pause(pb::PauseRequest { agent_ids }).await.map(drop),
        Action::Resume => client
            .resume(pb::ResumeRequest { agent_ids })
            .await
            .map(drop),
    };
    let result = result.map_err(|status| status.message().to_string());
    let _ = updates.send(Update::Done(agent_id, action, result)).await;
}
