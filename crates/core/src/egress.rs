//! The per-agent egress proxy. A sandboxed agent's network namespace has one way out: an
//! HTTP proxy on 127.0.0.1 inside it, whose listener agentd serves from its own namespace
//! ([`serve`]). The agent is assumed hostile: nothing it sends is trusted, and what it may
//! reach is decided here, never left to the servers it reaches.
//!
//! Per client connection, one request: `CONNECT host:port` opens a tunnel, and a request for
//! an absolute `http://` URL is forwarded in origin form with `Connection: close` (the body
//! its head announced, nothing after it). The host must be a name (an address in any form is
//! refused) allowed by one of the agent's [`HostRule`]s; the proxy resolves it itself, unless
//! [`EgressResolve`] maps it, and refuses it if any of its addresses is loopback, private,
//! link-local or otherwise not the open internet. It connects only to the addresses it
//! checked. Refusals answer 403 and reach the supervisor as a [`Denial`].
//!
//! `request.rs` (the head, without I/O), `body.rs` (where a body ends), `rules.rs`
//! (policy words), `address.rs` (which addresses are refused) decide; `proxy.rs` carries one
//! connection out, and `relay.rs` moves its bytes.

mod address;
mod body;
mod proxy;
mod relay;
mod request;
mod rules;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::{JoinHandle, JoinSet};

pub use rules::{EgressResolve, HostRule};

/// The most connections one agent has open through its proxy; more are refused with 503.
const MAX_CONNECTIONS: usize = 256;
/// After an accept error that is not one connection's (out of descriptors), the loop waits
/// this long before accepting again, rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One agent's egress policy and traffic, shared by its proxy and the supervisor.
#[derive(Debug)]
pub struct Egress {
    /// Read once per request, so a change applies from the next one on.
    rules: RwLock<Arc<[HostRule]>>,
    allowed: AtomicU64,
    denied: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    /// A sub-agent's proxy lets through only what its parent's allows too, as that stands
    /// now: narrowing a parent with UpdateSandbox narrows its whole subtree at once.
    parent: Option<Arc<Egress>>,
}

/// What an agent's proxy has done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressCounts {
    /// Connections made to an upstream server.
    pub allowed: u64,
    /// Requests refused by policy, and malformed ones that named a host.
    pub denied: u64,
    /// Bytes sent from the agent to the world (forwarded heads included).
    pub bytes_up: u64,
    /// Bytes sent from the world to the agent.
    pub bytes_down: u64,
}

impl Egress {
    /// With a sub-agent's `parent`: bounded by the parent's rules as well as its own.
    pub fn within(rules: Vec<HostRule>, parent: Option<Arc<Egress>>) -> Arc<Egress> {
        Arc::new(Egress {
            parent,
            rules: RwLock::new(rules.into()),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
        })
    }

    /// UpdateSandbox: applies to the next request; open connections keep what they reached.
    pub fn set_rules(&self, rules: Vec<HostRule>) {
        *self.rules.write().unwrap_or_else(PoisonError::into_inner) = rules.into();
    }

    /// Whether its rules, and those of every sandboxed ancestor, let `host:port` through.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let own = self
            .rules
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|rule| rule.allows(host, port));
        own && self
            .parent
            .as_ref()
            .is_none_or(|parent| parent.allows(host, port))
    }

    pub fn counts(&self) -> EgressCounts {
        EgressCounts {
            allowed: self.allowed.load(Ordering::Relaxed),
            denied: self.denied.load(Ordering::Relaxed),
            bytes_up: self.bytes_up.load(Ordering::Relaxed),
            bytes_down: self.bytes_down.load(Ordering::Relaxed),
        }
    }
}

/// A refused request, reported to the supervisor (which emits it as EGRESS_DENIED).
#[derive(Debug, Clone)]
pub struct Denial {
    pub agent_id: Arc<str>,
    /// The host as the agent named it (an address as written), cut to 253 characters.
    pub host: String,
    pub port: u16,
    pub reason: String,
}

/// Serves one agent's proxy on `listener` (bound inside the agent's namespace) until the
/// returned task is aborted, which also ends every connection and tunnel it has open.
/// Call it inside a tokio runtime.
pub fn serve(
    listener: std::net::TcpListener,
    agent_id: Arc<str>,
    egress: Arc<Egress>,
    resolve: Arc<EgressResolve>,
    denials: UnboundedSender<Denial>,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let proxy = Arc::new(proxy::Proxy {
        agent_id,
        egress,
        resolve,
        denials,
    });
    Ok(tokio::spawn(accept_loop(listener, proxy)))
}

/// Accepts connections while it runs; each runs in `connections`, which it owns, so
/// dropping this future (an aborted task) drops them all.
async fn accept_loop(listener: tokio::net::TcpListener, proxy: Arc<proxy::Proxy>) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => match places.clone().try_acquire_owned() {
                    Ok(place) => {
                        let proxy = proxy.clone();
                        connections.spawn(async move {
                            proxy.serve_connection(stream).await;
                            drop(place);
                        });
                    }
                    Err(_) => {
                        // Never waits: a fresh socket's buffer takes the whole answer.
                        let _ = stream.try_write(&proxy::too_many());
                    }
                },
                Err(error) if is_connection_error(&error) => {}
                Err(error) => {
                    tracing::warn!(%error, agent_id = %proxy.agent_id, "egress proxy: accepting");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            Some(ended) = connections.join_next(), if !connections.is_empty() => {
                if let Err(error) = ended
                    && error.is_panic()
                {
                    tracing::error!(%error, agent_id = %proxy.agent_id, "egress proxy: a connection panicked");
                }
            }
        }
    }
}

/// An accept error about the one connection being accepted, not the listener.
fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted | WouldBlock
    )
}
