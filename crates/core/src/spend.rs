//! What agents spend through LLM providers: tokens, requests and cost, per agent and per
//! model. The gateway (in `crates/server`) reads usage from each provider's answers and
//! hands it to the supervisor, which adds it to the agent's record.
//!
//! Each agent that may use the gateway has a key of its own ([`GatewayKeys`]): it names the
//! agent to the gateway and is worth nothing anywhere else.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};

/// Tokens, requests and cost, added up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Of the input tokens, those read from the provider's prompt cache.
    pub cached_input_tokens: u64,
    pub requests: u64,
    /// In micro-dollars (USD 1e-6), from the provider's price table.
    pub cost_micros: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.requests += other.requests;
        self.cost_micros += other.cost_micros;
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

/// An agent's spend in all its runs: the total and each model's share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spend {
    pub total: Usage,
    pub models: BTreeMap<String, Usage>,
}

impl Spend {
    pub fn add(&mut self, model: &str, usage: &Usage) {
        self.total.add(usage);
        self.models.entry(model.to_string()).or_default().add(usage);
    }
}

/// Gateway keys and the agents they name, shared by the supervisor (which makes and drops
/// them) and the gateway (which looks them up).
#[derive(Debug, Default)]
pub struct GatewayKeys {
    agents: RwLock<HashMap<String, String>>,
}

impl GatewayKeys {
    /// The agent a key names.
    pub fn agent(&self, key: &str) -> Option<String> {
        self.agents
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    pub(crate) fn insert(&self, key: &str, agent_id: &str) {
        self.agents
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_string(), agent_id.to_string());
    }

    pub(crate) fn remove(&self, key: &str) {
        self.agents
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

/// A new gateway key: `agentd-` and 32 random bytes in hex, from the kernel's generator.
pub(crate) fn new_key() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().fold(String::from("agentd-"), |mut key, byte| {
        key.push_str(&format!("{byte:02x}"));
        key
    }))
}

/// Where agents reach the gateway, and which providers their SDKs' variables name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayEnv {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The first `openai` provider's name: `OPENAI_BASE_URL` is `URL/NAME`.
    pub openai: Option<String>,
    /// The first `anthropic` provider's name: `ANTHROPIC_BASE_URL` is `URL/NAME`.
    pub anthropic: Option<String>,
}

impl GatewayEnv {
    /// The variables an agent with `key` gets.
    pub(crate) fn vars(&self, key: &str) -> Vec<(String, String)> {
        let mut vars = Vec::new();
        if let Some(name) = &self.openai {
            vars.push(("OPENAI_BASE_URL".into(), format!("{}/{name}", self.url)));
            vars.push(("OPENAI_API_KEY".into(), key.to_string()));
        }
        if let Some(name) = &self.anthropic {
            vars.push(("ANTHROPIC_BASE_URL".into(), format!("{}/{name}", self.url)));
            vars.push(("ANTHROPIC_API_KEY".into(), key.to_string()));
        }
        vars.push(("AGENTD_LLM_GATEWAY".into(), self.url.clone()));
        vars
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_distinct() {
        let (a, b) = (new_key().unwrap(), new_key().unwrap());
        assert_eq!(a.len(), "agentd-".len() + 64);
        assert_ne!(a, b);
    }

    #[test]
    fn spend_adds_per_model_and_in_total() {
        let mut spend = Spend::default();
        let usage = Usage {
            input_tokens: 10,
            output_tokens: 5,
            cached_input_tokens: 2,
            requests: 1,
            cost_micros: 7,
        };
        spend.add("m1", &usage);
        spend.add("m2", &usage);
        spend.add("m1", &usage);
        assert_eq!(spend.total.tokens(), 45);
        assert_eq!(spend.models["m1"].requests, 2);
        assert_eq!(spend.models["m2"].cost_micros, 7);
    }
}
