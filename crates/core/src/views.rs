//! What the supervisor shows: filtered lists, the summary, and the health samples that feed
//! every status.

use crate::agent::{AgentState, AgentStatus, Health};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::health::HealthPolicy;
use crate::sampler::{SampleBatch, SampleTarget};
use crate::supervisor::{Agent, HealthReport, ListFilter, Summary, SupervisorTask};

impl SupervisorTask {
    pub(crate) fn list(&self, filter: &ListFilter) -> Result<Vec<AgentStatus>> {
        let subtree = match &filter.subtree_of {
            Some(root) if !self.agents.contains_key(root) => {
                return Err(Error::NotFound { id: root.clone() });
            }
            Some(root) => Some(self.subtree(root)),
            None => None,
        };
        Ok(self
            .agents
            .values()
            .filter(|agent| {
                let spec = &agent.record.spec;
                subtree
                    .as_ref()
                    .is_none_or(|subtree| subtree.contains(&spec.agent_id))
                    && (filter.states.is_empty() || filter.states.contains(&agent.record.state))
                    && (filter.parent_agent_id.is_empty()
                        || filter.parent_agent_id == spec.parent_agent_id)
                    && filter
                        .labels
                        .iter()
                        .all(|(k, v)| spec.labels.get(k) == Some(v))
            })
            .map(Agent::status)
            .collect())
    }

    pub(crate) fn summary(&self) -> Summary {
        let mut summary = Summary {
            capacity: self.limits.capacity,
            max_agents: self.limits.max_agents,
            records_set_aside: self.records_set_aside,
            ..Summary::default()
        };
        for agent in self.agents.values() {
            let status = agent.status();
            summary.total += 1;
            let count = match agent.record.state {
                AgentState::Starting => &mut summary.starting,
                AgentState::Running => &mut summary.running,
                AgentState::Stopping => &mut summary.stopping,
                AgentState::Completed => &mut summary.completed,
                AgentState::Failed => &mut summary.failed,
                AgentState::Killed => &mut summary.killed,
                AgentState::Lost => &mut summary.lost,
                AgentState::BackingOff => &mut summary.backing_off,
                AgentState::TimedOut => &mut summary.timed_out,
            };
            *count += 1;
            summary.zombies += u32::from(status.is_zombie);
            summary.total_memory_mb += status.memory_mb;
            summary.total_cpu_percent += status.cpu_percent;
            if agent.record.state.holds_capacity() {
                summary.total_load_percentage += agent.record.spec.load_percentage;
            }
            match status.health {
                Health::Stalled => summary.stalled += 1,
                Health::OverLimit => summary.over_limit += 1,
                _ => {}
            }
            if status.process_alive && status.health != Health::Healthy {
                let issues = &agent.record.health_issues;
                summary.unhealthy.push(HealthReport {
                    agent_id: agent.record.spec.agent_id.clone(),
                    health: status.health,
                    reason: match status.health {
                        Health::Zombie => "the leader process is a zombie".to_string(),
                        _ => issues
                            .iter()
                            .map(|i| i.reason.as_str())
                            .collect::<Vec<_>>()
                            .join("; "),
                    },
                    since: issues.iter().map(|issue| issue.since).min(),
                });
            }
        }
        summary.free_capacity = (summary.capacity - summary.total_load_percentage).max(0.0);
        summary
    }

    pub(crate) fn sample_targets(&self) -> Vec<SampleTarget> {
        self.agents
            .values()
            .filter(|agent| agent.leader_alive)
            .filter_map(|agent| {
                Some(SampleTarget {
                    agent_id: agent.record.spec.agent_id.clone(),
                    pid: agent.record.pid?,
                    dir: agent.record.agent_dir.clone(),
                })
            })
            .collect()
    }

    /// Takes a sampler batch: new samples (each a HEALTH event), progress from status files
    /// (each a heartbeat), then every health check of every live agent, then retention.
    pub(crate) fn apply_samples(&mut self, batch: SampleBatch) {
        for (agent_id, sample) in batch.samples {
            let Some(agent) = self.agents.get_mut(&agent_id) else {
                continue;
            };
            if agent.leader_alive {
                agent.sample = Some(sample);
                self.emit(&agent_id, EventKind::Health, String::new());
            }
        }
        for (agent_id, progress) in batch.progress {
            let Some(agent) = self.agents.get_mut(&agent_id) else {
                continue;
            };
            if !agent.leader_alive {
                continue;
            }
            let record = &mut agent.record;
            let changed =
                record.progress != progress.progress || record.progress_message != progress.message;
            record.progress = progress.progress;
            record.progress_message = progress.message;
            self.on_heartbeat(&agent_id, changed);
        }
        let checked: Vec<String> = self
            .agents
            .values()
            .filter(|agent| {
                agent.leader_alive && agent.record.spec.health_policy != HealthPolicy::default()
            })
            .map(|agent| agent.record.spec.agent_id.clone())
            .collect();
        for agent_id in checked {
            self.check_health(&agent_id);
        }
        self.apply_retention();
    }
}
