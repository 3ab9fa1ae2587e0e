//! The agent table: every agent's machine by id, with the indexes that find one by leader pid
//! or by spawn request id, and the questions asked of the whole table (lists, the summary,
//! trees, capacity). Only the supervisor task holds it, so only it changes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::time::Instant;

use crate::config::Limits;
use crate::error::{Error, Result};
use crate::handle::{HealthReport, ListFilter, ListPage, Summary};
use crate::machine::AgentMachine;
use crate::sampler::SampleTarget;
use crate::spec::AgentSpec;
use crate::spend::Spending;
use crate::state::Health;
use std::sync::Arc;

#[derive(Default)]
pub(crate) struct AgentTable {
    agents: BTreeMap<String, AgentMachine>,
    /// Leaders that are our children, by pid, for dispatching reaped exits.
    by_pid: HashMap<i32, String>,
    /// Idempotency keys of spawns that started a process.
    by_request: HashMap<String, String>,
    /// Every agent's LLM gateway key and budget account, shared with the gateway.
    spending: Arc<Spending>,
    /// The agents that hold capacity: how many, and their load in millionths of a percent
    /// (sums stay exact), kept as agents come, go and change state, so that admitting a
    /// spawn does not walk the table.
    held: (usize, i64),
    /// Each parent's children by id (whether the parent is in the table or not).
    children: HashMap<String, BTreeSet<String>>,
}

fn millionths(load: f64) -> i64 {
    (load * 1e6).round() as i64
}

impl AgentTable {
    pub fn get(&self, agent_id: &str) -> Result<&AgentMachine> {
        self.agents.get(agent_id).ok_or_else(|| Error::NotFound {
            id: agent_id.to_string(),
        })
    }

    pub fn get_mut(&mut self, agent_id: &str) -> Option<&mut AgentMachine> {
        self.agents.get_mut(agent_id)
    }

    pub fn contains(&self, agent_id: &str) -> bool {
        self.agents.contains_key(agent_id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.agents.keys()
    }

    pub fn machines(&self) -> impl Iterator<Item = &AgentMachine> {
        self.agents.values()
    }

    /// Ids of the agents that match `keep`.
    pub fn ids_where(&self, keep: impl Fn(&AgentMachine) -> bool) -> Vec<String> {
        self.agents
            .iter()
            .filter(|(_, machine)| keep(machine))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn insert(&mut self, machine: AgentMachine) {
        let record = machine.record();
        let agent_id = record.spec.agent_id.clone();
        if record.pid.is_some() && !record.spec.request_id.is_empty() {
            self.by_request
                .insert(record.spec.request_id.clone(), agent_id.clone());
        }
        if let Some(key) = &record.gateway_key {
            self.spending.keys.insert(key, &agent_id);
        }
        let parent = Some(record.spec.parent_agent_id.as_str()).filter(|p| !p.is_empty());
        self.spending
            .ledger
            .open(&agent_id, parent, record.spec.budget, record.tree_spend);
        if record.state.holds_capacity() {
            self.held_changed(true, record.spec.load_percentage);
        }
        if let Some(parent) = parent {
            self.children
                .entry(parent.to_string())
                .or_default()
                .insert(agent_id.clone());
        }
        // An id whose earlier spawn never started a process is spawned again.
        if let Some(earlier) = self.agents.insert(agent_id, machine) {
            self.forget(&earlier);
        }
    }

    /// Takes a machine that left the table out of the counts and the children.
    fn forget(&mut self, machine: &AgentMachine) {
        let record = machine.record();
        if record.state.holds_capacity() {
            self.held_changed(false, record.spec.load_percentage);
        }
        let (agent_id, parent) = (&record.spec.agent_id, &record.spec.parent_agent_id);
        // The same agent again under the same parent is still its child.
        if let Some(children) = self.children.get_mut(parent)
            && self
                .agents
                .get(agent_id)
                .is_none_or(|now| now.record().spec.parent_agent_id != *parent)
        {
            children.remove(agent_id);
            if children.is_empty() {
                self.children.remove(parent);
            }
        }
    }

    /// An agent's state changed whether it holds capacity: now it does (`holds`) or not.
    pub fn held_changed(&mut self, holds: bool, load: f64) {
        match holds {
            true => self.held = (self.held.0 + 1, self.held.1 + millionths(load)),
            false => {
                self.held = (
                    self.held.0.saturating_sub(1),
                    self.held.1 - millionths(load),
                )
            }
        }
    }

    pub fn remove(&mut self, agent_id: &str) -> Option<AgentMachine> {
        let machine = self.agents.remove(agent_id)?;
        let record = machine.record();
        if self.by_request.get(&record.spec.request_id) == Some(&record.spec.agent_id) {
            self.by_request.remove(&record.spec.request_id);
        }
        if let Some(pid) = record.pid
            && self.by_pid.get(&pid) == Some(&record.spec.agent_id)
        {
            self.by_pid.remove(&pid);
        }
        self.forget(&machine);
        if let Some(key) = &machine.record().gateway_key {
            self.spending.keys.remove(key);
        }
        self.spending.ledger.close(agent_id);
        Some(machine)
    }

    pub fn spending(&self) -> &Arc<Spending> {
        &self.spending
    }

    /// A leader that is our child: its reaped exit belongs to this agent.
    pub fn child_started(&mut self, agent_id: &str, pid: i32, request_id: &str) {
        self.by_pid.insert(pid, agent_id.to_string());
        if !request_id.is_empty() {
            self.by_request
                .insert(request_id.to_string(), agent_id.to_string());
        }
    }

    /// The agent whose leader is `pid` (a child of ours, or adopted): a live one, or with
    /// `ended`, one whose last run it led.
    pub fn by_leader(&self, pid: i32, ended: bool) -> Option<&String> {
        let fits = |machine: &AgentMachine| {
            let record = machine.record();
            record.pid == Some(pid) && (ended || record.state.is_live())
        };
        self.by_pid
            .get(&pid)
            .filter(|id| self.agents.get(*id).is_some_and(fits))
            .or_else(|| {
                self.agents
                    .iter()
                    .find_map(|(id, machine)| fits(machine).then_some(id))
            })
    }

    pub fn take_child(&mut self, pid: i32) -> Option<String> {
        self.by_pid.remove(&pid)
    }

    pub fn by_request(&self, request_id: &str) -> Option<&String> {
        self.by_request.get(request_id)
    }

    pub fn list(&self, filter: &ListFilter, now: Instant) -> Result<ListPage> {
        let subtree = match &filter.subtree_of {
            Some(root) if !self.contains(root) => {
                return Err(Error::NotFound { id: root.clone() });
            }
            Some(root) => Some(self.subtree(root)),
            None => None,
        };
        let start = match &filter.after {
            Some(after) => Bound::Excluded(after.as_str()),
            None => Bound::Unbounded,
        };
        let mut matching = self
            .agents
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, machine)| machine)
            .filter(|machine| {
                let record = machine.record();
                let spec = &record.spec;
                subtree
                    .as_ref()
                    .is_none_or(|subtree| subtree.contains(&spec.agent_id))
                    && (filter.states.is_empty() || filter.states.contains(&record.state))
                    && (filter.parent_agent_id.is_empty()
                        || filter.parent_agent_id == spec.parent_agent_id)
                    && filter
                        .labels
                        .iter()
                        .all(|(k, v)| spec.labels.get(k) == Some(v))
            });
        let agents = matching
            .by_ref()
            .take(filter.limit)
            .map(|machine| machine.status(now))
            .collect();
        Ok(ListPage {
            agents,
            more: matching.next().is_some(),
        })
    }

    pub fn summary(&self, limits: &Limits, records_set_aside: u32) -> Summary {
        let mut summary = Summary {
            capacity: limits.capacity,
            max_agents: limits.max_agents,
            records_set_aside,
            ..Summary::default()
        };
        for machine in self.agents.values() {
            // The figures alone, not a whole status (a clone of the record) per agent:
            // dashboards ask for the summary every few seconds.
            let record = machine.record();
            let sample = machine.live_sample();
            let is_zombie = sample.is_some_and(|s| s.leader_status == "zombie");
            let health = crate::agent::health(record, is_zombie);
            summary.total += 1;
            summary.by_state[record.state as usize] += 1;
            summary.zombies += u32::from(is_zombie);
            if let Some(sample) = sample {
                summary.total_memory_mb += sample.memory_bytes as f64 / (1024.0 * 1024.0);
                summary.total_cpu_percent += sample.cpu_percent;
            }
            if record.state.holds_capacity() {
                summary.total_load_percentage += record.spec.load_percentage;
            }
            match health {
                Health::Stalled => summary.stalled += 1,
                Health::OverLimit => summary.over_limit += 1,
                _ => {}
            }
            if machine.leader_alive() && health != Health::Healthy {
                let issues = &record.health_issues;
                summary.unhealthy.push(HealthReport {
                    agent_id: record.spec.agent_id.clone(),
                    health,
                    reason: match health {
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

    pub fn sample_targets(&self) -> Vec<SampleTarget> {
        self.agents
            .values()
            .filter(|machine| machine.leader_alive())
            .filter_map(|machine| {
                let record = machine.record();
                Some(SampleTarget {
                    agent_id: record.spec.agent_id.clone(),
                    pid: record.pid?,
                    dir: record.agent_dir.clone(),
                    cgroup: record.cgroup.clone(),
                })
            })
            .collect()
    }

    /// Refuses a spawn that would pass the daemon's capacity or agent limit, or that names
    /// a parent agent that does not exist.
    pub fn admit(&self, spec: &AgentSpec, limits: &Limits) -> Result<()> {
        let parent = &spec.parent_agent_id;
        if !parent.is_empty() && !parent.starts_with('@') && !self.contains(parent) {
            return Err(Error::UnknownParent {
                id: spec.agent_id.clone(),
                parent: parent.clone(),
            });
        }
        self.has_room(1, spec.load_percentage, limits)
    }

    /// Refuses `more` agents of `load` in all that would pass the daemon's capacity or agent
    /// limit.
    pub fn has_room(&self, more: usize, load: f64, limits: &Limits) -> Result<()> {
        let (count, used) = (self.held.0, self.held.1 as f64 / 1e6);
        debug_assert_eq!(
            self.held,
            self.agents
                .values()
                .map(AgentMachine::record)
                .filter(|record| record.state.holds_capacity())
                .fold((0, 0), |(count, load), record| {
                    (count + 1, load + millionths(record.spec.load_percentage))
                }),
            "the capacity held, counted as agents change, against a count of the table"
        );
        if let Some(max) = limits.max_agents
            && count + more > max
        {
            return Err(Error::TooManyAgents { max, count });
        }
        if used + load > limits.capacity + 1e-9 {
            return Err(Error::OverCapacity {
                requested: load,
                used,
                capacity: limits.capacity,
            });
        }
        Ok(())
    }

    /// The agents whose parent is `parent`, in id order.
    pub fn children_of(&self, parent: &str) -> impl Iterator<Item = &String> {
        self.children.get(parent).into_iter().flatten()
    }

    /// Each agent's children, by the parent links.
    pub fn children(&self) -> HashMap<String, Vec<String>> {
        self.children
            .iter()
            .map(|(parent, children)| (parent.clone(), children.iter().cloned().collect()))
            .collect()
    }

    /// The agent and all its descendants.
    pub fn subtree(&self, root: &str) -> BTreeSet<String> {
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
}
