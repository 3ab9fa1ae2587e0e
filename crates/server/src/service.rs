//! The `agentd.v1.AgentSupervisor` gRPC service: decodes a request, asks the supervisor,
//! encodes the answer. No supervisor state lives here.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use agentd_core::{EventFilter, Samples, StopOptions, StopTarget, SupervisorHandle, Watch};
use agentd_proto::v1 as pb;
use pb::agent_supervisor_server::AgentSupervisor;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::convert::{self, error_status};
use crate::host::Host;
use crate::logs;
use crate::metrics::Metrics;
use crate::telemetry;
use crate::watch::{self, WatchOptions, WatchStream, WatcherSlot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};

pub struct AgentSupervisorService {
    supervisor: SupervisorHandle,
    /// Cancelled when the daemon shuts down, to end watch streams.
    shutdown: CancellationToken,
    /// Events queued per watcher before it counts as stuck.
    watch_buffer: usize,
    metrics: Arc<Metrics>,
    host: Host,
    /// Watchers open now, and at most (`--max-watchers`).
    watchers: Arc<AtomicUsize>,
    max_watchers: usize,
}

impl AgentSupervisorService {
    pub fn new(
        supervisor: SupervisorHandle,
        shutdown: CancellationToken,
        watch_buffer: usize,
        max_watchers: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        AgentSupervisorService {
            supervisor,
            shutdown,
            watch_buffer,
            metrics,
            host: Host::new(),
            watchers: Arc::default(),
            max_watchers,
        }
    }

    /// Runs one RPC and records how long it took and how it ended.
    async fn timed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.rpc(method, code, started.elapsed());
        result
    }

    /// Starts a watcher: WatchAgents over gRPC, and `/v1/events`.
    pub async fn watch(&self, request: pb::WatchAgentsRequest) -> Result<WatchStream, Status> {
        self.timed("WatchAgents", async move {
            if request.include_snapshot && request.after_sequence.is_some() {
                return Err(Status::invalid_argument(
                    "give either `include_snapshot` or `after_sequence`, not both",
                ));
            }
            if request.replay_only && request.after_sequence.is_none() {
                return Err(Status::invalid_argument(
                    "`replay_only` needs `after_sequence`: the replay to send",
                ));
            }
            let health_interval = request
                .health_interval
                .map(|interval| {
                    Duration::try_from(interval).map_err(|_| {
                        Status::invalid_argument(
                            "invalid `health_interval`: must be a non-negative duration",
                        )
                    })
                })
                .transpose()?;
            let slot = WatcherSlot::take(&self.watchers, self.max_watchers)?;
            let filter = EventFilter {
                agent_ids: request.agent_ids.into_iter().collect(),
                parent_agent_id: request.parent_agent_id,
                kinds: request
                    .kinds
                    .into_iter()
                    .map(|kind| convert::from_wire("kinds", kind))
                    .collect::<Result<_, _>>()?,
            };
            let figures = match pb::EventView::try_from(request.view) {
                Ok(view) => view == pb::EventView::Figures,
                Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "unknown `view` {}: EVENT_VIEW_FULL (1) or EVENT_VIEW_FIGURES (2)",
                        request.view
                    )));
                }
            };
            let subscription = self
                .supervisor
                .watch(Watch {
                    filter: filter.clone(),
                    include_snapshot: request.include_snapshot,
                    after_sequence: request.after_sequence,
                    // A table of figures keeps the last ones: it needs only what changed,
                    // unless an interval thins the samples (a change dropped would then
                    // never be seen).
                    samples: match health_interval {
                        _ if request.replay_only => Samples::None,
                        Some(interval) if interval.is_zero() => Samples::None,
                        Some(_) => Samples::EveryRound,
                        None if figures => Samples::Changed,
                        None => Samples::EveryRound,
                    },
                })
                .await
                .map_err(error_status)?;
            let options = WatchOptions {
                filter,
                health_interval,
                buffer: self.watch_buffer,
                replay_only: request.replay_only,
                figures,
            };
            Ok(watch::start(
                subscription,
                options,
                self.shutdown.clone(),
                self.metrics.clone(),
                slot,
            ))
        })
        .await
    }

    async fn pause_or_resume(
        &self,
        agent_ids: Vec<String>,
        pause: bool,
    ) -> Result<Vec<pb::AgentStatus>, Status> {
        traced_agents(&agent_ids);
        let statuses = self
            .supervisor
            .pause(agent_ids, pause)
            .await
            .map_err(error_status)?;
        Ok(statuses.iter().map(convert::status).collect())
    }
}

#[tonic::async_trait]
impl AgentSupervisor for AgentSupervisorService {
    async fn spawn(
        &self,
        request: Request<pb::SpawnRequest>,
    ) -> Result<Response<pb::SpawnResponse>, Status> {
        self.timed("Spawn", async move {
            let mut request = convert::spawn_request(request.into_inner())?;
            traced_agents(&[&request.agent_id]);
            // The agent's own spans join the caller's trace (when tracing is on).
            for (name, value) in telemetry::agent_env() {
                request.env.entry(name).or_insert(value);
            }
            let status = self.supervisor.spawn(request).await.map_err(error_status)?;
            Ok(Response::new(pb::SpawnResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.timed("Status", async move {
            let agent_id = request.into_inner().agent_id;
            traced_agents(&[&agent_id]);
            let status = self
                .supervisor
                .status(agent_id)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::StatusResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.timed("ListAgents", async move {
            let filter = convert::list_filter(request.into_inner())?;
            let page = self.supervisor.list(filter).await.map_err(error_status)?;
            Ok(Response::new(convert::list_page(page)))
        })
        .await
    }

    async fn cleanup(
        &self,
        request: Request<pb::CleanupRequest>,
    ) -> Result<Response<pb::CleanupResponse>, Status> {
        self.timed("Cleanup", async move {
            let request = request.into_inner();
            traced_agents(&request.agent_ids);
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
            let options = StopOptions {
                force: request.force,
                cascade: request.cascade,
            };
            let reports = self
                .supervisor
                .stop(target, options)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::CleanupResponse {
                results: reports.iter().map(convert::stop_report).collect(),
            }))
        })
        .await
    }

    async fn check_health(
        &self,
        request: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthResponse>, Status> {
        self.timed("CheckHealth", async move {
            let agent_id = request.into_inner().agent_id;
            traced_agents(&[&agent_id]);
            let status = self
                .supervisor
                .status(agent_id)
                .await
                .map_err(error_status)?;
            Ok(Response::new(convert::check_health(&status)))
        })
        .await
    }

    async fn get_summary(
        &self,
        _request: Request<pb::GetSummaryRequest>,
    ) -> Result<Response<pb::GetSummaryResponse>, Status> {
        self.timed("GetSummary", async move {
            let summary = self.supervisor.summary().await.map_err(error_status)?;
            let mut summary = convert::summary(&summary);
            summary.host = Some(self.host.figures());
            Ok(Response::new(summary))
        })
        .await
    }

    async fn get_agent_history(
        &self,
        request: Request<pb::GetAgentHistoryRequest>,
    ) -> Result<Response<pb::GetAgentHistoryResponse>, Status> {
        self.timed("GetAgentHistory", async move {
            let request = request.into_inner();
            traced_agents(&[&request.agent_id]);
            let since = request.since.map(convert::time_from).transpose()?;
            let history = self
                .supervisor
                .history(request.agent_id.clone(), since)
                .await
                .map_err(error_status)?;
            Ok(Response::new(convert::history(request.agent_id, &history)))
        })
        .await
    }

    async fn reap_zombies(
        &self,
        _request: Request<pb::ReapZombiesRequest>,
    ) -> Result<Response<pb::ReapZombiesResponse>, Status> {
        self.timed("ReapZombies", async move {
            let report = self.supervisor.reap().await.map_err(error_status)?;
            Ok(Response::new(convert::reap_report(report)))
        })
        .await
    }

    async fn report_progress(
        &self,
        request: Request<pb::ReportProgressRequest>,
    ) -> Result<Response<pb::ReportProgressResponse>, Status> {
        self.timed("ReportProgress", async move {
            let report = convert::progress_report(request.into_inner());
            traced_agents(&[&report.agent_id]);
            let status = self
                .supervisor
                .report_progress(report)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::ReportProgressResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    type StreamLogsStream = ReceiverStream<Result<pb::LogChunk, Status>>;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        self.timed("StreamLogs", async move {
            let request = request.into_inner();
            traced_agents(&[&request.agent_id]);
            let started =
                logs::stream(self.supervisor.clone(), request, self.shutdown.clone()).await?;
            Ok(Response::new(started.chunks))
        })
        .await
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        self.timed("Remove", async move {
            let agent_id = request.into_inner().agent_id;
            traced_agents(&[&agent_id]);
            let status = self
                .supervisor
                .remove(agent_id)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::RemoveResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    async fn pause(
        &self,
        request: Request<pb::PauseRequest>,
    ) -> Result<Response<pb::PauseResponse>, Status> {
        self.timed("Pause", async move {
            let statuses = self
                .pause_or_resume(request.into_inner().agent_ids, true)
                .await?;
            Ok(Response::new(pb::PauseResponse { statuses }))
        })
        .await
    }

    async fn resume(
        &self,
        request: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ResumeResponse>, Status> {
        self.timed("Resume", async move {
            let statuses = self
                .pause_or_resume(request.into_inner().agent_ids, false)
                .await?;
            Ok(Response::new(pb::ResumeResponse { statuses }))
        })
        .await
    }

    async fn update_sandbox(
        &self,
        request: Request<pb::UpdateSandboxRequest>,
    ) -> Result<Response<pb::UpdateSandboxResponse>, Status> {
        self.timed("UpdateSandbox", async move {
            let request = request.into_inner();
            traced_agents(&[&request.agent_id]);
            let status = self
                .supervisor
                .update_sandbox(request.agent_id, request.allow_hosts)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::UpdateSandboxResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        self.timed("ReportUsage", async move {
            let request = request.into_inner();
            traced_agents(&[&request.agent_id]);
            let usage = convert::spend::usage_request(request.usage.unwrap_or_default());
            let status = self
                .supervisor
                .report_usage(request.agent_id, request.model, usage)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::ReportUsageResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    async fn set_budget(
        &self,
        request: Request<pb::SetBudgetRequest>,
    ) -> Result<Response<pb::SetBudgetResponse>, Status> {
        self.timed("SetBudget", async move {
            let request = request.into_inner();
            traced_agents(&[&request.agent_id]);
            let budget = request
                .budget
                .map(convert::spend::budget_request)
                .transpose()?;
            let status = self
                .supervisor
                .set_budget(request.agent_id, budget)
                .await
                .map_err(error_status)?;
            Ok(Response::new(pb::SetBudgetResponse {
                status: Some(convert::status(&status)),
            }))
        })
        .await
    }

    async fn restart(
        &self,
        request: Request<pb::RestartRequest>,
    ) -> Result<Response<pb::RestartResponse>, Status> {
        self.timed("Restart", async move {
            let agent_ids = request.into_inner().agent_ids;
            traced_agents(&agent_ids);
            let statuses = self
                .supervisor
                .restart(agent_ids)
                .await
                .map_err(error_status)?;
            let statuses = statuses.iter().map(convert::status).collect();
            Ok(Response::new(pb::RestartResponse { statuses }))
        })
        .await
    }

    type WatchAgentsStream = Pin<Box<dyn Stream<Item = Result<pb::AgentEvent, Status>> + Send>>;

    /// gRPC clients are served by `WatchAgentsRoute` (`watch_route.rs`), which sends each event's
    /// encoding made once for all watchers; this is the same stream, encoded per watcher.
    async fn watch_agents(
        &self,
        request: Request<pb::WatchAgentsRequest>,
    ) -> Result<Response<Self::WatchAgentsStream>, Status> {
        let events = self.watch(request.into_inner()).await?;
        let events = events.map(|event| event.map(|watched| watched.message()));
        Ok(Response::new(Box::pin(events)))
    }
}

/// Names the agents a call is about on its span, when tracing is on: `agent.id`, several
/// joined with commas.
fn traced_agents(agent_ids: &[impl AsRef<str>]) {
    let span = tracing::Span::current();
    if span.is_disabled() || agent_ids.is_empty() {
        return;
    }
    let ids: Vec<&str> = agent_ids.iter().map(AsRef::as_ref).collect();
    span.record("agent.id", ids.join(","));
}
