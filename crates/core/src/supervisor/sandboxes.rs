//! Sandboxed agents in the driver: the policy settled at spawn (inherited from a sandboxed
//! parent, or `--default-sandbox`; never wider than the parent's; never reaching agentd's
//! own files), the proxy served for each run of a `PROXY` agent, its denials turned into
//! EGRESS_DENIED events, and UpdateSandbox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::AgentStatus;
use crate::audit::{DenialKind, KernelDenial};
use crate::egress::{self, Denial, Egress, EgressResolve};
use crate::error::{Error, Result};
use crate::events::{DeniedConnection, EventKind};
use crate::rebuild;
use crate::sandbox::{self, Network, Sandbox};
use crate::spec::AgentSpec;

use super::SupervisorTask;

/// The driver's sandbox state.
pub(super) struct Sandboxes {
    /// `--default-sandbox`: agents that name no sandbox get the default one.
    default_on: bool,
    resolve: Arc<EgressResolve>,
    /// What no agent may be given: the data folder, agentd's socket (real paths).
    private: Vec<PathBuf>,
    /// Each `PROXY` agent's rules and counts, while it is known.
    proxies: HashMap<String, Proxy>,
    denials: mpsc::UnboundedSender<Denial>,
    /// Per agent, when its current second of SANDBOX_DENIED events began, and how many it
    /// had.
    denial_events: HashMap<String, (Instant, u32)>,
}

/// SANDBOX_DENIED events per agent and second; denials past them are only counted.
const DENIAL_EVENTS_PER_SECOND: u32 = 10;

struct Proxy {
    egress: Arc<Egress>,
    /// Serves its current run; aborted (with every open tunnel) when the run is over.
    serving: Option<JoinHandle<()>>,
    /// The LLM gateway's listener in its namespace, served by the gateway until cancelled.
    gateway: Option<tokio_util::sync::CancellationToken>,
}

impl Sandboxes {
    pub(super) fn new(
        default_on: bool,
        resolve: EgressResolve,
        private: Vec<PathBuf>,
    ) -> (Sandboxes, mpsc::UnboundedReceiver<Denial>) {
        let (denials, received) = mpsc::unbounded_channel();
        let sandboxes = Sandboxes {
            default_on,
            resolve: Arc::new(resolve),
            private: private
                .into_iter()
                .map(|path| std::fs::canonicalize(&path).unwrap_or(path))
                .collect(),
            proxies: HashMap::new(),
            denials,
            denial_events: HashMap::new(),
        };
        (sandboxes, received)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            serving.abort();
        }
        if let Some(gateway) = self.gateway.take() {
            gateway.cancel();
        }
    }
}

impl SupervisorTask {
    /// Gives `spec` its sandbox (its own, its sandboxed parent's, or the default) and checks
    /// it: within its parent's, clear of agentd's files.
    pub(super) fn settle_sandbox(&self, spec: &mut AgentSpec) -> Result<()> {
        let parent = Some(spec.parent_agent_id.as_str())
            .filter(|id| !id.is_empty() && !id.starts_with('@'))
            .and_then(|id| self.table.get(id).ok())
            .map(|machine| machine.record());
        let parent_sandbox = parent.and_then(|record| {
            let sandbox = record.spec.sandbox.as_ref()?;
            Some((sandbox, record))
        });
        match (&spec.sandbox, &parent_sandbox) {
            (None, Some((sandbox, _))) => spec.sandbox = Some(Sandbox::clone(sandbox)),
            (None, None) if self.sandboxes.default_on => spec.sandbox = Some(Sandbox::default()),
            _ => {}
        }
        let Some(sandbox) = &spec.sandbox else {
            return Ok(());
        };
        if let Some((parent_sandbox, parent)) = parent_sandbox {
            let parent_working_dir = parent
                .spec
                .working_dir
                .as_deref()
                .unwrap_or(&parent.agent_dir);
            let working_dir = spec
                .working_dir
                .as_deref()
                .map(|dir| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
            sandbox
                .within(
                    working_dir.as_deref(),
                    parent_sandbox,
                    &parent.agent_dir,
                    parent_working_dir,
                )
                .map_err(|problem| Error::SandboxWider {
                    problem: format!(
                        "agent `{}` may not have more than its parent `{}`: {problem}",
                        spec.agent_id, spec.parent_agent_id
                    ),
                })?;
        }
        let private: Vec<&Path> = self
            .sandboxes
            .private
            .iter()
            .map(PathBuf::as_path)
            .collect();
        let working_dir = spec
            .working_dir
            .as_deref()
            .map(|dir| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()));
        sandbox.check_reach(working_dir.as_deref(), &private)
    }

    /// A `PROXY` agent's run started: serve its proxy on the listener made in its namespace.
    pub(super) fn serve_proxy(&mut self, agent_id: &str, listener: std::net::TcpListener) {
        let Ok(machine) = self.table.get(agent_id) else {
            return;
        };
        let spec = &machine.record().spec;
        let Some(sandbox) = spec.sandbox.as_ref() else {
            return;
        };
        let rules = sandbox.allow_hosts.clone();
        let parent = self
            .sandboxes
            .proxies
            .get(&spec.parent_agent_id)
            .map(|proxy| proxy.egress.clone());
        let proxy = self
            .sandboxes
            .proxies
            .entry(agent_id.to_string())
            .or_insert_with(|| Proxy {
                egress: Egress::within(rules, parent),
                serving: None,
                gateway: None,
            });
        match egress::serve(
            listener,
            Arc::from(agent_id),
            proxy.egress.clone(),
            self.sandboxes.resolve.clone(),
            self.sandboxes.denials.clone(),
        ) {
            Ok(serving) => {
                if let Some(old) = proxy.serving.replace(serving) {
                    old.abort();
                }
            }
            Err(error) => {
                tracing::error!(%agent_id, %error, "serving the agent's proxy; it has no way out")
            }
        }
    }

    /// After agentd restarted: the proxy of each adopted `PROXY` agent again, inside the
    /// namespace its processes kept.
    pub(super) fn serve_adopted_proxies(&mut self) {
        let adopted: Vec<(String, i32)> = self
            .table
            .machines()
            .filter(|machine| machine.leader_alive())
            .filter(|machine| {
                machine
                    .record()
                    .spec
                    .sandbox
                    .as_ref()
                    .is_some_and(|sandbox| sandbox.network == Network::Proxy)
            })
            .filter_map(|machine| {
                Some((
                    machine.record().spec.agent_id.clone(),
                    machine.record().pid?,
                ))
            })
            .collect();
        for (agent_id, pid) in adopted {
            match self.os.proxy_listener(pid) {
                Ok(listener) => self.serve_proxy(&agent_id, listener),
                Err(error) => {
                    tracing::error!(%agent_id, %error, "serving an adopted agent's proxy again")
                }
            }
            match self.os.gateway_listener(pid) {
                Ok(Some(listener)) => self.serve_gateway_in(&agent_id, listener),
                Ok(None) => {}
                Err(error) => tracing::error!(
                    %agent_id, %error, "serving the LLM gateway in an adopted agent's namespace again"
                ),
            }
        }
    }

    /// Hands the gateway's listener in a `PROXY` agent's namespace to the gateway, which
    /// serves it (as this agent) until the run is over.
    pub(super) fn serve_gateway_in(&mut self, agent_id: &str, listener: std::net::TcpListener) {
        let Some(proxy) = self.sandboxes.proxies.get_mut(agent_id) else {
            return;
        };
        let stop = tokio_util::sync::CancellationToken::new();
        if let Some(old) = proxy.gateway.replace(stop.clone()) {
            old.cancel();
        }
        self.table
            .spending()
            .namespaces
            .send(crate::spend::InNamespace {
                agent_id: agent_id.to_string(),
                listener,
                stop,
            });
    }

    /// The run is over: its proxy stops (its counts stay for its status).
    pub(super) fn end_proxy(&mut self, agent_id: &str) {
        if let Some(proxy) = self.sandboxes.proxies.get_mut(agent_id) {
            if let Some(serving) = proxy.serving.take() {
                serving.abort();
            }
            if let Some(gateway) = proxy.gateway.take() {
                gateway.cancel();
            }
            let counts = proxy.egress.counts();
            if let Some(machine) = self.table.get_mut(agent_id) {
                machine.set_egress(counts);
            }
        }
    }

    /// The agent is gone for good.
    pub(super) fn forget_proxy(&mut self, agent_id: &str) {
        self.sandboxes.proxies.remove(agent_id);
        self.sandboxes.denial_events.remove(agent_id);
    }

    /// The latest counts into the records, before a sample round's statuses go out.
    pub(super) fn refresh_egress_counts(&mut self) {
        for (agent_id, proxy) in &self.sandboxes.proxies {
            if let Some(machine) = self.table.get_mut(agent_id) {
                let counts = proxy.egress.counts();
                if machine.record().egress != counts {
                    machine.set_egress(counts);
                    self.figures_moved.insert(agent_id.clone());
                }
            }
        }
    }

    pub(super) fn egress_denied(&mut self, denial: Denial) {
        let agent_id: &str = &denial.agent_id;
        let counts = self
            .sandboxes
            .proxies
            .get(agent_id)
            .map(|proxy| proxy.egress.counts());
        let Some(machine) = self.table.get_mut(agent_id) else {
            return;
        };
        if let Some(counts) = counts {
            machine.set_egress(counts);
        }
        let now = self.clock.mono();
        let message = format!("{}:{}: {}", denial.host, denial.port, denial.reason);
        tracing::info!(%agent_id, "egress denied: {message}");
        self.recorder.event(EventKind::EgressDenied);
        let denied = DeniedConnection {
            host: denial.host,
            port: denial.port,
            reason: denial.reason,
        };
        let machine = &*machine;
        self.events
            .emit_denied(EventKind::EgressDenied, message, None, Some(denied), || {
                machine.status(now)
            });
    }

    /// Counts what the kernel refused for the agent whose leader comes first in the
    /// denial's process chain, and tells watchers and the log (within
    /// `DENIAL_EVENTS_PER_SECOND`). A leader that has exited since (its record read after its
    /// end) still gets its count.
    pub(super) fn kernel_denied(&mut self, denial: KernelDenial) {
        let live = denial
            .pids
            .iter()
            .find_map(|&pid| self.table.by_leader(pid, false));
        let ended = || {
            let pid = *denial.pids.first()?;
            self.table.by_leader(pid, true)
        };
        let Some(agent_id) = live.or_else(ended).cloned() else {
            return;
        };
        // Only sandboxed agents have agentd's filter and domain.
        let Some(machine) = self
            .table
            .get_mut(&agent_id)
            .filter(|machine| machine.record().spec.sandbox.is_some())
        else {
            return;
        };
        let (message, counts) = match denial.kind {
            DenialKind::File => ("file", &mut machine.denials_mut().files),
            DenialKind::Syscall => ("system call", &mut machine.denials_mut().syscalls),
        };
        *counts += 1;
        let now = self.clock.mono();
        let (since, count) = self
            .sandboxes
            .denial_events
            .entry(agent_id.clone())
            .or_insert((now, 0));
        if now.duration_since(*since) >= Duration::from_secs(1) {
            (*since, *count) = (now, 0);
        }
        *count += 1;
        if *count > DENIAL_EVENTS_PER_SECOND {
            // Not told now, but counted: a table sees the count at the next round.
            self.figures_moved.insert(agent_id);
            return;
        }
        let message = format!("{message} refused: {}", denial.what);
        tracing::info!(%agent_id, "{message}");
        self.recorder.event(EventKind::SandboxDenied);
        let Ok(machine) = self.table.get(&agent_id) else {
            return;
        };
        self.events
            .emit_denied(EventKind::SandboxDenied, message, None, None, || {
                machine.status(now)
            });
    }

    pub(super) fn update_sandbox(
        &mut self,
        agent_id: &str,
        hosts: Vec<String>,
    ) -> Result<AgentStatus> {
        let rules = sandbox::parse_hosts("allow_hosts", &hosts)?;
        let machine = self.table.get(agent_id)?;
        let spec = &machine.record().spec;
        let Some(current) = spec.sandbox.as_ref() else {
            return Err(Error::Unsupported {
                field: "allow_hosts",
                problem: format!("agent `{agent_id}` has no sandbox"),
            });
        };
        if current.network != Network::Proxy {
            return Err(Error::Unsupported {
                field: "allow_hosts",
                problem: format!(
                    "agent `{agent_id}` has network {}: hosts are allowed through the proxy \
                     (network PROXY) only",
                    current.network.name().to_uppercase()
                ),
            });
        }
        let updated = Sandbox {
            allow_hosts: rules.clone(),
            ..Sandbox::clone(current)
        };
        if let Some(parent) = self
            .table
            .get(&spec.parent_agent_id)
            .ok()
            .map(|parent| parent.record())
            && let Some(parent_sandbox) = &parent.spec.sandbox
        {
            let parent_working_dir = parent
                .spec
                .working_dir
                .as_deref()
                .unwrap_or(&parent.agent_dir);
            updated
                .within(None, parent_sandbox, &parent.agent_dir, parent_working_dir)
                .map_err(|problem| Error::SandboxWider {
                    problem: format!(
                        "agent `{agent_id}` may not have more than its parent `{}`: {problem}",
                        spec.parent_agent_id
                    ),
                })?;
        }
        let spec = Arc::new(AgentSpec {
            sandbox: Some(updated),
            ..AgentSpec::clone(spec)
        });
        rebuild::write_spec(&self.specs_dir, &spec)?;
        if let Some(proxy) = self.sandboxes.proxies.get(agent_id) {
            proxy.egress.set_rules(rules);
        }
        let message = format!("allow_hosts: {}", hosts.join(", "));
        self.input(agent_id, |m, _, out| m.set_spec(spec, out));
        let now = self.clock.mono();
        let machine = self.table.get(agent_id)?;
        self.recorder.event(EventKind::SandboxUpdated);
        self.events
            .emit(EventKind::SandboxUpdated, message, None, || {
                machine.status(now)
            });
        Ok(machine.status(now))
    }
}
