//! Prometheus metrics (`GET /metrics`): counters and histograms fed as things happen (the
//! supervisor through [`Recorder`], the RPCs, the watchers), gauges read from the summary
//! at each scrape. Names and labels are part of the API (README, "Metrics"). Label values are
//! the proto enum names without their prefix, in lower case: `state="running"`.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use agentd_core::{
    AgentState, EndReason, EventKind, ListFilter, Recorder, StopOutcome, Summary, SupervisorHandle,
};
use agentd_proto::v1 as pb;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::{Code, Status};

use crate::convert::{Mirror, code_name, error_status};

type Labels<const N: usize> = [(&'static str, String); N];
/// Labels whose values are known at compile time: looking one up allocates nothing.
type StaticLabels<const N: usize> = [(&'static str, &'static str); N];
type FloatGauge = Gauge<f64, AtomicU64>;

/// Which per-agent series `/metrics` carries.
#[derive(Debug, Clone, Default)]
pub struct PerAgent {
    /// `agentd_agent_cpu_percent`, `agentd_agent_memory_bytes` and `agentd_agent_restarts`
    /// for every live agent.
    pub enabled: bool,
    /// Agent labels copied onto those series (as `label_NAME`).
    pub labels: Vec<String>,
}

pub struct Metrics {
    registry: Registry,
    /// By proto enum value, so counting one costs an index and an atomic add.
    events: Vec<Option<Counter>>,
    run_ends: Vec<Option<Counter>>,
    stops: Vec<Option<Histogram>>,
    restarts: Counter,
    samples: Histogram,
    spawns: Family<StaticLabels<1>, Counter>,
    rpcs: Family<StaticLabels<2>, Histogram>,
    watchers: Gauge,
    watchers_ended: Family<StaticLabels<1>, Counter>,
    agents: Family<Labels<1>, Gauge>,
    /// The series of `agents`, one per state, made once.
    agents_by_state: Vec<(AgentState, Gauge)>,
    unhealthy: Family<StaticLabels<1>, Gauge>,
    declared_load: FloatGauge,
    capacity: FloatGauge,
    store_bytes: Gauge,
    per_agent: PerAgent,
    agent_cpu: Family<Vec<(String, String)>, FloatGauge>,
    agent_memory: Family<Vec<(String, String)>, Gauge>,
    agent_restarts: Family<Vec<(String, String)>, Gauge>,
    /// A sandboxed agent's refusals so far, by `kind`: connection (its proxy), file
    /// (Landlock), syscall (seccomp).
    agent_denials: Family<Vec<(String, String)>, Gauge>,
    /// What an agent spent through the gateway so far: tokens by `kind` (input, output,
    /// cached_input), requests, and cost in micro-dollars.
    agent_llm_tokens: Family<Vec<(String, String)>, Gauge>,
    agent_llm_requests: Family<Vec<(String, String)>, Gauge>,
    agent_llm_cost: Family<Vec<(String, String)>, Gauge>,
    /// The gateway's requests by provider and outcome (forwarded, refused_budget,
    /// refused_key, unreachable), and what the forwarded ones used, by provider.
    llm_requests: Family<Labels<2>, Counter>,
    llm_tokens: Family<Labels<2>, Counter>,
    llm_cost: Family<Labels<1>, Counter>,
    /// One scrape at a time: a scrape clears and refills the gauges.
    scrape: tokio::sync::Mutex<()>,
}

/// Why a watcher (gRPC WatchAgents or an SSE client) ended.
#[derive(Debug, Clone, Copy)]
pub enum WatcherEnd {
    /// The client went away.
    Gone,
    /// Its queue stayed full, or it fell behind the ring.
    Slow,
    Shutdown,
}

impl Metrics {
    pub fn new(per_agent: PerAgent) -> Metrics {
        let latency = || {
            Histogram::new([
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ])
        };
        let stop_buckets = || {
            Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 300.0,
            ])
        };

        let events = Family::<Labels<1>, Counter>::default();
        let run_ends = Family::<Labels<1>, Counter>::default();
        let stops = Family::<Labels<1>, Histogram>::new_with_constructor(stop_buckets);
        let agents = Family::<Labels<1>, Gauge>::default();
        let agents_by_state = AgentState::ALL
            .iter()
            .map(|&state| {
                let name = state.to_wire().as_str_name();
                let name = name.strip_prefix("AGENT_STATE_").unwrap_or(name);
                let labels = [("state", name.to_ascii_lowercase())];
                (state, agents.get_or_create_owned(&labels))
            })
            .collect();
        let mut metrics = Metrics {
            events: by_value(
                |v| pb::EventKind::try_from(v).map(|k| k.as_str_name()),
                "EVENT_KIND_",
                |name| events.get_or_create_owned(&[("kind", name)]),
            ),
            run_ends: by_value(
                |v| pb::EndReason::try_from(v).map(|r| r.as_str_name()),
                "END_REASON_",
                |name| run_ends.get_or_create_owned(&[("end_reason", name)]),
            ),
            stops: by_value(
                |v| pb::StopOutcome::try_from(v).map(|o| o.as_str_name()),
                "STOP_OUTCOME_",
                |name| stops.get_or_create_owned(&[("outcome", name)]),
            ),
            restarts: Counter::default(),
            samples: Histogram::new([
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0,
            ]),
            spawns: Family::default(),
            rpcs: Family::new_with_constructor(latency),
            watchers: Gauge::default(),
            watchers_ended: Family::default(),
            agents,
            agents_by_state,
            unhealthy: Family::default(),
            declared_load: FloatGauge::default(),
            capacity: FloatGauge::default(),
            store_bytes: Gauge::default(),
            agent_cpu: Family::default(),
            agent_memory: Family::default(),
            agent_restarts: Family::default(),
            agent_denials: Family::default(),
            agent_llm_tokens: Family::default(),
            agent_llm_requests: Family::default(),
            agent_llm_cost: Family::default(),
            llm_requests: Family::default(),
            llm_tokens: Family::default(),
            llm_cost: Family::default(),
            per_agent,
            scrape: tokio::sync::Mutex::new(()),
            registry: Registry::with_prefix("agentd"),
        };
        for result in ["started", "rejected", "failed"] {
            let _ = metrics.spawns.get_or_create(&[("result", result)]);
        }
        for reason in ["gone", "slow", "shutdown"] {
            let _ = metrics.watchers_ended.get_or_create(&[("reason", reason)]);
        }

        let r = &mut metrics.registry;
        r.register("agents", "Agents by state", metrics.agents.clone());
        r.register(
            "agents_unhealthy",
            "Live agents whose health is not healthy, by health",
            metrics.unhealthy.clone(),
        );
        r.register(
            "agents_declared_load",
            "Declared load (load_percentage) of the agents that hold capacity",
            metrics.declared_load.clone(),
        );
        r.register(
            "capacity",
            "The daemon's --capacity",
            metrics.capacity.clone(),
        );
        r.register(
            "spawns",
            "Spawn requests: started, rejected (bad request, taken id, no capacity), or failed to start",
            metrics.spawns.clone(),
        );
        r.register("agent_exits", "Runs that ended, by end reason", run_ends);
        r.register(
            "restarts",
            "Runs started again by a restart policy",
            metrics.restarts.clone(),
        );
        r.register(
            "stop_duration_seconds",
            "From a stop request until the agent's processes were gone, by outcome",
            stops,
        );
        r.register(
            "rpc_duration_seconds",
            "Time to answer an RPC (gRPC and HTTP alike; for a stream, until it starts), by method and code",
            metrics.rpcs.clone(),
        );
        r.register(
            "watchers",
            "Event watchers connected (WatchAgents and /v1/events)",
            metrics.watchers.clone(),
        );
        r.register(
            "watchers_ended",
            "Watchers that ended: gone (client left), slow (ended for not reading), shutdown",
            metrics.watchers_ended.clone(),
        );
        r.register("events", "Events emitted, by kind", events);
        r.register(
            "llm_requests",
            "Requests to the LLM gateway, by provider and outcome: forwarded, refused_budget, \
             refused_key, unreachable",
            metrics.llm_requests.clone(),
        );
        r.register(
            "llm_tokens",
            "Tokens the LLM gateway's forwarded requests used, by provider and kind: input \
             (cached included), cached_input, output",
            metrics.llm_tokens.clone(),
        );
        r.register(
            "llm_cost_micros",
            "What the LLM gateway's forwarded requests cost, in micro-dollars, by provider",
            metrics.llm_cost.clone(),
        );
        r.register(
            "sample_duration_seconds",
            "Time to measure every live agent once",
            metrics.samples.clone(),
        );
        r.register(
            "store_bytes",
            "Size of the store on disk",
            metrics.store_bytes.clone(),
        );
        // A gauge named `_info` rather than an OpenMetrics info: Prometheus' own text
        // parser (promtool 2.x) does not know the info type.
        let build = Family::<StaticLabels<1>, Gauge>::default();
        build
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        r.register("build_info", "The agentd version", build);
        if metrics.per_agent.enabled {
            r.register(
                "agent_cpu_percent",
                "CPU of an agent's processes in the last sample, in percent of one core",
                metrics.agent_cpu.clone(),
            );
            r.register(
                "agent_memory_bytes",
                "Resident memory of an agent's processes in the last sample",
                metrics.agent_memory.clone(),
            );
            r.register(
                "agent_restarts",
                "Times the restart policy started the agent again",
                metrics.agent_restarts.clone(),
            );
            r.register(
                "agent_sandbox_denials",
                "What a sandboxed agent was refused so far, by kind: connection (its proxy), \
                 file (Landlock), syscall (seccomp)",
                metrics.agent_denials.clone(),
            );
            r.register(
                "agent_llm_tokens",
                "Tokens an agent used through the LLM gateway so far, by kind: input (cached \
                 included), cached_input, output",
                metrics.agent_llm_tokens.clone(),
            );
            r.register(
                "agent_llm_requests",
                "Requests an agent made through the LLM gateway so far",
                metrics.agent_llm_requests.clone(),
            );
            r.register(
                "agent_llm_cost_micros",
                "What an agent spent through the LLM gateway so far, in micro-dollars",
                metrics.agent_llm_cost.clone(),
            );
        }
        metrics
    }

    /// One request at the LLM gateway: its outcome and, when forwarded, what it used.
    pub fn llm_request(&self, provider: &str, outcome: &'static str, used: &agentd_core::Usage) {
        self.llm_requests
            .get_or_create_owned(&[
                ("provider", provider.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        if used.requests == 0 {
            return;
        }
        for (kind, count) in [
            ("input", used.input_tokens),
            ("cached_input", used.cached_input_tokens),
            ("output", used.output_tokens),
        ] {
            self.llm_tokens
                .get_or_create_owned(&[
                    ("provider", provider.to_string()),
                    ("kind", kind.to_string()),
                ])
                .inc_by(count);
        }
        self.llm_cost
            .get_or_create_owned(&[("provider", provider.to_string())])
            .inc_by(used.cost_micros);
    }

    /// Records one RPC; `Spawn` also counts in `agentd_spawns_total`.
    pub fn rpc(&self, method: &'static str, code: Code, took: Duration) {
        self.rpcs
            .get_or_create(&[("method", method), ("code", code_name(code))])
            .observe(took.as_secs_f64());
        if method == "Spawn" {
            let result = match code {
                Code::Ok => "started",
                Code::Internal | Code::Unknown | Code::Unavailable => "failed",
                _ => "rejected",
            };
            self.spawns.get_or_create(&[("result", result)]).inc();
        }
    }

    pub fn watcher_started(&self) {
        self.watchers.inc();
    }

    pub fn watcher_ended(&self, end: WatcherEnd) {
        self.watchers.dec();
        let reason = match end {
            WatcherEnd::Gone => "gone",
            WatcherEnd::Slow => "slow",
            WatcherEnd::Shutdown => "shutdown",
        };
        self.watchers_ended
            .get_or_create(&[("reason", reason)])
            .inc();
    }

    /// The text exposition of every metric, gauges read now.
    pub async fn render(&self, supervisor: &SupervisorHandle) -> Result<String, Status> {
        let _one_at_a_time = self.scrape.lock().await;
        let summary = supervisor.summary().await.map_err(error_status)?;
        self.set_summary(&summary);
        if self.per_agent.enabled {
            let filter = ListFilter {
                limit: usize::MAX,
                ..ListFilter::default()
            };
            let page = supervisor.list(filter).await.map_err(error_status)?;
            self.agent_cpu.clear();
            self.agent_memory.clear();
            self.agent_restarts.clear();
            self.agent_denials.clear();
            self.agent_llm_tokens.clear();
            self.agent_llm_requests.clear();
            self.agent_llm_cost.clear();
            // Spend stays shown after an agent ended: what it cost is still true.
            for status in page
                .agents
                .iter()
                .filter(|s| s.record.spend.total.requests > 0)
            {
                let labels = self.agent_labels(&status.record.spec);
                let spent = &status.record.spend.total;
                let gauge = |count: u64| i64::try_from(count).unwrap_or(i64::MAX);
                for (kind, count) in [
                    ("input", spent.input_tokens),
                    ("cached_input", spent.cached_input_tokens),
                    ("output", spent.output_tokens),
                ] {
                    let mut labels = labels.clone();
                    labels.push(("kind".to_string(), kind.to_string()));
                    self.agent_llm_tokens
                        .get_or_create(&labels)
                        .set(gauge(count));
                }
                self.agent_llm_requests
                    .get_or_create(&labels)
                    .set(gauge(spent.requests));
                self.agent_llm_cost
                    .get_or_create(&labels)
                    .set(gauge(spent.cost_micros));
            }
            for status in page
                .agents
                .iter()
                .filter(|s| s.record.state.holds_capacity())
            {
                let labels = self.agent_labels(&status.record.spec);
                self.agent_cpu
                    .get_or_create(&labels)
                    .set(status.cpu_percent);
                self.agent_memory
                    .get_or_create(&labels)
                    .set((status.memory_mb * 1024.0 * 1024.0) as i64);
                self.agent_restarts
                    .get_or_create(&labels)
                    .set(i64::from(status.record.restart_count));
                if status.record.spec.sandbox.is_some() {
                    let record = &status.record;
                    for (kind, count) in [
                        ("connection", record.egress.denied),
                        ("file", record.denials.files),
                        ("syscall", record.denials.syscalls),
                    ] {
                        let mut labels = labels.clone();
                        labels.push(("kind".to_string(), kind.to_string()));
                        self.agent_denials
                            .get_or_create(&labels)
                            .set(i64::try_from(count).unwrap_or(i64::MAX));
                    }
                }
            }
        }
        let mut text = String::new();
        encode(&mut text, &self.registry).map_err(|_| Status::internal("encoding the metrics"))?;
        Ok(text)
    }

    /// An agent's series labels: its id and the labels `--metrics-agent-label` names.
    fn agent_labels(&self, spec: &agentd_core::AgentSpec) -> Vec<(String, String)> {
        let mut labels = vec![("agent_id".to_string(), spec.agent_id.clone())];
        for name in &self.per_agent.labels {
            let value = spec.labels.get(name).cloned().unwrap_or_default();
            labels.push((format!("label_{}", label_name(name)), value));
        }
        labels
    }

    /// The same metrics in Prometheus' older text format (0.0.4), for scrapers that do not
    /// ask for OpenMetrics (curl, promtool): a counter's HELP and TYPE lines name it with
    /// its `_total`, and there is no `# EOF`.
    pub fn classic_text(openmetrics: &str) -> String {
        let mut text = String::with_capacity(openmetrics.len());
        let mut counters = std::collections::HashSet::new();
        for line in openmetrics.lines() {
            if let Some(name) = line
                .strip_prefix("# TYPE ")
                .and_then(|rest| rest.strip_suffix(" counter"))
            {
                counters.insert(name.to_string());
            }
        }
        for line in openmetrics.lines() {
            if line == "# EOF" {
                continue;
            }
            let described = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters
                    .contains(name)
                    .then(|| format!("{prefix}{name}_total {tail}"))
            });
            text.push_str(described.as_deref().unwrap_or(line));
            text.push('\n');
        }
        text
    }

    fn set_summary(&self, summary: &Summary) {
        for (state, gauge) in &self.agents_by_state {
            gauge.set(i64::from(summary.count(*state)));
        }
        let unhealthy = [
            ("stalled", summary.stalled),
            ("over_limit", summary.over_limit),
            ("zombie", summary.zombies),
        ];
        for (health, count) in unhealthy {
            self.unhealthy
                .get_or_create(&[("health", health)])
                .set(i64::from(count));
        }
        self.declared_load.set(summary.total_load_percentage);
        self.capacity.set(summary.capacity);
        self.store_bytes
            .set(i64::try_from(summary.store_bytes).unwrap_or(i64::MAX));
    }
}

impl Recorder for Metrics {
    fn event(&self, kind: EventKind) {
        count(&self.events, kind.to_wire() as usize);
    }

    fn run_ended(&self, reason: EndReason) {
        count(&self.run_ends, reason.to_wire() as usize);
    }

    fn restarted(&self) {
        self.restarts.inc();
    }

    fn stopped(&self, outcome: StopOutcome, took: Duration) {
        let outcome = outcome.to_wire() as usize;
        if let Some(Some(histogram)) = self.stops.get(outcome) {
            histogram.observe(took.as_secs_f64());
        }
    }

    fn sampled(&self, took: Duration) {
        self.samples.observe(took.as_secs_f64());
    }
}

fn count(counters: &[Option<Counter>], index: usize) {
    if let Some(Some(counter)) = counters.get(index) {
        counter.inc();
    }
}

/// One metric per value of a proto enum (its `UNSPECIFIED` left out), indexed by the value,
/// labelled with the value's name without `prefix`, in lower case.
fn by_value<M>(
    name: impl Fn(i32) -> Result<&'static str, prost::UnknownEnumValue>,
    prefix: &str,
    mut create: impl FnMut(String) -> M,
) -> Vec<Option<M>> {
    (0..)
        .map_while(|value| name(value).ok())
        .map(|full| match full.strip_prefix(prefix).unwrap_or(full) {
            "UNSPECIFIED" => None,
            short => Some(create(short.to_ascii_lowercase())),
        })
        .collect()
}

/// An agent label's name as a Prometheus label name: `[a-zA-Z0-9_]`.
fn label_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}
