//! What the supervisor tells whoever keeps metrics: what it alone sees happen (events, how
//! runs end, restarts, stops, sampling rounds). The server turns these into Prometheus
//! metrics; core knows nothing of the format.

use std::time::Duration;

use crate::events::EventKind;
use crate::state::EndReason;
use crate::stop::StopOutcome;

/// Called on the supervisor task: each call must be cheap and must never block.
pub trait Recorder: Send + Sync {
    /// An agent's machine emitted an event (health samples included).
    fn event(&self, kind: EventKind);
    /// A run ended: exited, failed to start, killed, lost...
    fn run_ended(&self, reason: EndReason);
    /// The restart policy started an agent again.
    fn restarted(&self);
    /// A stop ladder finished.
    fn stopped(&self, outcome: StopOutcome, took: Duration);
    /// The sampler measured every live agent once.
    fn sampled(&self, took: Duration);
}
