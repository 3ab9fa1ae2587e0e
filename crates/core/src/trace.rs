//! What a trace shows of the supervisor's own work: a span for each step of a spawn (folder,
//! fork and exec, flush), for each stop ladder with a child per signal, and for each restart.
//! They are `tracing` spans with the target [`TARGET`]: agentd's OpenTelemetry layer exports
//! them, parented on the request that caused them (a command carries its caller's span, see
//! `Command::Traced`); its log output leaves them out. With tracing off no layer wants
//! them: each is one cached check and nothing is kept here.

use std::collections::HashMap;

use nix::sys::signal::Signal;
use tracing::Span;
use tracing::field::Empty;

use crate::stop::StopOutcome;

use crate::state::StopReason;

/// The target of every span made for traces.
pub const TARGET: &str = "agentd::trace";

/// The spans of the stop ladders and restarts under way, by agent.
#[derive(Default)]
pub(crate) struct Traces {
    stops: HashMap<String, StopTrace>,
    restarts: HashMap<String, Span>,
}

struct StopTrace {
    /// The request that stopped the agent (none when agentd decided): a restart that
    /// follows the ladder is its child too, not the ladder's.
    cause: Span,
    ladder: Span,
    /// The signal of the step under way, and its span.
    step: Option<(Signal, Span)>,
}

impl Traces {
    /// A stop ladder signalled the agent: the ladder's span begins with its first signal, and
    /// each new step (a repeated SIGKILL is the same step) is a child span.
    pub fn signalled(&mut self, agent_id: &str, signal: Signal, reason: Option<StopReason>) {
        let trace = match self.stops.get_mut(agent_id) {
            Some(trace) => trace,
            None => {
                let ladder = tracing::info_span!(
                    target: TARGET,
                    "agentd.stop",
                    agent.id = agent_id,
                    stop.reason = reason.map(StopReason::name),
                    stop.outcome = Empty,
                );
                if ladder.is_disabled() {
                    return;
                }
                let trace = StopTrace {
                    cause: Span::current(),
                    ladder,
                    step: None,
                };
                self.stops.entry(agent_id.to_string()).or_insert(trace)
            }
        };
        if trace
            .step
            .as_ref()
            .is_some_and(|(step, _)| *step == signal && signal == Signal::SIGKILL)
        {
            return;
        }
        let step = tracing::info_span!(
            target: TARGET,
            parent: &trace.ladder,
            "agentd.stop.signal",
            signal = signal.as_str(),
        );
        // Replacing the last step's span ends it.
        trace.step = Some((signal, step));
    }

    pub fn stop_finished(&mut self, agent_id: &str, outcome: StopOutcome) {
        if let Some(trace) = self.stops.remove(agent_id) {
            trace.ladder.record("stop.outcome", outcome.name());
        }
    }

    /// The agent will start again (at once, or after a backoff): the restart's span lasts
    /// until the process runs or fails to start.
    pub fn restarting(&mut self, agent_id: &str, why: &str) {
        let parent = match self.stops.get(agent_id) {
            Some(trace) => trace.cause.clone(),
            None => Span::current(),
        };
        let span = tracing::info_span!(
            target: TARGET,
            parent: &parent,
            "agentd.restart",
            agent.id = agent_id,
            restart.reason = why,
            restart.outcome = Empty,
            otel.status_code = Empty,
            otel.status_message = Empty,
        );
        if !span.is_disabled() {
            self.restarts.insert(agent_id.to_string(), span);
        }
    }

    /// The restart's span, to enter while its process starts (none if no restart is under
    /// way or tracing is off).
    pub fn relaunching(&mut self, agent_id: &str) -> Span {
        self.restarts.remove(agent_id).unwrap_or_else(Span::none)
    }

    /// The agent will not run again: a restart still waiting for its backoff is called off.
    pub fn ended(&mut self, agent_id: &str) {
        if let Some(span) = self.restarts.remove(agent_id) {
            span.record("restart.outcome", "called off");
        }
    }
}

/// Records how a restart's launch went on its span.
pub(crate) fn launched(span: &Span, error: Option<&str>) {
    match error {
        None => {
            span.record("restart.outcome", "started");
        }
        Some(error) => {
            span.record("restart.outcome", "failed");
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", error);
        }
    }
}
