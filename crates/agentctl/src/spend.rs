//! `budget` (SetBudget) and `spend`: what agents spent through agentd's LLM gateway, and
//! the limits on their trees. A budget's dollars are sent as micro-dollars.

use agentd_proto::v1 as pb;

use crate::client::Client;
use crate::names::enum_arg;
use crate::output::{Output, print_table};

/// The limits `spawn` and `budget` take; none given: no budget.
#[derive(clap::Args, Clone, Default)]
pub struct BudgetArgs {
    /// Most input plus output tokens for the agent and its descendants together
    #[arg(long = "budget-tokens")]
    pub tokens: Option<u64>,
    /// Most US dollars for the agent and its descendants together (e.g. 0.50)
    #[arg(long = "budget-usd")]
    pub usd: Option<f64>,
    /// Most requests for the agent and its descendants together
    #[arg(long = "budget-requests")]
    pub requests: Option<u64>,
    /// At the budget: pause (its tree frozen until raised), stop (the ladder), or reject
    /// (the gateway answers 429) [default: pause]
    #[arg(long = "on-budget", value_parser = enum_arg("ON_LIMIT_", pb::OnLimit::as_str_name))]
    pub on_limit: Option<i32>,
}

impl BudgetArgs {
    /// The budget asked for; `None` when no limit is given.
    pub fn budget(&self) -> anyhow::Result<Option<pb::Budget>> {
        if self.tokens.is_none() && self.usd.is_none() && self.requests.is_none() {
            if self.on_limit.is_some() {
                anyhow::bail!(
                    "--on-budget needs a limit: --budget-tokens, --budget-usd or --budget-requests"
                );
            }
            return Ok(None);
        }
        let cost_micros = match self.usd {
            Some(usd) if !usd.is_finite() || usd <= 0.0 => {
                anyhow::bail!("--budget-usd must be more than 0, not {usd}")
            }
            Some(usd) => (usd * 1e6).round() as u64,
            None => 0,
        };
        Ok(Some(pb::Budget {
            tokens: self.tokens.unwrap_or(0),
            cost_micros,
            requests: self.requests.unwrap_or(0),
            on_limit: self.on_limit.unwrap_or(pb::OnLimit::Pause as i32),
        }))
    }
}

pub async fn set_budget(
    client: &mut Client,
    agent_id: String,
    args: BudgetArgs,
    out: Output,
) -> anyhow::Result<()> {
    let request = pb::SetBudgetRequest {
        agent_id,
        budget: args.budget()?,
    };
    let response = client.set_budget(request).await?.into_inner();
    out.answer(&response, |response| {
        if let Some(status) = &response.status {
            print_spend(std::slice::from_ref(status));
        }
    });
    Ok(())
}

/// Every agent (or one tree) with what it spent and its budget, and the total.
pub async fn spend(client: &mut Client, tree: Option<String>, out: Output) -> anyhow::Result<()> {
    let request = pb::ListAgentsRequest {
        subtree_of: tree.unwrap_or_default(),
        ..Default::default()
    };
    let all = crate::list::all_pages(client, request).await?;
    out.answer(&all, |all| print_spend(&all.agents));
    Ok(())
}

fn dollars(micros: u64) -> String {
    format!("${:.4}", micros as f64 / 1e6)
}

fn print_spend(agents: &[pb::AgentStatus]) {
    let mut total = pb::Usage::default();
    let mut rows: Vec<Vec<String>> = agents
        .iter()
        .map(|agent| {
            let own = agent
                .spend
                .as_ref()
                .and_then(|spend| spend.total)
                .unwrap_or_default();
            total.requests += own.requests;
            total.input_tokens += own.input_tokens;
            total.output_tokens += own.output_tokens;
            total.cached_input_tokens += own.cached_input_tokens;
            total.cost_micros += own.cost_micros;
            let tree = agent.tree_spend.unwrap_or_default();
            let budget = agent.budget.map_or("-".to_string(), |budget| {
                let mut limits = Vec::new();
                if budget.tokens > 0 {
                    limits.push(format!("{} tokens", budget.tokens));
                }
                if budget.cost_micros > 0 {
                    limits.push(dollars(budget.cost_micros));
                }
                if budget.requests > 0 {
                    limits.push(format!("{} requests", budget.requests));
                }
                let on = pb::OnLimit::try_from(budget.on_limit)
                    .map(|on| {
                        on.as_str_name()
                            .trim_start_matches("ON_LIMIT_")
                            .to_lowercase()
                    })
                    .unwrap_or_default();
                format!("{} ({on})", limits.join(", "))
            });
            vec![
                agent.agent_id.clone(),
                own.requests.to_string(),
                own.input_tokens.to_string(),
                own.cached_input_tokens.to_string(),
                own.output_tokens.to_string(),
                dollars(own.cost_micros),
                format!(
                    "{} tokens, {}",
                    tree.input_tokens + tree.output_tokens,
                    dollars(tree.cost_micros)
                ),
                budget,
                if agent.budget_reached.is_empty() {
                    "-".into()
                } else {
                    agent.budget_reached.clone()
                },
            ]
        })
        .collect();
    rows.push(vec![
        "total".into(),
        total.requests.to_string(),
        total.input_tokens.to_string(),
        total.cached_input_tokens.to_string(),
        total.output_tokens.to_string(),
        dollars(total.cost_micros),
        String::new(),
        String::new(),
        String::new(),
    ]);
    print_table(
        &[
            "AGENT", "REQUESTS", "INPUT", "CACHED", "OUTPUT", "COST", "TREE", "BUDGET", "REACHED",
        ],
        &rows,
    );
}
