//! End-to-end tests: each test starts the real `agentd` binary on its own temporary socket
//! and data folder and talks to it only over gRPC (or through `agentctl`, Python and
//! grpcurl), the way a user would.

// The rule that only the daemon's reaper waits for children is the daemon's; the tests are
// another process and wait for what they start.
#![allow(clippy::disallowed_methods)]

mod harness;

mod agent_attacks;
mod agentctl;
mod clients;
mod containment;
mod damaged_store;
mod dashboard;
mod first_hour;
mod fleet;
mod gateway;
mod health;
mod history;
mod http;
mod lifecycle;
mod output;
mod persistence;
mod policies;
mod readme;
mod recovery;
mod rejects;
mod resuming;
mod sandbox;
mod security;
mod stopping;
mod systemd;
mod top;
mod tracing;
mod watching;
mod web_attacks;
