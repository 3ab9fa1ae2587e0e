//! The `agentd.v1.AgentSupervisor` gRPC service: decodes a request, asks the supervisor,
//! encodes the answer. No supervisor state lives here.

use agentd_core::{EventFilter, ListFilter, StopTarget, SupervisorHandle};
use agentd_proto::v1 as pb;
use pb::agent_supervisor_server::AgentSupervisor;
use tokio::sync::{broadcast::error::RecvError, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::convert::{self, error_status};

pub struct AgentSupervisorService {
    supervisor: SupervisorHandle,
    /// Cancelled when the daemon shuts down, to end watch streams.
    shutdown: CancellationToken,
}

impl AgentSupervisorService {
    pub fn new(supervisor: SupervisorHandle, shutdown: CancellationToken) -> Self {
        AgentSupervisorService {
            supervisor,
            shutdown,
        }
    }
}

/// Events queued per watcher between the event bus and the connection.
const WATCH_QUEUE: usize = 256;

#[tonic::async_trait]
impl AgentSupervisor for AgentSupervisorService {
    async fn spawn(
        &self,
        request: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnResponse>, Status> {
        let request = convert::spawn_request(request.into_inner())?;
        let status = self.supervisor.spawn(request).await.map_err(error_status)?;
        Ok(Response::new(pb::SpawnResponse {
            status: Some(convert::status(&status)),
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let agent_id = request.into_inner().agent_id;
        let status = self
            .supervisor
            .status(agent_id)
            .await
            .map_err(error_status)?;
        Ok(Response::new(pb::StatusResponse {
            status: Some(convert::status(&status)),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let request = request.into_inner();
        let filter = ListFilter {
            states: request
                .states
                .into_iter()
                .map(convert::state_from)
                .collect::<Result<_, _>>()?,
            parent_agent_id: request.parent_agent_id,
            labels: request.labels.into_iter().collect(),
        };
        let agents = self.supervisor.list(filter).await.map_err(error_status)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(convert::status).collect(),
        }))
    }

    async fn cleanup(
        &self,
        request: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        let request = request.into_inner();
        let target = match (request.all, request.agent_ids.is_empty()) {
            (true, true) => StopTarget::All,
            (false, false) => StopTarget::Agents(request.agent_ids),
            (true, false) => {
                return Err(Status::invalid_argument(
                    "give either `agent_ids` or `all`, not both",
                ));
            }
            (false, true) => {
                return Err(Status::invalid_argument(
                    "nothing to stop: give `agent_ids`, or set `all` to stop every agent",
                ));
            }
        };
        let reports = self
            .supervisor
            .stop(target, request.force)
            .await
            .map_err(error_status)?;
        Ok(Response::new(pb::CleanupResponse {
            results: reports.iter().map(convert::stop_report).collect(),
        }))
    }

    async fn check_health(
        &self,
        request: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthResponse>, Status> {
        let agent_id = request.into_inner().agent_id;
        let status = self
            .supervisor
            .status(agent_id)
            .await
            .map_err(error_status)?;
        Ok(Response::new(convert::check_health(&status)))
    }

    async fn get_summary(
        &self,
        _request: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        let summary = self.supervisor.summary().await.map_err(error_status)?;
        Ok(Response::new(convert::summary(&summary)))
    }

    async fn reap_zombies(
        &self,
        _request: Request<pb::ReapZombiesRequest>,
    ) -> Result<Response<pb::ReapZombiesResponse>, Status> {
        let report = self.supervisor.reap().await.map_err(error_status)?;
        Ok(Response::new(convert::reap_report(report)))
    }

    type WatchAgentsStream = ReceiverStream<Result<pb::AgentEvent, Status>>;

    async fn watch_agents(
        &self,
        request: Request<pb::WatchAgentsRequest>,
    ) -> Result<Response<Self::WatchAgentsStream>, Status> {
        let request = request.into_inner();
        let filter = EventFilter {
            agent_ids: request.agent_ids.into_iter().collect(),
            parent_agent_id: request.parent_agent_id,
            kinds: request
                .kinds
                .into_iter()
                .map(convert::event_kind_from)
                .collect::<Result<_, _>>()?,
        };
        let subscription = self
            .supervisor
            .watch(filter.clone(), request.include_snapshot)
            .await
            .map_err(error_status)?;
        let (queue, stream) = mpsc::channel(WATCH_QUEUE);
        let shutdown = self.shutdown.clone();
        // Ends when the client goes away (a failed send), the daemon shuts down, or the
        // watcher falls too far behind.
        tokio::spawn(async move {
            let mut last_sent = 0;
            for event in &subscription.snapshot {
                last_sent = event.sequence;
                if queue.send(Ok(convert::event(event))).await.is_err() {
                    return;
                }
            }
            let mut events = subscription.events;
            loop {
                let received = tokio::select! {
                    () = shutdown.cancelled() => {
                        let _ = queue.send(Err(Status::unavailable("agentd is shutting down"))).await;
                        return;
                    }
                    () = queue.closed() => return,
                    received = events.recv() => received,
                };
                match received {
                    Ok(event) if filter.matches(&event) => {
                        last_sent = event.sequence;
                        if queue.send(Ok(convert::event(&event))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        let message = format!(
                            "this watcher fell {missed} events behind and was ended; the last \
                             event sent was sequence {last_sent}: watch again with include_snapshot"
                        );
                        let _ = queue.send(Err(Status::resource_exhausted(message))).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(stream)))
    }
}
