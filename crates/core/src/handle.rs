//! The way in: [`SupervisorHandle`], a cheap cloneable handle that sends the supervisor task a
//! [`Command`] with a oneshot reply, and the questions and answers that travel with them.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::agent::AgentStatus;
use crate::sandbox::SandboxSupport;

use crate::error::{Error, Result};
use crate::events::{EventFilter, Samples, Subscription};
use crate::health::ProgressReport;
use crate::history::HistoryPoint;
use crate::keeper::KeptExit;
use crate::sampler::SampleBatch;
use crate::spec::SpawnRequest;
use crate::state::AgentState;
use crate::stop::{StopOptions, StopReport};
use crate::store::Store;

/// A subscription request.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    pub filter: EventFilter,
    /// First send the current status of every matching agent.
    pub include_snapshot: bool,
    /// First replay the logged events after this sequence.
    pub after_sequence: Option<u64>,
    /// Which HEALTH samples: every agent's every round (a whole status ages: its runtime,
    /// the moment of the sample), or one round of every agent's and then those that changed,
    /// which is all that a table of figures needs, or none (as when `filter` takes no HEALTH).
    pub samples: Samples,
}

/// Which agents `list` returns. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub states: HashSet<AgentState>,
    pub parent_agent_id: String,
    pub labels: BTreeMap<String, String>,
    /// Only this agent and its descendants.
    pub subtree_of: Option<String>,
    /// Only agents whose id sorts after this one: where the previous page ended.
    pub after: Option<String>,
    /// At most this many agents.
    pub limit: usize,
}

/// One page of a list, in agent id order.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    pub agents: Vec<AgentStatus>,
    /// More agents match after the last one here.
    pub more: bool,
}

#[derive(Debug, Clone)]
pub enum StopTarget {
    Agents(Vec<String>),
    All,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub total: u32,
    /// Agents in each state, by `AgentState as usize`: read with [`Summary::count`].
    pub by_state: [u32; AgentState::COUNT],
    pub zombies: u32,
    pub total_memory_mb: f64,
    pub total_cpu_percent: f64,
    pub total_load_percentage: f64,
    pub stalled: u32,
    pub over_limit: u32,
    pub capacity: f64,
    pub free_capacity: f64,
    pub max_agents: Option<usize>,
    /// Stored records that could not be loaded and were set aside.
    pub records_set_aside: u32,
    /// How new agents are held, and what the host offers (hierarchy, root, controllers).
    pub containment: crate::state::Containment,
    pub containment_detail: String,
    /// Every live agent whose health is not healthy, by agent id.
    pub unhealthy: Vec<HealthReport>,
    /// The store's size on disk (records and the event log).
    pub store_bytes: u64,
    /// What the host offers for sandboxes.
    pub sandbox: Option<SandboxSupport>,
}

impl Summary {
    /// How many agents are in `state`.
    pub fn count(&self, state: AgentState) -> u32 {
        self.by_state[state as usize]
    }
}

/// Why one agent is not healthy.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    pub agent_id: String,
    pub health: crate::state::Health,
    pub reason: String,
    pub since: Option<SystemTime>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReapReport {
    pub agent_ids: Vec<String>,
    pub orphans_reaped: u32,
}

/// An agent's recent samples: one point per sampling interval, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentHistory {
    pub interval: Duration,
    /// How far back samples are kept (`--history`).
    pub window: Duration,
    pub points: Vec<HistoryPoint>,
}

pub(crate) enum Command {
    Spawn(Box<SpawnRequest>, oneshot::Sender<Result<AgentStatus>>),
    Status(String, oneshot::Sender<Result<AgentStatus>>),
    List(ListFilter, oneshot::Sender<Result<ListPage>>),
    Stop(
        StopTarget,
        StopOptions,
        oneshot::Sender<Result<Vec<StopReport>>>,
    ),
    Summary(oneshot::Sender<Summary>),
    /// An agent's samples since a time (the whole window when `None`).
    History(
        String,
        Option<SystemTime>,
        oneshot::Sender<Result<AgentHistory>>,
    ),
    Reap(oneshot::Sender<ReapReport>),
    Watch(Watch, oneshot::Sender<Result<Subscription>>),
    Shutdown(oneshot::Sender<()>),
    /// The live agents to sample, unless they are the same as at the generation given.
    SampleTargets(Option<u64>, oneshot::Sender<crate::sampler::RoundStart>),
    Samples(SampleBatch),
    ReportProgress(ProgressReport, oneshot::Sender<Result<AgentStatus>>),
    Remove(String, oneshot::Sender<Result<AgentStatus>>),
    /// Pause (`true`) or resume (`false`) these agents.
    Pause(Vec<String>, bool, oneshot::Sender<Result<Vec<AgentStatus>>>),
    Restart(Vec<String>, oneshot::Sender<Result<Vec<AgentStatus>>>),
    /// Replace a `PROXY` agent's `allow_hosts`.
    UpdateSandbox(String, Vec<String>, oneshot::Sender<Result<AgentStatus>>),
    /// The process groups a group check found empty (agent id, group id).
    GroupsGone(Vec<(String, i32)>),
    /// The keeper reaped one of its children.
    KeptExit(KeptExit),
    /// The kernel refused a process something (a sandboxed agent's, perhaps).
    KernelDenied(crate::audit::KernelDenial),
    /// The LLM gateway read what a request cost the agent (agent id, model, usage).
    /// With the budgets it reached.
    Spent(
        String,
        String,
        crate::spend::Usage,
        Vec<crate::spend::Exhausted>,
    ),
    BudgetReached(crate::spend::Exhausted),
    Spending(oneshot::Sender<std::sync::Arc<crate::spend::Spending>>),
    SetBudget(
        String,
        Option<crate::spend::Budget>,
        oneshot::Sender<Result<AgentStatus>>,
    ),
    /// The processes an agent holds now (none once it ended).
    AgentProcesses(String, oneshot::Sender<Vec<i32>>),
    /// What an agent reports it spent itself (agent id, model, usage).
    ReportUsage(
        String,
        String,
        crate::spend::Usage,
        oneshot::Sender<Result<AgentStatus>>,
    ),
    /// A command sent inside a span (tracing is on): the supervisor's spans for it continue it.
    Traced(tracing::Span, Box<Command>),
    /// Something the supervisor depends on broke (the sampler thread died): it stops, and
    /// the daemon exits non-zero instead of limping.
    Fatal(String),
}

/// A cheap, cloneable way to talk to the supervisor task.
#[derive(Clone)]
pub struct SupervisorHandle {
    pub(crate) commands: mpsc::Sender<Command>,
    /// Lets a caller wait for its change to reach the disk on its own task, not the
    /// supervisor's.
    pub(crate) store: Store,
}

impl SupervisorHandle {
    async fn request<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        let command = command(reply);
        let span = tracing::Span::current();
        let command = match span.is_disabled() {
            true => command,
            false => Command::Traced(span, Box::new(command)),
        };
        self.commands
            .send(command)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)
    }

    /// Starts an agent; answers once its record is on disk.
    pub async fn spawn(&self, request: SpawnRequest) -> Result<AgentStatus> {
        let spawned = self
            .request(|reply| Command::Spawn(Box::new(request), reply))
            .await?;
        // Answer only once the record (or the failure) is on disk.
        let flush = tracing::info_span!(target: crate::trace::TARGET, "agentd.spawn.flush");
        self.store.flush().instrument(flush).await?;
        spawned
    }

    pub async fn status(&self, agent_id: String) -> Result<AgentStatus> {
        self.request(|reply| Command::Status(agent_id, reply))
            .await?
    }

    /// Matching agents, sorted by id.
    pub async fn list(&self, filter: ListFilter) -> Result<ListPage> {
        self.request(|reply| Command::List(filter, reply)).await?
    }

    /// Stops agents, all ladders concurrently; answers when every one has ended.
    pub async fn stop(&self, target: StopTarget, options: StopOptions) -> Result<Vec<StopReport>> {
        self.request(|reply| Command::Stop(target, options, reply))
            .await?
    }

    /// Records an agent's heartbeat and progress.
    pub async fn report_progress(&self, report: ProgressReport) -> Result<AgentStatus> {
        self.request(|reply| Command::ReportProgress(report, reply))
            .await?
    }

    /// Deletes an agent that has ended for good: record, folder, output.
    pub async fn remove(&self, agent_id: String) -> Result<AgentStatus> {
        self.request(|reply| Command::Remove(agent_id, reply))
            .await?
    }

    /// Freezes running agents (`pause` true) or thaws paused ones; all or none: answers
    /// with an error, changing nothing, if one of them is unknown or has ended.
    pub async fn pause(&self, agent_ids: Vec<String>, pause: bool) -> Result<Vec<AgentStatus>> {
        let statuses = self
            .request(|reply| Command::Pause(agent_ids, pause, reply))
            .await??;
        self.store.flush().await?;
        Ok(statuses)
    }

    /// Restarts agents: each goes down its stop ladder (if it runs) and starts again with
    /// the same id and spec. All or none; answers with their statuses once each runs again.
    pub async fn restart(&self, agent_ids: Vec<String>) -> Result<Vec<AgentStatus>> {
        let statuses = self
            .request(|reply| Command::Restart(agent_ids, reply))
            .await??;
        self.store.flush().await?;
        Ok(statuses)
    }

    /// Replaces a `PROXY` agent's `allow_hosts`; its proxy applies them to the next
    /// connection.
    pub async fn update_sandbox(
        &self,
        agent_id: String,
        allow_hosts: Vec<String>,
    ) -> Result<AgentStatus> {
        let status = self
            .request(|reply| Command::UpdateSandbox(agent_id, allow_hosts, reply))
            .await??;
        self.store.flush().await?;
        Ok(status)
    }

    pub async fn summary(&self) -> Result<Summary> {
        self.request(Command::Summary).await
    }

    /// An agent's samples from `since` (or as far back as they are kept) to now.
    pub async fn history(
        &self,
        agent_id: String,
        since: Option<SystemTime>,
    ) -> Result<AgentHistory> {
        self.request(|reply| Command::History(agent_id, since, reply))
            .await?
    }

    pub async fn reap(&self) -> Result<ReapReport> {
        self.request(Command::Reap).await
    }

    /// Adds what one LLM request cost to the agent's spend (the gateway read it). Not
    /// waited for.
    pub fn spent(
        &self,
        agent_id: &str,
        model: &str,
        usage: crate::spend::Usage,
        reached: Vec<crate::spend::Exhausted>,
    ) {
        let command = Command::Spent(agent_id.to_string(), model.to_string(), usage, reached);
        self.send_later(command);
    }

    /// What the LLM gateway shares with the supervisor: agents' keys and budgets.
    pub async fn spending(&self) -> Result<std::sync::Arc<crate::spend::Spending>> {
        self.request(Command::Spending).await
    }

    /// A request the gateway refused at a budget: the supervisor acts on it (once).
    pub fn budget_reached(&self, exhausted: crate::spend::Exhausted) {
        self.send_later(Command::BudgetReached(exhausted));
    }

    /// Sends without waiting: at once, or, while the supervisor's queue is full, from a task
    /// of its own (spend must not be lost to a busy moment).
    fn send_later(&self, command: Command) {
        match self.commands.try_send(command) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(command)) => {
                let commands = self.commands.clone();
                tokio::spawn(async move {
                    let _ = commands.send(command).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!("spend not recorded: the supervisor has stopped");
            }
        }
    }

    /// The processes an agent holds now: its cgroup's or its process group's members.
    pub async fn agent_processes(&self, agent_id: String) -> Result<Vec<i32>> {
        self.request(|reply| Command::AgentProcesses(agent_id, reply))
            .await
    }

    /// Counts what an agent reports it spent calling a provider itself.
    pub async fn report_usage(
        &self,
        agent_id: String,
        model: String,
        usage: crate::spend::Usage,
    ) -> Result<AgentStatus> {
        self.request(|reply| Command::ReportUsage(agent_id, model, usage, reply))
            .await?
    }

    /// Replaces an agent's budget; see `supervisor/spend.rs`.
    pub async fn set_budget(
        &self,
        agent_id: String,
        budget: Option<crate::spend::Budget>,
    ) -> Result<AgentStatus> {
        self.request(|reply| Command::SetBudget(agent_id, budget, reply))
            .await?
    }

    /// Subscribes to events; see [`Watch`].
    pub async fn watch(&self, watch: Watch) -> Result<Subscription> {
        self.request(|reply| Command::Watch(watch, reply)).await?
    }

    /// Refuses new spawns, stops every agent with its ladder and flushes the store.
    pub async fn shutdown(&self) -> Result<()> {
        self.request(Command::Shutdown).await
    }

    /// Completes when the supervisor task has stopped. Before a shutdown that means it
    /// failed (the reason is in the log): the daemon must then exit, not serve errors.
    pub async fn stopped(&self) {
        self.commands.closed().await;
    }
}
