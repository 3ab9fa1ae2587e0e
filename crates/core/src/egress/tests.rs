//! The proxy's tests: the policy words and request heads as tables (`policy.rs`,
//! `heads.rs`), the proxy itself through real sockets on 127.0.0.1 (`sockets.rs`: a client
//! standing in for the agent, echo and HTTP servers for the world, reached under names
//! `EgressResolve` maps), and what it costs (`cost.rs`, printed).

mod cost;
mod heads;
mod policy;
mod sockets;

use std::time::Duration;

use super::HostRule;

/// How long a test waits for anything before it fails.
const WAIT: Duration = Duration::from_secs(10);

fn rules(texts: &[&str]) -> Vec<HostRule> {
    texts
        .iter()
        .map(|text| HostRule::parse(text).unwrap_or_else(|error| panic!("{error}")))
        .collect()
}
