//! Stops, cascades down the agent tree, pause and resume, and shutdown.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::Instrument;

use crate::agent::AgentStatus;

use crate::config::ShutdownPolicy;
use crate::error::{Error, Result};
use crate::handle::{StopTarget, SupervisorHandle};
use crate::lifecycle::ParentExit;
use crate::spec::check_id;
use crate::state::AgentState;
use crate::state::StopReason;
use crate::stop::{StopOptions, StopOutcome, StopReport};

use super::{Ack, SupervisorTask};

impl SupervisorTask {
    /// Pauses or resumes agents, all or none.
    pub(super) fn pause(&mut self, agent_ids: &[String], pause: bool) -> Result<Vec<AgentStatus>> {
        if agent_ids.is_empty() {
            return Err(Error::Invalid {
                field: "agent_ids",
                problem: "name at least one agent".into(),
            });
        }
        for agent_id in agent_ids {
            check_id("agent_ids", agent_id)?;
            let record = self.table.get(agent_id)?.record();
            if !matches!(record.state, AgentState::Running | AgentState::Paused) {
                return Err(Error::NotRunning {
                    id: agent_id.clone(),
                    state: record.state,
                });
            }
        }
        let mut statuses = Vec::with_capacity(agent_ids.len());
        for agent_id in agent_ids {
            let done = self.input(agent_id, |m, now, out| {
                if pause {
                    m.pause(now, out)
                } else {
                    m.resume(now, out)
                }
            });
            if let Some(Err(state)) = done {
                return Err(Error::NotRunning {
                    id: agent_id.clone(),
                    state,
                });
            }
            statuses.push(self.table.get(agent_id)?.status(self.clock.mono()));
        }
        Ok(statuses)
    }

    /// Starts stopping an agent, or joins a stop under way; the receiver gets the report.
    pub(super) fn begin_stop(
        &mut self,
        agent_id: &str,
        force: bool,
        reason: StopReason,
    ) -> oneshot::Receiver<StopReport> {
        let (waiter, report) = oneshot::channel();
        let Ok(machine) = self.table.get(agent_id) else {
            return report;
        };
        // Members of an ended run's group are stopped too, if there are any left.
        if !machine.leader_alive()
            && machine.may_linger()
            && !machine.watches_group()
            && machine
                .record()
                .hold()
                .is_none_or(|hold| !self.os.group_alive(hold))
        {
            self.input(agent_id, |m, now, out| m.group_gone(now, out));
        }
        self.stop_waiters
            .entry(agent_id.to_string())
            .or_default()
            .push(waiter);
        let pending = self.input(agent_id, |m, now, out| m.stop(now, force, reason, out));
        if pending != Some(true)
            && let Some(waiter) = self
                .stop_waiters
                .get_mut(agent_id)
                .and_then(|waiters| waiters.pop())
            && let Ok(machine) = self.table.get(agent_id)
        {
            let _ = waiter.send(StopReport {
                agent_id: agent_id.to_string(),
                outcome: StopOutcome::AlreadyExited,
                duration: Duration::ZERO,
                status: machine.status(self.clock.mono()),
            });
        }
        report
    }

    /// The agent ended for good: children that asked to follow their parent are stopped.
    pub(super) fn stop_followers(&mut self, agent_id: &str) {
        let followers: Vec<String> = self
            .table
            .children_of(agent_id)
            .filter(|child| {
                self.table.get(child).is_ok_and(|child| {
                    child.record().spec.lifecycle.on_parent_exit == ParentExit::Stop
                        && (child.leader_alive() || child.record().state == AgentState::BackingOff)
                })
            })
            .cloned()
            .collect();
        // One being launched has no process to stop yet: it is stopped once it has.
        for child in self.table.children_of(agent_id) {
            if let Some(launching) = self.launching.get_mut(child)
                && self.table.get(child).is_ok_and(|child| {
                    child.record().spec.lifecycle.on_parent_exit == ParentExit::Stop
                })
            {
                launching.parent_ended = true;
            }
        }
        for child in followers {
            tracing::info!(agent_id = %child, parent = %agent_id, "stopping: its parent ended");
            drop(self.begin_stop(&child, false, StopReason::ParentExited));
        }
    }

    pub(super) fn stop(
        &mut self,
        target: StopTarget,
        options: StopOptions,
        reply: oneshot::Sender<Result<Vec<StopReport>>>,
    ) {
        let agent_ids: Vec<String> = match target {
            StopTarget::All => self.table.ids().cloned().collect(),
            StopTarget::Agents(ids) if ids.is_empty() => {
                let _ = reply.send(Err(Error::Invalid {
                    field: "agent_ids",
                    problem: "name at least one agent, or stop all".into(),
                }));
                return;
            }
            StopTarget::Agents(ids) => ids,
        };
        if let Some(unknown) = agent_ids.iter().find(|id| !self.table.contains(id)) {
            let error = match check_id("agent_ids", unknown) {
                Err(error) => error,
                Ok(()) => Error::NotFound {
                    id: unknown.clone(),
                },
            };
            let _ = reply.send(Err(error));
            return;
        }
        if options.cascade {
            match self.stop_cascade(agent_ids, options.force) {
                Some(cascade) => {
                    tokio::spawn(async move {
                        let _ = reply.send(Ok(cascade.await));
                    });
                }
                None => {
                    let _ = reply.send(Err(Error::ShuttingDown));
                }
            }
            return;
        }
        let pending: Vec<_> = agent_ids
            .iter()
            .map(|id| self.begin_stop(id, options.force, StopReason::Requested))
            .collect();
        tokio::spawn(async move {
            let mut reports = Vec::with_capacity(pending.len());
            for report in pending {
                match report.await {
                    Ok(report) => reports.push(report),
                    Err(_) => {
                        let _ = reply.send(Err(Error::ShuttingDown));
                        return;
                    }
                }
            }
            let _ = reply.send(Ok(reports));
        });
    }

    /// Stops `roots` and all their descendants, children before parents, branches at once.
    pub(super) fn stop_cascade(
        &self,
        roots: Vec<String>,
        force: bool,
    ) -> Option<Pin<Box<dyn Future<Output = Vec<StopReport>> + Send>>> {
        let handle = SupervisorHandle {
            commands: self.commands.upgrade()?,
            store: self.store.clone(),
        };
        let children = Arc::new(self.table.children());
        // A root that is inside another root's tree is stopped as part of it.
        let covered: BTreeSet<String> = roots
            .iter()
            .flat_map(|root| {
                self.table
                    .subtree(root)
                    .into_iter()
                    .filter(move |id| id != root)
            })
            .collect();
        let roots: Vec<String> = roots.into_iter().filter(|r| !covered.contains(r)).collect();
        let span = tracing::Span::current();
        Some(Box::pin(async move {
            let mut trees = tokio::task::JoinSet::new();
            for root in roots {
                let tree = stop_subtree(handle.clone(), root, children.clone(), force);
                trees.spawn(tree.instrument(span.clone()));
            }
            let mut reports = Vec::new();
            while let Some(done) = trees.join_next().await {
                reports.extend(done.unwrap_or_default());
            }
            reports
        }))
    }

    pub(super) fn shutdown(&mut self, reply: oneshot::Sender<()>) {
        self.shutting_down = true;
        let live = self.table.ids_where(|m| {
            m.leader_alive() || m.may_linger() || m.record().state == AgentState::BackingOff
        });
        let pending: Vec<_> = match self.limits.on_shutdown {
            ShutdownPolicy::Stop => {
                tracing::info!(agents = live.len(), "shutting down: stopping every agent");
                live.iter()
                    .map(|id| self.begin_stop(id, false, StopReason::Shutdown))
                    .collect()
            }
            ShutdownPolicy::Detach => {
                tracing::info!(
                    agents = live.len(),
                    "shutting down: leaving agents running for the next agentd to adopt"
                );
                Vec::new()
            }
        };
        // Agents that ended earlier and whose cgroup emptied since give it back now.
        for agent_id in self.table.ids_where(|m| m.has_ended()) {
            self.remove_cgroup_if_empty(&agent_id);
        }
        let store = self.store.clone();
        let acks = self.acks.clone();
        let os = self.os.clone();
        tokio::spawn(async move {
            for report in pending {
                let _ = report.await;
            }
            // Each stopped agent gave its cgroup back; the root goes too if nothing is left.
            os.remove_cgroup_root();
            if let Err(error) = store.flush().await {
                tracing::error!(%error, "flushing the store at shutdown");
            }
            // The keeper forgets the exits it reported, and exits once it keeps nothing.
            let (drained, done) = oneshot::channel();
            if acks.send(Ack::Drain(drained)).is_ok() {
                let _ = done.await;
            }
            let _ = reply.send(());
        });
    }
}

pub(super) fn stop_subtree(
    handle: SupervisorHandle,
    root: String,
    children: Arc<HashMap<String, Vec<String>>>,
    force: bool,
) -> Pin<Box<dyn Future<Output = Vec<StopReport>> + Send>> {
    Box::pin(async move {
        let mut branches = tokio::task::JoinSet::new();
        for child in children.get(&root).into_iter().flatten() {
            let branch = stop_subtree(handle.clone(), child.clone(), children.clone(), force);
            branches.spawn(branch.instrument(tracing::Span::current()));
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
