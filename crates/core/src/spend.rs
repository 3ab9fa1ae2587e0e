//! What agents spend through LLM providers: tokens, requests and cost, per agent and per
//! model. The gateway (in `crates/server`) reads usage from each provider's answers and
//! hands it to the supervisor, which adds it to the agent's record.
//!
//! Each agent that may use the gateway has a key of its own ([`GatewayKeys`]): it names the
//! agent to the gateway and is worth nothing anywhere else.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Mutex, PoisonError, RwLock};

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
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_add(other.cached_input_tokens);
        self.requests = self.requests.saturating_add(other.requests);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros);
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    fn sub(&mut self, other: &Usage) {
        self.input_tokens = self.input_tokens.saturating_sub(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_sub(other.output_tokens);
        self.cached_input_tokens = self
            .cached_input_tokens
            .saturating_sub(other.cached_input_tokens);
        self.requests = self.requests.saturating_sub(other.requests);
        self.cost_micros = self.cost_micros.saturating_sub(other.cost_micros);
    }
}

/// What happens when a budget is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// The agent and its tree are frozen until the budget is raised.
    #[default]
    Pause,
    /// The agent and its tree are stopped (the ladder), end reason BUDGET.
    Stop,
    /// The gateway refuses its requests (429); it runs on.
    Reject,
}

impl OnLimit {
    pub fn name(self) -> &'static str {
        match self {
            OnLimit::Pause => "pause",
            OnLimit::Stop => "stop",
            OnLimit::Reject => "reject",
        }
    }
}

/// Limits on what an agent and all its descendants spend together; `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Budget {
    /// Input plus output tokens.
    pub tokens: Option<u64>,
    pub cost_micros: Option<u64>,
    pub requests: Option<u64>,
    pub on_limit: OnLimit,
}

impl Budget {
    /// No limit at all (0 in the API is none).
    pub fn is_unlimited(&self) -> bool {
        self.tokens.is_none() && self.cost_micros.is_none() && self.requests.is_none()
    }

    fn limits(&self, used: &Usage) -> [(&'static str, Option<u64>, u64); 3] {
        [
            ("tokens", self.tokens, used.tokens()),
            ("cost", self.cost_micros, used.cost_micros),
            ("requests", self.requests, used.requests),
        ]
    }

    /// The first limit `used` has reached.
    pub fn reached(&self, used: &Usage) -> Option<&'static str> {
        self.limits(used)
            .into_iter()
            .find(|(_, limit, used)| limit.is_some_and(|limit| *used >= limit))
            .map(|(name, ..)| name)
    }

    /// The first limit `used` is over.
    fn exceeded(&self, used: &Usage) -> Option<&'static str> {
        self.limits(used)
            .into_iter()
            .find(|(_, limit, used)| limit.is_some_and(|limit| *used > limit))
            .map(|(name, ..)| name)
    }

    /// What is left after `used` (limits only where this budget has them).
    fn left(&self, used: &Usage) -> Budget {
        Budget {
            tokens: self.tokens.map(|limit| limit.saturating_sub(used.tokens())),
            cost_micros: self
                .cost_micros
                .map(|limit| limit.saturating_sub(used.cost_micros)),
            requests: self
                .requests
                .map(|limit| limit.saturating_sub(used.requests)),
            on_limit: self.on_limit,
        }
    }

    /// The smaller of each limit.
    fn tighter(self, other: Budget) -> Budget {
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Budget {
            tokens: min(self.tokens, other.tokens),
            cost_micros: min(self.cost_micros, other.cost_micros),
            requests: min(self.requests, other.requests),
            on_limit: self.on_limit,
        }
    }

    /// The first limit of this budget above `left` (a parent's remainder), with both.
    pub fn over(&self, left: &Budget) -> Option<(&'static str, u64, u64)> {
        [
            ("tokens", self.tokens, left.tokens),
            ("cost_micros", self.cost_micros, left.cost_micros),
            ("requests", self.requests, left.requests),
        ]
        .into_iter()
        .find_map(|(name, asked, left)| match (asked, left) {
            (Some(asked), Some(left)) if asked > left => Some((name, asked, left)),
            _ => None,
        })
    }
}

/// A budget reached: whose, which limit, and what it says to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub owner: String,
    pub limit: &'static str,
    pub on_limit: OnLimit,
}

/// Spend against budgets, per agent tree, shared by the gateway (which reserves a request's
/// worst case before forwarding it and settles on what it used) and the supervisor (which
/// opens and closes accounts and changes budgets). Each account holds what its agent and
/// all its descendants spent and have in flight, so a check walks up the tree only.
#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<Accounts>,
    /// Told whenever a reservation is settled: a request that waits for room tries again.
    pub settled: tokio::sync::Notify,
}

/// What [`Ledger::reserve`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Reserve {
    /// Held on these accounts (the agent and its ancestors): forward the request, and settle
    /// on the same ones.
    Held(Vec<String>),
    /// With the requests in flight it could pass a limit: try again once one settles.
    Wait,
    /// A budget on its chain is reached.
    Refused(Exhausted),
}

/// The accounts by agent id, and how many open accounts name each parent (counted, so
/// that closing one of 10,000 does not walk the others).
#[derive(Debug, Default)]
struct Accounts {
    by_id: HashMap<String, Account>,
    children: HashMap<String, usize>,
}

impl std::ops::Deref for Accounts {
    type Target = HashMap<String, Account>;
    fn deref(&self) -> &Self::Target {
        &self.by_id
    }
}

impl std::ops::DerefMut for Accounts {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.by_id
    }
}

impl Accounts {
    fn insert(&mut self, agent_id: String, account: Account) {
        if let Some(parent) = &account.parent {
            *self.children.entry(parent.clone()).or_default() += 1;
        }
        if let Some(earlier) = self.by_id.insert(agent_id, account) {
            self.forget_child_of(earlier.parent.as_deref());
        }
    }

    fn remove(&mut self, agent_id: &str) -> Option<Account> {
        let account = self.by_id.remove(agent_id)?;
        self.forget_child_of(account.parent.as_deref());
        Some(account)
    }

    fn forget_child_of(&mut self, parent: Option<&str>) {
        if let Some(parent) = parent
            && let Some(count) = self.children.get_mut(parent)
        {
            *count -= 1;
            if *count == 0 {
                self.children.remove(parent);
            }
        }
    }

    fn has_children(&self, agent_id: &str) -> bool {
        self.children.contains_key(agent_id)
    }
}

#[derive(Debug, Default)]
struct Account {
    parent: Option<String>,
    budget: Option<Budget>,
    /// Spent by the agent and its descendants.
    spent: Usage,
    /// Reserved by requests in flight, of the agent and its descendants.
    reserved: Usage,
    /// Its agent was removed; kept while descendants are open.
    closed: bool,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, Accounts> {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The agent and its ancestors, nearest first.
    fn chain(accounts: &HashMap<String, Account>, agent_id: &str) -> Vec<String> {
        let mut chain = Vec::new();
        let mut next = Some(agent_id.to_string());
        while let Some(id) = next {
            let Some(account) = accounts.get(&id) else {
                break;
            };
            if chain.contains(&id) {
                break;
            }
            next = account.parent.clone();
            chain.push(id);
        }
        chain
    }

    /// `spent`: what the agent and its descendants spent before (from its record).
    pub(crate) fn open(
        &self,
        agent_id: &str,
        parent: Option<&str>,
        budget: Option<Budget>,
        spent: Usage,
    ) {
        self.lock().insert(
            agent_id.to_string(),
            Account {
                parent: parent.map(str::to_string),
                budget,
                spent,
                reserved: Usage::default(),
                closed: false,
            },
        );
    }

    /// A removed agent: its spend stays counted in its ancestors'. An account with
    /// descendants still open stays (its budget still covers them) until they close.
    pub(crate) fn close(&self, agent_id: &str) {
        let mut accounts = self.lock();
        let mut next = Some(agent_id.to_string());
        while let Some(id) = next.take() {
            if accounts.has_children(&id) {
                break;
            }
            match accounts.remove(&id) {
                // A parent kept only for its children goes with its last one.
                Some(account) => {
                    next = account
                        .parent
                        .filter(|parent| accounts.get(parent).is_some_and(|p| p.closed));
                }
                None => break,
            }
        }
        if let Some(account) = accounts.get_mut(agent_id) {
            account.closed = true;
        }
        drop(accounts);
        self.settled.notify_waiters();
    }

    pub(crate) fn set_budget(&self, agent_id: &str, budget: Option<Budget>) {
        if let Some(account) = self.lock().get_mut(agent_id) {
            account.budget = budget;
        }
        self.settled.notify_waiters();
    }

    /// Whether a budget on the agent's chain limits cost.
    pub fn cost_limited(&self, agent_id: &str) -> bool {
        let accounts = self.lock();
        Self::chain(&accounts, agent_id).iter().any(|id| {
            accounts[id]
                .budget
                .is_some_and(|budget| budget.cost_micros.is_some())
        })
    }

    /// The agent and its ancestors (for spend reported without a reservation).
    pub(crate) fn chain_of(&self, agent_id: &str) -> Vec<String> {
        Self::chain(&self.lock(), agent_id)
    }

    /// The tightest of what the agent's and its ancestors' budgets have left: the most a
    /// new child's budget may ask for. `None`: no budget above.
    pub(crate) fn left(&self, agent_id: &str) -> Option<Budget> {
        let accounts = self.lock();
        Self::chain(&accounts, agent_id)
            .iter()
            .filter_map(|id| {
                let account = &accounts[id];
                let mut used = account.spent;
                used.add(&account.reserved);
                Some(account.budget?.left(&used))
            })
            .reduce(Budget::tighter)
    }

    /// Holds `worst` for a request of `agent_id` against every budget on its chain. A budget
    /// already reached refuses it. One that the request could pass, with what is in flight,
    /// makes it wait for those to settle; alone in flight it goes, so a tree passes its
    /// budget by at most one request's reservation.
    pub fn reserve(&self, agent_id: &str, worst: &Usage) -> Reserve {
        let mut accounts = self.lock();
        let chain = Self::chain(&accounts, agent_id);
        let mut wait = false;
        for id in &chain {
            let account = &accounts[id];
            let Some(budget) = &account.budget else {
                continue;
            };
            if let Some(limit) = budget.reached(&account.spent) {
                return Reserve::Refused(Exhausted {
                    owner: id.clone(),
                    limit,
                    on_limit: budget.on_limit,
                });
            }
            let mut after = account.spent;
            after.add(&account.reserved);
            after.add(worst);
            wait |= budget.exceeded(&after).is_some() && account.reserved.requests > 0;
        }
        if wait {
            return Reserve::Wait;
        }
        for id in &chain {
            if let Some(account) = accounts.get_mut(id) {
                account.reserved.add(worst);
            }
        }
        Reserve::Held(chain)
    }

    /// Replaces a reservation with what the request used; answers the budgets on the chain
    /// that are now reached.
    pub fn settle(&self, chain: &[String], reserved: &Usage, used: &Usage) -> Vec<Exhausted> {
        let mut accounts = self.lock();
        let mut reached = Vec::new();
        for id in chain.iter().cloned() {
            let Some(account) = accounts.get_mut(&id) else {
                continue;
            };
            account.reserved.sub(reserved);
            account.spent.add(used);
            if let Some(budget) = &account.budget
                && let Some(limit) = budget.reached(&account.spent)
            {
                reached.push(Exhausted {
                    owner: id,
                    limit,
                    on_limit: budget.on_limit,
                });
            }
        }
        drop(accounts);
        self.settled.notify_waiters();
        reached
    }

    /// Whether the agent's own budget (if any) is reached.
    pub(crate) fn reached(&self, agent_id: &str) -> Option<&'static str> {
        let accounts = self.lock();
        let account = accounts.get(agent_id)?;
        account.budget?.reached(&account.spent)
    }
}

/// An agent's spend in all its runs: the total and each model's share.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Spend {
    pub total: Usage,
    pub models: BTreeMap<String, Usage>,
    /// Of the total, what the agent reported itself (ReportUsage).
    pub reported: Usage,
}

impl Spend {
    pub fn add(&mut self, model: &str, usage: &Usage) {
        self.total.add(usage);
        self.models.entry(model.to_string()).or_default().add(usage);
    }
}

/// What the supervisor shares with the LLM gateway.
#[derive(Debug, Default)]
pub struct Spending {
    pub keys: GatewayKeys,
    pub ledger: Ledger,
    /// Gateway listeners bound inside `PROXY` agents' namespaces, for the gateway to serve.
    pub namespaces: Namespaces,
}

/// A gateway listener inside one agent's network namespace: whoever connects there is that
/// agent. Served until `stop` is cancelled (its run is over).
#[derive(Debug)]
pub struct InNamespace {
    pub agent_id: String,
    pub listener: std::net::TcpListener,
    pub stop: tokio_util::sync::CancellationToken,
}

/// The supervisor sends, the gateway takes the receiving end once.
#[derive(Debug)]
pub struct Namespaces {
    sender: tokio::sync::mpsc::UnboundedSender<InNamespace>,
    receiver: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<InNamespace>>>,
}

impl Default for Namespaces {
    fn default() -> Namespaces {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        Namespaces {
            sender,
            receiver: Mutex::new(Some(receiver)),
        }
    }
}

impl Namespaces {
    pub(crate) fn send(&self, listener: InNamespace) {
        // Nobody takes them without a gateway (and then no listener is made).
        let _ = self.sender.send(listener);
    }

    /// The listeners to serve, for the gateway (once).
    pub fn take(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<InNamespace>> {
        self.receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
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
    /// Its port: a `PROXY` agent's namespace has the gateway on the same one.
    pub port: u16,
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

    fn usage(tokens: u64) -> Usage {
        Usage {
            input_tokens: tokens,
            requests: 1,
            ..Usage::default()
        }
    }

    #[test]
    fn a_tree_budget_holds_requests_in_flight_and_refuses_once_reached() {
        let ledger = Ledger::default();
        let budget = Budget {
            tokens: Some(100),
            ..Budget::default()
        };
        ledger.open("boss", None, Some(budget), Usage::default());
        ledger.open("w1", Some("boss"), None, Usage::default());
        ledger.open("w2", Some("boss"), None, Usage::default());
        assert!(matches!(ledger.reserve("w1", &usage(60)), Reserve::Held(_)));
        // 60 in flight and 60 more could pass 100: wait for the first.
        assert_eq!(ledger.reserve("w2", &usage(60)), Reserve::Wait);
        let w1 = ledger.chain_of("w1");
        let w2 = ledger.chain_of("w2");
        assert_eq!(w1, ["w1", "boss"]);
        assert!(ledger.settle(&w1, &usage(60), &usage(30)).is_empty());
        assert!(matches!(ledger.reserve("w2", &usage(60)), Reserve::Held(_)));
        // Alone in flight a request goes even where it could pass the limit.
        assert_eq!(ledger.reserve("w1", &usage(80)), Reserve::Wait);
        let reached = ledger.settle(&w2, &usage(60), &usage(75));
        assert_eq!(reached.len(), 1);
        assert_eq!(
            (reached[0].owner.as_str(), reached[0].limit),
            ("boss", "tokens")
        );
        assert!(matches!(
            ledger.reserve("w1", &usage(1)),
            Reserve::Refused(_)
        ));
        // A child budget may ask for no more than is left; raising the parent's makes room.
        assert_eq!(ledger.left("w1").and_then(|left| left.tokens), Some(0));
        ledger.set_budget(
            "boss",
            Some(Budget {
                tokens: Some(1000),
                ..budget
            }),
        );
        assert_eq!(ledger.left("w2").and_then(|left| left.tokens), Some(895));
        assert!(matches!(ledger.reserve("w2", &usage(10)), Reserve::Held(_)));
        assert_eq!(ledger.reached("boss"), None);
        // A removed parent's budget still covers the children it leaves.
        ledger.close("boss");
        assert_eq!(ledger.chain_of("w1"), ["w1", "boss"]);
        ledger.close("w1");
        ledger.close("w2");
        assert!(ledger.chain_of("w2").is_empty() && ledger.chain_of("boss").is_empty());
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
