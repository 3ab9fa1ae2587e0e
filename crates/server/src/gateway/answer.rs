//! A request's way back: its place among the agent's requests in flight, its reservation
//! (settled once, on what the answer said or, failing that, on what it could have cost), and
//! the answer passed to the client as it arrives while its usage is read.

use std::sync::Arc;

use agentd_core::{Exhausted, Usage};
use bytes::Bytes;
use http_body_util::BodyExt;

use super::providers::Kind;
use super::{ANSWER_IDLE, Gateway, MAX_ANSWER_READ, PER_AGENT, usage};

/// One of an agent's [`PER_AGENT`] places in the gateway, given back when dropped.
pub(super) struct InFlight<'a> {
    gateway: &'a Gateway,
    agent_id: String,
}

impl<'a> InFlight<'a> {
    pub(super) fn take(gateway: &'a Gateway, agent_id: &str) -> Option<InFlight<'a>> {
        let mut counts = gateway
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(agent_id.to_string()).or_default();
        if *count >= PER_AGENT {
            return None;
        }
        *count += 1;
        Some(InFlight {
            gateway,
            agent_id: agent_id.to_string(),
        })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self
            .gateway
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.agent_id) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.agent_id);
            }
        }
    }
}

/// Why a request was refused at a budget.
pub(super) fn over_budget(agent_id: &str, exhausted: &Exhausted) -> String {
    let whose = if exhausted.owner == agent_id {
        "its budget".to_string()
    } else {
        format!("the budget of its ancestor `{}`", exhausted.owner)
    };
    format!(
        "agentd: agent `{agent_id}` is at {whose} ({} reached, on_limit {}): no more requests \
         until it is raised (SetBudget, `agentctl budget`)",
        exhausted.limit,
        exhausted.on_limit.name()
    )
}

/// A request's reservation against budgets, settled once.
pub(super) struct Settle {
    pub(super) gateway: Arc<Gateway>,
    pub(super) agent_id: String,
    pub(super) provider: String,
    /// The accounts the reservation is held on.
    pub(super) chain: Vec<String>,
    pub(super) worst: Option<Usage>,
    /// The request went to the provider: from here on it may bill.
    pub(super) sent: bool,
}

impl Settle {
    /// What the request used replaces its reservation, and the agent's spend grows by it.
    fn done(&mut self, model: &str, used: Usage) {
        let Some(worst) = self.worst.take() else {
            return;
        };
        let reached = self
            .gateway
            .spending
            .ledger
            .settle(&self.chain, &worst, &used);
        if let Some(provider) = self
            .gateway
            .providers
            .iter()
            .find(|p| p.name == self.provider)
        {
            provider
                .limits
                .refund(worst.tokens().saturating_sub(used.tokens()));
        }
        let outcome = match used.requests {
            0 => "unreachable",
            _ => "forwarded",
        };
        self.gateway
            .metrics
            .llm_request(&self.provider, outcome, &used);
        if used.requests > 0 {
            let model = format!("{}/{model}", self.provider);
            self.gateway
                .supervisor
                .spent(&self.agent_id, &model, used, reached);
        } else {
            for exhausted in reached {
                self.gateway.supervisor.budget_reached(exhausted);
            }
        }
    }
}

impl Drop for Settle {
    /// Never settled with what the answer said: nothing if the request never left, else its
    /// reservation (the client left while the provider was answering).
    fn drop(&mut self) {
        let used = match (self.sent, self.worst) {
            (true, Some(worst)) => worst,
            _ => Usage::default(),
        };
        self.done("", used);
    }
}

/// One answer on its way to the client, read for its usage.
pub(super) struct Reading {
    pub(super) gateway: Arc<Gateway>,
    pub(super) settle: Settle,
    pub(super) kind: Kind,
    pub(super) model: String,
    pub(super) events: Option<usage::EventStream>,
    pub(super) whole: Vec<u8>,
    pub(super) success: bool,
    /// The answer reached its end and the client took all of it.
    pub(super) whole_answer: bool,
}

impl Reading {
    pub(super) async fn run(
        mut self,
        mut body: hyper::body::Incoming,
        sender: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    ) {
        let mut client_gone = false;
        loop {
            let frame = match tokio::time::timeout(ANSWER_IDLE, body.frame()).await {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    self.whole_answer = true;
                    break;
                }
                Err(_) => {
                    let _ = sender
                        .send(Err(std::io::Error::other("the provider went silent")))
                        .await;
                    break;
                }
            };
            let data = match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
                Err(error) => {
                    let _ = sender.send(Err(std::io::Error::other(error))).await;
                    break;
                }
            };
            let out = match &mut self.events {
                Some(events) => Bytes::from(events.feed(&data)),
                None => {
                    if self.whole.len() + data.len() <= MAX_ANSWER_READ {
                        self.whole.extend_from_slice(&data);
                    }
                    data
                }
            };
            // A client that stops reading for a minute is gone (its reservation is charged).
            let sent = tokio::time::timeout(ANSWER_IDLE / 10, sender.send(Ok(out.clone())));
            if !out.is_empty() && !matches!(sent.await, Ok(Ok(()))) {
                client_gone = true;
                break;
            }
        }
        if let Some(events) = &mut self.events {
            let rest = events.finish();
            if !rest.is_empty() && !client_gone && sender.send(Ok(Bytes::from(rest))).await.is_err()
            {
                client_gone = true;
            }
        }
        self.whole_answer &= !client_gone;
        drop(sender);
        self.settle();
    }

    /// Adds the request to the agent's spend: its tokens where the answer said them.
    fn settle(mut self) {
        let read = match &self.events {
            Some(events) => events.usage.map(|usage| (events.model.clone(), usage)),
            None => usage::from_body(self.kind, &self.whole),
        };
        let (model, mut spent) = read.clone().unwrap_or_default();
        let model = if model.is_empty() { self.model } else { model };
        if self.success && (read.is_none() || !self.whole_answer) {
            // An answer whose usage never came, or not all of it (the client left mid-stream,
            // the provider went silent or does not say): charged at least its reservation, so
            // leaving early never spends past a budget.
            tracing::warn!(
                agent_id = %self.settle.agent_id,
                provider = %self.settle.provider,
                "the answer's usage is not known whole: charged its reservation"
            );
            let worst = self.settle.worst.unwrap_or_default();
            spent.input_tokens = spent.input_tokens.max(worst.input_tokens);
            spent.output_tokens = spent.output_tokens.max(worst.output_tokens);
        }
        spent.requests = 1;
        if let Some(provider) = self
            .gateway
            .providers
            .iter()
            .find(|p| p.name == self.settle.provider)
            && let Some(price) = provider.price(&model)
        {
            spent.cost_micros = price.cost_micros(&spent);
        }
        self.settle.done(&model, spent);
    }
}
