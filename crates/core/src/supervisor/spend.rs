//! What agents spend through the LLM gateway, added to their records, and their budgets:
//! reached (their tree paused, stopped, or left to the gateway's refusals) and changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::agent::AgentStatus;
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::rebuild;
use crate::spec::{AgentSpec, check_id};
use crate::spend::{Budget, Exhausted, OnLimit, Usage};
use crate::state::{AgentState, StopReason};

use super::SupervisorTask;

impl SupervisorTask {
    /// One request's usage, as the gateway read it: added to the agent's spend (in total
    /// and for the model) and to its own and its ancestors' tree spend, and stored.
    pub(super) fn spent(&mut self, agent_id: &str, model: &str, usage: &Usage) {
        let Some(machine) = self.table.get_mut(agent_id) else {
            tracing::debug!(%agent_id, "spend of an agent no longer kept");
            return;
        };
        machine.spend_mut().add(model, usage);
        let mut next = Some(agent_id.to_string());
        let mut seen = 0;
        while let Some(id) = next.take()
            && seen < 1000
        {
            seen += 1;
            let Some(machine) = self.table.get_mut(&id) else {
                break;
            };
            machine.tree_spend_mut().add(usage);
            self.figures_moved.insert(id.clone());
            if let Err(error) = self.store.put(machine.record()) {
                tracing::warn!(agent_id = %id, %error, "storing the agent's spend");
            }
            let parent = &machine.record().spec.parent_agent_id;
            next = (!parent.is_empty()).then(|| parent.clone());
        }
    }

    /// What an agent reports it spent calling a provider itself: counted as the gateway's,
    /// against its tree's budgets (no reservation: it is spent already), and marked reported.
    pub(super) fn report_usage(
        &mut self,
        agent_id: &str,
        model: &str,
        mut usage: Usage,
    ) -> Result<AgentStatus> {
        check_id("agent_id", agent_id)?;
        self.table.get(agent_id)?;
        usage.requests = usage.requests.max(1);
        self.count_reported(agent_id, model, usage)
    }

    /// Reported usage, checked and counted against the tree's budgets.
    fn count_reported(&mut self, agent_id: &str, model: &str, usage: Usage) -> Result<AgentStatus> {
        if model.is_empty() || model.len() > 256 || model.chars().any(char::is_control) {
            return Err(Error::Invalid {
                field: "model",
                problem: "name the model, PROVIDER/MODEL (at most 256 characters)".into(),
            });
        }
        // A report is one call's or a few: no count a provider could have billed past these.
        const MOST: u64 = 1 << 40;
        if [
            usage.input_tokens,
            usage.output_tokens,
            usage.requests,
            usage.cost_micros,
        ]
        .iter()
        .any(|&value| value > MOST)
        {
            return Err(Error::Invalid {
                field: "usage",
                problem: format!("each count at most {MOST}"),
            });
        }
        if usage.cached_input_tokens > usage.input_tokens {
            return Err(Error::Invalid {
                field: "usage.cached_input_tokens",
                problem: format!(
                    "{} cached of {} input tokens: cached tokens are counted in the input",
                    usage.cached_input_tokens, usage.input_tokens
                ),
            });
        }
        let ledger = &self.table.spending().ledger;
        let reached = ledger.settle(&ledger.chain_of(agent_id), &Usage::default(), &usage);
        if let Some(machine) = self.table.get_mut(agent_id) {
            machine.spend_mut().reported.add(&usage);
        }
        self.spent(agent_id, model, &usage);
        for exhausted in reached {
            self.budget_reached(exhausted);
        }
        Ok(self.table.get(agent_id)?.status(self.clock.mono()))
    }

    /// Usage an agent's status file reports as running totals per model for its run: what
    /// each grew by since the last read is counted as ReportUsage counts it (a total that
    /// went down started again from zero).
    pub(super) fn status_file_usage(&mut self, agent_id: &str, totals: BTreeMap<String, Usage>) {
        let Some(machine) = self.table.get_mut(agent_id) else {
            return;
        };
        let run = machine.record().restart_count;
        let (seen_run, seen) = machine.status_usage_mut();
        if *seen_run != run {
            *seen_run = run;
            seen.clear();
        }
        let mut grown = Vec::new();
        for (model, total) in &totals {
            let before = seen.get(model).copied().unwrap_or_default();
            let fields = |u: &Usage| {
                [
                    u.input_tokens,
                    u.output_tokens,
                    u.cached_input_tokens,
                    u.requests,
                    u.cost_micros,
                ]
            };
            let went_down = fields(total)
                .iter()
                .zip(fields(&before))
                .any(|(now, was)| *now < was);
            let mut delta = *total;
            if !went_down {
                delta = Usage {
                    input_tokens: total.input_tokens - before.input_tokens,
                    output_tokens: total.output_tokens - before.output_tokens,
                    cached_input_tokens: total.cached_input_tokens - before.cached_input_tokens,
                    requests: total.requests - before.requests,
                    cost_micros: total.cost_micros - before.cost_micros,
                };
            }
            if delta != Usage::default() {
                grown.push((model.clone(), delta));
            }
            seen.insert(model.clone(), *total);
        }
        for (model, delta) in grown {
            if let Err(error) = self.count_reported(agent_id, &model, delta) {
                tracing::warn!(%agent_id, %model, "ignoring usage in the status file: {error}");
            }
        }
    }

    /// A budget was reached: told once (BUDGET_EXHAUSTED), and acted on as it says.
    pub(super) fn budget_reached(&mut self, exhausted: Exhausted) {
        let Exhausted {
            owner,
            limit,
            on_limit,
        } = exhausted;
        let Some(machine) = self.table.get_mut(&owner) else {
            return;
        };
        if machine.record().budget_reached.is_some() {
            return;
        }
        *machine.budget_reached_mut() = Some(limit.to_string());
        if let Err(error) = self.store.put(machine.record()) {
            tracing::warn!(agent_id = %owner, %error, "storing the reached budget");
        }
        let tree: Vec<String> = self.table.subtree(&owner).into_iter().collect();
        let action = match on_limit {
            OnLimit::Pause => "its tree is paused until the budget is raised",
            OnLimit::Stop => "its tree is stopped",
            OnLimit::Reject => "its tree's requests are refused until the budget is raised",
        };
        let message = format!("budget reached ({limit}): {action}");
        tracing::info!(agent_id = %owner, "{message}");
        self.recorder.event(EventKind::BudgetExhausted);
        let now = self.clock.mono();
        if let Ok(machine) = self.table.get(&owner) {
            self.events
                .emit(EventKind::BudgetExhausted, message, None, || {
                    machine.status(now)
                });
        }
        match on_limit {
            OnLimit::Pause => {
                for id in tree {
                    self.input(&id, |m, now, out| {
                        let _ = m.pause(now, out);
                    });
                }
            }
            OnLimit::Stop => {
                for id in tree {
                    drop(self.begin_stop(&id, false, StopReason::Budget));
                }
            }
            OnLimit::Reject => {}
        }
    }

    /// Replaces an agent's budget, within what its parent's has left. A budget that has
    /// room again is no longer reached, and a tree it paused is resumed.
    pub(super) fn set_budget(
        &mut self,
        agent_id: &str,
        budget: Option<Budget>,
    ) -> Result<AgentStatus> {
        check_id("agent_id", agent_id)?;
        let budget = budget.filter(|budget| !budget.is_unlimited());
        let spec = self.table.get(agent_id)?.record().spec.clone();
        self.within_parent(&spec.parent_agent_id, budget.as_ref())?;
        let spec = Arc::new(AgentSpec {
            budget,
            ..AgentSpec::clone(&spec)
        });
        rebuild::write_spec(&self.specs_dir, &spec)?;
        self.input(agent_id, |m, _, out| m.set_spec(spec, out));
        let spending = self.table.spending().clone();
        spending.ledger.set_budget(agent_id, budget);
        let was = self.table.get(agent_id)?.record().budget_reached.clone();
        let mut message = match budget {
            Some(budget) => format!("budget: {}", describe(&budget)),
            None => "budget removed".to_string(),
        };
        if was.is_some() && spending.ledger.reached(agent_id).is_none() {
            if let Some(machine) = self.table.get_mut(agent_id) {
                *machine.budget_reached_mut() = None;
                if let Err(error) = self.store.put(machine.record()) {
                    tracing::warn!(%agent_id, %error, "storing the budget");
                }
            }
            let paused: Vec<String> = self
                .table
                .subtree(agent_id)
                .into_iter()
                .filter(|id| {
                    self.table
                        .get(id)
                        .is_ok_and(|m| m.record().state == AgentState::Paused)
                })
                .collect();
            for id in &paused {
                self.input(id, |m, now, out| {
                    let _ = m.resume(now, out);
                });
            }
            if !paused.is_empty() {
                message += &format!("; resumed {}", paused.join(", "));
            }
        }
        tracing::info!(%agent_id, "{message}");
        self.recorder.event(EventKind::BudgetUpdated);
        let now = self.clock.mono();
        let machine = self.table.get(agent_id)?;
        self.events
            .emit(EventKind::BudgetUpdated, message, None, || {
                machine.status(now)
            });
        Ok(machine.status(now))
    }

    /// A budget for a child of `parent` asks for no more than the parent's (and its
    /// ancestors') budgets have left.
    pub(super) fn within_parent(&self, parent: &str, budget: Option<&Budget>) -> Result<()> {
        let (Some(budget), false) = (budget, parent.is_empty()) else {
            return Ok(());
        };
        let Some(left) = self.table.spending().ledger.left(parent) else {
            return Ok(());
        };
        match budget.over(&left) {
            Some((limit, asked, left)) => Err(Error::Unsupported {
                field: "budget",
                problem: format!(
                    "budget.{limit} {asked} is more than parent `{parent}` has left ({left})"
                ),
            }),
            None => Ok(()),
        }
    }
}

/// `tokens 1000, cost_micros 50000, on_limit pause`.
fn describe(budget: &Budget) -> String {
    let mut parts: Vec<String> = [
        ("tokens", budget.tokens),
        ("cost_micros", budget.cost_micros),
        ("requests", budget.requests),
    ]
    .into_iter()
    .filter_map(|(name, limit)| Some(format!("{name} {}", limit?)))
    .collect();
    parts.push(format!("on_limit {}", budget.on_limit.name()));
    parts.join(", ")
}
