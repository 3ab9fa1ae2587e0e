//! Lifecycle policies: what happens when a run ends (restart with backoff, or end for good
//! and maybe take children along), runtime and startup limits, agent trees, and capacity.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::agent::{AgentState, Exit};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::spawn::AgentFiles;
use crate::spec::AgentSpec;
use crate::stop::{StopOptions, StopReason, StopReport};
use crate::supervisor::{StopTarget, SupervisorHandle, SupervisorTask, Timer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartPolicy {
    #[default]
    Never,
    /// A non-zero exit, a signal agentd did not send, a failed start, a startup timeout or a
    /// health check whose action is restart.
    OnFailure,
    /// Any end that was not a stop a client asked for.
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParentExit {
    #[default]
    Keep,
    Stop,
}

/// Exponential backoff between restarts, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    /// A run at least this long resets the backoff.
    pub reset_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            reset_after: Duration::from_secs(60),
        }
    }
}

/// Up to this share of a delay is added or taken off at random, so agents that failed
/// together do not all restart at the same instant.
const JITTER: f64 = 0.1;

impl Backoff {
    /// The wait before the restart that follows `failures` consecutive short runs (0: the
    /// first), before jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = self.multiplier.powi(failures.min(64) as i32);
        let seconds = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        Duration::from_secs_f64(seconds)
    }

    fn jittered(&self, failures: u32) -> Duration {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(failures);
        let unit = (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64;
        self.delay(failures)
            .mul_f64(1.0 + JITTER * (2.0 * unit - 1.0))
    }
}

/// A spawn's lifecycle policies.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct LifecyclePolicy {
    pub restart: RestartPolicy,
    pub backoff: Backoff,
    /// `None`: no limit.
    pub max_restarts: Option<u32>,
    pub max_runtime: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    pub on_parent_exit: ParentExit,
}

const MAX_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

impl LifecyclePolicy {
    pub(crate) fn validate(self, has_heartbeat: bool) -> Result<LifecyclePolicy> {
        let invalid = |field: &'static str, problem: String| Err(Error::Invalid { field, problem });
        let backoff = self.backoff;
        if backoff.initial.is_zero() || backoff.initial > backoff.max || backoff.max > MAX_LIMIT {
            return invalid(
                "restart_backoff",
                format!(
                    "initial {:?} must be above zero and at most max {:?} (at most a year)",
                    backoff.initial, backoff.max
                ),
            );
        }
        if !(backoff.multiplier.is_finite() && (1.0..=100.0).contains(&backoff.multiplier)) {
            return invalid(
                "restart_backoff.multiplier",
                format!("{} must be between 1 and 100", backoff.multiplier),
            );
        }
        for (field, limit) in [
            ("max_runtime", self.max_runtime),
            ("startup_timeout", self.startup_timeout),
        ] {
            if let Some(limit) = limit
                && (limit.is_zero() || limit > MAX_LIMIT)
            {
                return invalid(
                    field,
                    format!("{limit:?} must be above zero and at most a year"),
                );
            }
        }
        if self.startup_timeout.is_some() && !has_heartbeat {
            return invalid(
                "startup_timeout",
                "needs health_policy.heartbeat_timeout: the first heartbeat is what it waits for"
                    .into(),
            );
        }
        Ok(self)
    }
}

/// How a run ended, for the restart decision.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RunEnd {
    /// The leader exited on its own (`None`: adopted, status unknown).
    Exited(Option<Exit>),
    /// The run was stopped, for this reason.
    Stopped(StopReason),
    /// The process could not be started again.
    FailedToStart,
    /// The process was gone when agentd restarted.
    Lost,
}

fn wants_restart(policy: RestartPolicy, end: &RunEnd) -> bool {
    let on_failure = policy != RestartPolicy::Never;
    match end {
        RunEnd::Stopped(reason) if reason.client_asked() => false,
        RunEnd::Stopped(StopReason::ParentExited | StopReason::Health) => false,
        RunEnd::Stopped(StopReason::MaxRuntime) => policy == RestartPolicy::Always,
        RunEnd::Stopped(_) | RunEnd::FailedToStart | RunEnd::Lost => on_failure,
        RunEnd::Exited(Some(Exit::Code(0)) | None) => policy == RestartPolicy::Always,
        RunEnd::Exited(Some(_)) => on_failure,
    }
}

impl SupervisorTask {
    /// A run is over (the leader is gone and, if it was being stopped, its whole group):
    /// schedule a restart if the policy wants one, else the agent has ended for good.
    pub(crate) fn run_ended(&mut self, agent_id: &str, end: RunEnd) {
        let shutting_down = self.shutting_down;
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.run_over {
            return;
        }
        agent.run_over = true;
        let policy = agent.record.spec.lifecycle.clone();
        if shutting_down || !wants_restart(policy.restart, &end) {
            self.ended_for_good(agent_id);
            return;
        }
        let record = &mut agent.record;
        if let Some(max) = policy.max_restarts
            && record.restart_count >= max
        {
            let message = format!(
                "gave up after {max} restarts; the last run ended {}",
                record.state_text()
            );
            record.state = AgentState::Failed;
            record.error = Some(message.clone());
            let record = record.clone();
            self.persist(&record);
            tracing::warn!(%agent_id, "{message}");
            self.emit(agent_id, EventKind::Failed, message);
            self.ended_for_good(agent_id);
            return;
        }
        let ran = match (record.started_at, record.ended_at) {
            (Some(start), Some(end)) => end.duration_since(start).unwrap_or_default(),
            _ => Duration::ZERO,
        };
        if ran >= policy.backoff.reset_after {
            record.backoff_step = 0;
        }
        let delay = policy.backoff.jittered(record.backoff_step);
        record.backoff_step += 1;
        record.last_exit = record.exit;
        record.state = AgentState::BackingOff;
        record.next_restart_at = Some(SystemTime::now() + delay);
        let at = Instant::now() + delay;
        agent.restart_at = Some(at);
        let message = format!(
            "restarting in {:.2}s (restart {}{})",
            delay.as_secs_f64(),
            record.restart_count + 1,
            policy
                .max_restarts
                .map_or(String::new(), |max| format!(" of {max}"))
        );
        let record = record.clone();
        self.timers
            .insert((at, agent_id.to_string(), Timer::Restart));
        self.persist(&record);
        tracing::info!(%agent_id, "{message}");
        self.emit(agent_id, EventKind::Restarting, message);
    }

    /// Starts a backing-off agent again, in the same folder, with the same id.
    pub(crate) fn restart(&mut self, agent_id: &str, at: Instant) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        if agent.record.state != AgentState::BackingOff || agent.restart_at != Some(at) {
            return;
        }
        agent.restart_at = None;
        let launched = AgentFiles::reopen(agent_id, &agent.record.agent_dir)
            .and_then(|files| files.launch(&agent.record));
        let record = &mut agent.record;
        record.next_restart_at = None;
        match launched {
            Ok(started) => {
                record.restart_count += 1;
                record.state = AgentState::Running;
                record.pid = Some(started.pid);
                record.start_ticks = started.start_ticks;
                record.started_at = Some(SystemTime::now());
                record.ended_at = None;
                record.exit = None;
                record.error = None;
                record.last_heartbeat = None;
                record.health_issues.clear();
                let message = format!("restart {}", record.restart_count);
                agent.leader_alive = true;
                agent.group_may_live = true;
                agent.run_over = false;
                agent.cpu_samples_over = 0;
                let record = record.clone();
                self.by_pid.insert(started.pid, agent_id.to_string());
                self.persist(&record);
                tracing::info!(%agent_id, pid = started.pid, "{message}");
                self.emit(agent_id, EventKind::Spawned, message);
                self.schedule_run_limits(agent_id);
            }
            Err(error) => {
                let message = error.to_string();
                record.state = AgentState::Failed;
                record.error = Some(message.clone());
                record.ended_at = Some(SystemTime::now());
                record.exit = None;
                agent.run_over = false;
                let record = record.clone();
                self.persist(&record);
                tracing::warn!(%agent_id, "{message}");
                self.emit(agent_id, EventKind::Failed, message);
                self.run_ended(agent_id, RunEnd::FailedToStart);
            }
        }
    }

    /// A stop cancels a pending restart at once. Returns whether there was one.
    pub(crate) fn cancel_restart(&mut self, agent_id: &str) -> bool {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return false;
        };
        if agent.record.state != AgentState::BackingOff {
            return false;
        }
        if let Some(at) = agent.restart_at.take() {
            self.timers
                .remove(&(at, agent_id.to_string(), Timer::Restart));
        }
        agent.record.state = AgentState::Killed;
        agent.record.next_restart_at = None;
        let record = agent.record.clone();
        self.persist(&record);
        self.emit(
            agent_id,
            EventKind::Killed,
            "restart cancelled by a stop".to_string(),
        );
        self.ended_for_good(agent_id);
        true
    }

    /// The agent will not run again: children that asked to follow their parent are stopped.
    fn ended_for_good(&mut self, agent_id: &str) {
        let children: Vec<String> = self
            .agents
            .values()
            .filter(|child| {
                let spec = &child.record.spec;
                spec.parent_agent_id == agent_id
                    && spec.lifecycle.on_parent_exit == ParentExit::Stop
                    && (child.leader_alive || child.record.state == AgentState::BackingOff)
            })
            .map(|child| child.record.spec.agent_id.clone())
            .collect();
        for child in children {
            tracing::info!(agent_id = %child, parent = %agent_id, "stopping: its parent ended");
            drop(self.begin_stop(&child, false, StopReason::ParentExited));
        }
    }

    /// Sets the runtime and startup limits of the run that just started (or was adopted).
    pub(crate) fn schedule_run_limits(&mut self, agent_id: &str) {
        let Some(agent) = self.agents.get_mut(agent_id) else {
            return;
        };
        let policy = &agent.record.spec.lifecycle;
        let ran = agent
            .record
            .started_at
            .and_then(|start| SystemTime::now().duration_since(start).ok())
            .unwrap_or_default();
        let now = Instant::now();
        let due = |limit: Duration| now + limit.saturating_sub(ran);
        agent.max_runtime_at = policy.max_runtime.map(due);
        agent.startup_deadline = policy
            .startup_timeout
            .filter(|_| agent.record.last_heartbeat.is_none())
            .map(due);
        for (at, timer) in [
            (agent.max_runtime_at, Timer::MaxRuntime),
            (agent.startup_deadline, Timer::StartupTimeout),
        ] {
            if let Some(at) = at {
                self.timers.insert((at, agent_id.to_string(), timer));
            }
        }
    }

    pub(crate) fn on_max_runtime(&mut self, agent_id: &str, at: Instant) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        if agent.max_runtime_at == Some(at) && agent.leader_alive {
            tracing::info!(%agent_id, "max_runtime reached: stopping");
            drop(self.begin_stop(agent_id, false, StopReason::MaxRuntime));
        }
    }

    pub(crate) fn on_startup_timeout(&mut self, agent_id: &str, at: Instant) {
        let Some(agent) = self.agents.get(agent_id) else {
            return;
        };
        if agent.startup_deadline == Some(at)
            && agent.leader_alive
            && agent.record.last_heartbeat.is_none()
        {
            tracing::info!(%agent_id, "no first heartbeat within startup_timeout: stopping");
            drop(self.begin_stop(agent_id, false, StopReason::StartupTimeout));
        }
    }

    /// Refuses a spawn that would pass the daemon's capacity or agent limit, or that names
    /// a parent agent that does not exist.
    pub(crate) fn admit(&self, spec: &AgentSpec) -> Result<()> {
        let parent = &spec.parent_agent_id;
        if !parent.is_empty() && !parent.starts_with('@') && !self.agents.contains_key(parent) {
            return Err(Error::UnknownParent {
                id: spec.agent_id.clone(),
                parent: parent.clone(),
            });
        }
        let (count, load) = self
            .agents
            .values()
            .filter(|agent| agent.record.state.holds_capacity())
            .fold((0usize, 0.0f64), |(count, load), agent| {
                (count + 1, load + agent.record.spec.load_percentage)
            });
        if let Some(max) = self.limits.max_agents
            && count >= max
        {
            return Err(Error::TooManyAgents { max, count });
        }
        if load + spec.load_percentage > self.limits.capacity + 1e-9 {
            return Err(Error::OverCapacity {
                requested: spec.load_percentage,
                used: load,
                capacity: self.limits.capacity,
            });
        }
        Ok(())
    }

    /// Each agent's children, by the parent links.
    pub(crate) fn children(&self) -> HashMap<String, Vec<String>> {
        let mut children: HashMap<String, Vec<String>> = HashMap::new();
        for agent in self.agents.values() {
            let spec = &agent.record.spec;
            if !spec.parent_agent_id.is_empty() {
                children
                    .entry(spec.parent_agent_id.clone())
                    .or_default()
                    .push(spec.agent_id.clone());
            }
        }
        children
    }

    /// The agent and all its descendants.
    pub(crate) fn subtree(&self, root: &str) -> BTreeSet<String> {
        let children = self.children();
        let mut subtree = BTreeSet::new();
        let mut stack = vec![root.to_string()];
        while let Some(id) = stack.pop() {
            if subtree.insert(id.clone()) {
                stack.extend(children.get(&id).into_iter().flatten().cloned());
            }
        }
        subtree
    }

    /// Stops `roots` and all their descendants, children before parents, branches at once.
    pub(crate) fn stop_cascade(
        &self,
        roots: Vec<String>,
        force: bool,
    ) -> Option<Pin<Box<dyn Future<Output = Vec<StopReport>> + Send>>> {
        let handle = self.own_handle()?;
        let children = Arc::new(self.children());
        // A root that is inside another root's tree is stopped as part of it.
        let covered: BTreeSet<String> = roots
            .iter()
            .flat_map(|root| self.subtree(root).into_iter().filter(move |id| id != root))
            .collect();
        let roots: Vec<String> = roots.into_iter().filter(|r| !covered.contains(r)).collect();
        Some(Box::pin(async move {
            let mut trees = tokio::task::JoinSet::new();
            for root in roots {
                trees.spawn(stop_subtree(handle.clone(), root, children.clone(), force));
            }
            let mut reports = Vec::new();
            while let Some(done) = trees.join_next().await {
                reports.extend(done.unwrap_or_default());
            }
            reports
        }))
    }
}

fn stop_subtree(
    handle: SupervisorHandle,
    root: String,
    children: Arc<HashMap<String, Vec<String>>>,
    force: bool,
) -> Pin<Box<dyn Future<Output = Vec<StopReport>> + Send>> {
    Box::pin(async move {
        let mut branches = tokio::task::JoinSet::new();
        for child in children.get(&root).into_iter().flatten() {
            branches.spawn(stop_subtree(
                handle.clone(),
                child.clone(),
                children.clone(),
                force,
            ));
        }
        let mut reports = Vec::new();
        while let Some(done) = branches.join_next().await {
            reports.extend(done.unwrap_or_default());
        }
        let options = StopOptions {
            force,
            cascade: false,
        };
        match handle
            .stop(StopTarget::Agents(vec![root.clone()]), options)
            .await
        {
            Ok(own) => reports.extend(own),
            Err(error) => tracing::warn!(agent_id = %root, %error, "cascading stop"),
        }
        reports
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_the_multiplier_up_to_the_max() {
        let backoff = Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            reset_after: Duration::from_secs(60),
        };
        let delays: Vec<u128> = (0..5).map(|n| backoff.delay(n).as_millis()).collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000]);
        for n in 0..20 {
            let jittered = backoff.jittered(n).as_secs_f64();
            let plain = backoff.delay(n).as_secs_f64();
            assert!((plain * 0.9 - 1e-9..=plain * 1.1 + 1e-9).contains(&jittered));
        }
    }

    #[test]
    fn restart_decisions_follow_the_policy() {
        use RestartPolicy::*;
        let crash = RunEnd::Exited(Some(Exit::Code(1)));
        let clean = RunEnd::Exited(Some(Exit::Code(0)));
        let asked = RunEnd::Stopped(StopReason::Requested);
        let timeout = RunEnd::Stopped(StopReason::MaxRuntime);
        let stalled = RunEnd::Stopped(StopReason::HealthRestart);
        assert!(!wants_restart(Never, &crash));
        assert!(wants_restart(OnFailure, &crash) && wants_restart(Always, &crash));
        assert!(!wants_restart(OnFailure, &clean) && wants_restart(Always, &clean));
        assert!(!wants_restart(Always, &asked));
        assert!(!wants_restart(OnFailure, &timeout) && wants_restart(Always, &timeout));
        assert!(wants_restart(OnFailure, &stalled));
        assert!(wants_restart(OnFailure, &RunEnd::FailedToStart));
    }
}
