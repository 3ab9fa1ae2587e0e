//! Spawn and restart: the agent's folder, the process through the OS seam, and the
//! machine told how the start went.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::sync::oneshot;

use crate::agent::{AgentRecord, AgentStatus};
use crate::agent_dir::AgentFiles;
use crate::error::{Error, Result};
use crate::files;
use crate::keeper;
use crate::launch;
use crate::machine::{AgentMachine, Launched};
use crate::process;
use crate::rebuild;
use crate::spec::{RunAs, SpawnRequest, check_id};
use crate::spend;
use crate::state::StopReason;
use crate::state::TreeSample;
use crate::trace;

use super::{Ack, SupervisorTask, exec_span};

impl SupervisorTask {
    /// Starts (again) the process of an agent whose machine is starting.
    pub(super) fn launch(&mut self, agent_id: &str) {
        let Ok(machine) = self.table.get(agent_id) else {
            return;
        };
        if machine.record().spec.run_as.is_some()
            && let Err(error) = self.open_for_other_users()
        {
            tracing::warn!(%agent_id, %error, "restarting an agent that runs as another user");
        }
        let files = AgentFiles::reopen(&machine.record().agent_dir);
        let span = self.traces.relaunching(agent_id);
        self.order_launch(agent_id, files, Launching::restart(span));
    }

    /// Orders an agent's process from the OS; its outcome comes back to the loop as a
    /// [`LaunchDone`]. Until then the agent is `launching`, and commands that could touch it
    /// wait (`SupervisorTask::handle`).
    fn order_launch(&mut self, agent_id: &str, files: AgentFiles, launching: Launching) {
        let Ok(machine) = self.table.get(agent_id) else {
            return;
        };
        let launches = self.launches.clone();
        let id = agent_id.to_string();
        launching.span.in_scope(|| {
            let _exec = exec_span(agent_id);
            files.launch(
                machine.record(),
                &self.base_env,
                self.os.as_ref(),
                move |started| {
                    let _ = launches.send(LaunchDone {
                        agent_id: id,
                        started,
                    });
                },
            );
        });
        self.launching.insert(agent_id.to_string(), launching);
    }

    /// The keeper answered: the machine learns how the start went, then whoever waits for
    /// it, then the commands that waited for no launch to be under way.
    pub(super) fn launch_done(&mut self, LaunchDone { agent_id, started }: LaunchDone) {
        let Some(launching) = self.launching.remove(&agent_id) else {
            return;
        };
        if let Err(Error::Spawn { source, .. }) = &started
            && keeper::connection_lost(source)
        {
            // The keeper may still start it: the record stays STARTING, and the next agentd
            // adopts whatever runs (or records it LOST). This one stops.
            self.failure = Some(source.to_string());
            for waiter in launching.waiters {
                let _ = waiter.send(Err(Error::ShuttingDown));
            }
            return;
        }
        let launched = {
            let _entered = launching.span.enter();
            let launched = tracing::info_span!(target: trace::TARGET, "agentd.spawn.started")
                .in_scope(|| self.launched(&agent_id, started));
            if launching.restart {
                let error = launched.as_ref().err().map(ToString::to_string);
                trace::launched(&launching.span, error.as_deref());
            }
            launched
        };
        let status = |task: &Self| {
            task.table
                .get(&agent_id)
                .map(|m| m.status(task.clock.mono()))
        };
        let mut waiters = launching.waiters.into_iter();
        if let Some(first) = waiters.next() {
            let _ = first.send(launched.and_then(|()| status(self)));
        }
        // Spawns with the same request id, which came while it started.
        for waiter in waiters {
            let _ = waiter.send(status(self));
        }
        if launching.parent_ended {
            tracing::info!(%agent_id, "stopping: its parent ended while it started");
            drop(self.begin_stop(&agent_id, false, StopReason::ParentExited));
        }
        self.replay_parked();
    }

    /// Feeds a launch's result to the machine; answers with the error, if it failed.
    pub(super) fn launched(
        &mut self,
        agent_id: &str,
        launched: Result<launch::Started>,
    ) -> Result<()> {
        match launched {
            Ok(mut started) => {
                if let Some(listener) = started.proxy.take() {
                    self.serve_proxy(agent_id, listener);
                }
                if let Some(listener) = started.gateway.take() {
                    self.serve_gateway_in(agent_id, listener);
                }
                let request_id = self
                    .table
                    .get(agent_id)
                    .map(|m| m.record().spec.request_id.clone())
                    .unwrap_or_default();
                self.table.child_started(agent_id, started.pid, &request_id);
                let launched = Launched {
                    pid: started.pid,
                    start_ticks: started.start_ticks,
                    containment: match started.cgroup {
                        Some(_) => self.os.containment().0,
                        None => crate::state::Containment::ProcessGroup,
                    },
                    cgroup: started.cgroup,
                    limit_fallbacks: started.fallbacks,
                };
                self.input(agent_id, |m, now, out| m.started(now, launched, out));
                let _ = self.acks.send(Ack::Recorded(started.pid));
                // The first reading at once, so status right after Spawn is not all zeros.
                if let Some(stat) = self.os.proc_stat(started.pid) {
                    let sample = TreeSample {
                        leader_status: process::state_name(stat.state),
                        cpu_percent: 0.0,
                        memory_bytes: stat.rss_pages * self.page_size,
                        num_threads: stat.num_threads,
                        num_processes: 1,
                        cpu_seconds: 0.0,
                    };
                    self.input(agent_id, |m, _, out| m.sampled(sample, out));
                }
                if let Ok(machine) = self.table.get(agent_id) {
                    let status = machine.status(self.clock.mono());
                    self.answer_restart(agent_id, || Ok(status.clone()));
                }
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                let why = format!("it could not start again: {message}");
                self.answer_restart(agent_id, || {
                    Err(Error::CannotRestart {
                        id: agent_id.to_string(),
                        why: why.clone(),
                    })
                });
                if let Ok(machine) = self.table.get(agent_id) {
                    let record = machine.record();
                    let owner = record.spec.run_as.as_ref().map(|user| (user.uid, user.gid));
                    let options = files::no_follow()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .clone();
                    let _ = files::open_for_writing(
                        &options,
                        &record.agent_dir.join("error.log"),
                        owner,
                    )
                    .and_then(|mut log| std::io::Write::write_all(&mut log, message.as_bytes()));
                }
                self.input(agent_id, |m, now, out| m.start_failed(now, message, out));
                Err(error)
            }
        }
    }

    /// Answers once the agent runs (or failed to start).
    pub(super) fn spawn(
        &mut self,
        request: SpawnRequest,
        reply: oneshot::Sender<Result<AgentStatus>>,
    ) {
        let answer = match self.begin_spawn(request) {
            Ok(agent_id) => match self.launching.get_mut(&agent_id) {
                Some(launching) => return launching.waiters.push(reply),
                None => self
                    .table
                    .get(&agent_id)
                    .map(|m| m.status(self.clock.mono())),
            },
            Err(error) => Err(error),
        };
        let _ = reply.send(answer);
    }

    /// Admits a spawn and orders its process; the agent's id. A spawn whose request id
    /// was seen is the same agent's.
    fn begin_spawn(&mut self, mut request: SpawnRequest) -> Result<String> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        if let Some(agent_id) = self.table.by_request(&request.request_id) {
            return Ok(agent_id.clone());
        }
        if !request.request_id.is_empty()
            && let Some((agent_id, _)) = self
                .launching
                .iter()
                .find(|(_, launching)| launching.request_id == request.request_id)
        {
            return Ok(agent_id.clone());
        }
        if request.agent_id.is_empty() {
            request.agent_id = self.generate_id();
        }
        let checks = tracing::info_span!(target: trace::TARGET, "agentd.spawn.check").entered();
        let (mut spec, prompt) = request.validate()?;
        self.settle_sandbox(&mut spec)?;
        self.os.check_spec(&spec)?;
        if let Some(run_as) = &spec.run_as {
            check_user_allowed(&spec.agent_id, run_as, &self.allow_users)?;
        }
        // An id whose earlier spawn never started a process may be tried again.
        if self.launching.contains_key(&spec.agent_id)
            || self
                .table
                .get(&spec.agent_id)
                .is_ok_and(|m| m.record().pid.is_some())
        {
            return Err(Error::AlreadyExists { id: spec.agent_id });
        }
        self.table.admit(&spec, &self.limits)?;
        self.within_parent(&spec.parent_agent_id, spec.budget.as_ref())?;
        drop(checks);
        let (agent_id, request_id) = (spec.agent_id.clone(), spec.request_id.clone());
        let agent_dir = self.agents_dir.join(&agent_id);
        let owner = spec.run_as.as_ref().map(|run_as| (run_as.uid, run_as.gid));
        if owner.is_some() {
            // Another user must be able to reach its folder, though not list the others.
            self.open_for_other_users()?;
        }
        let made = self.ready.take();
        let files = {
            let _folder =
                tracing::info_span!(target: trace::TARGET, "agentd.spawn.folder").entered();
            AgentFiles::prepare(&agent_id, &agent_dir, &prompt, owner, made.as_ref())?
        };
        // What a rebuild of the record starts from, should the store be lost.
        let premade = made.as_ref().map(|made| made.spec.as_path());
        tracing::info_span!(target: trace::TARGET, "agentd.spawn.spec")
            .in_scope(|| rebuild::write_spec_into(&self.specs_dir, &spec, premade))?;
        let mut record = AgentRecord::new(Arc::new(spec), agent_dir, self.clock.wall());
        if self.base_env.gateway.is_some() {
            let key = spend::new_key().map_err(|source| Error::Setup {
                what: "making the agent's LLM gateway key".into(),
                source,
            })?;
            record.gateway_key = Some(key);
        }
        let machine = AgentMachine::starting(record, self.now());
        // The STARTING record reaches the disk before the process exists.
        tracing::info_span!(target: trace::TARGET, "agentd.spawn.record")
            .in_scope(|| self.store.put(machine.record()))?;
        self.table.insert(machine);
        self.spawns = (
            self.spawns.0.saturating_add(1),
            self.spawns.1.saturating_add(1),
        );
        self.order_launch(&agent_id, files, Launching::spawn(request_id));
        Ok(agent_id)
    }

    /// Lets other users traverse (not list or read) the data folder and `agents/`, so an
    /// agent that runs as another user reaches its own folder. Everything else in the data
    /// folder stays private (the store is 0700, the sockets and logs 0600).
    pub(super) fn open_for_other_users(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let Some(data_dir) = self.agents_dir.parent() else {
            return Ok(());
        };
        for dir in [data_dir, self.agents_dir.as_path()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(
                |source| Error::Setup {
                    what: format!(
                        "letting agents that run as other users reach `{}`",
                        dir.display()
                    ),
                    source,
                },
            )?;
        }
        Ok(())
    }

    pub(super) fn generate_id(&mut self) -> String {
        let millis = self
            .clock
            .wall()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        loop {
            self.ids_generated += 1;
            let id = format!("agent-{millis:x}-{}", self.ids_generated);
            if !self.table.contains(&id) {
                return id;
            }
        }
    }

    /// Restarts agents, all or none: each must exist and be in a state to restart, and those
    /// that ended must fit in the daemon's capacity again. `reply` gets their statuses once
    /// every one runs again.
    pub(super) fn restart(
        &mut self,
        agent_ids: Vec<String>,
        reply: oneshot::Sender<Result<Vec<AgentStatus>>>,
    ) {
        if let Err(error) = self.check_restart(&agent_ids) {
            let _ = reply.send(Err(error));
            return;
        }
        let mut running_again = Vec::with_capacity(agent_ids.len());
        for agent_id in &agent_ids {
            let (waiter, status) = oneshot::channel();
            self.restart_waiters
                .entry(agent_id.clone())
                .or_default()
                .push(waiter);
            running_again.push(status);
            self.input(agent_id, |m, now, out| m.restart(now, out));
        }
        tokio::spawn(async move {
            let mut statuses = Vec::with_capacity(running_again.len());
            for status in running_again {
                match status.await {
                    Ok(Ok(status)) => statuses.push(status),
                    Ok(Err(error)) => {
                        let _ = reply.send(Err(error));
                        return;
                    }
                    Err(_) => {
                        let _ = reply.send(Err(Error::ShuttingDown));
                        return;
                    }
                }
            }
            let _ = reply.send(Ok(statuses));
        });
    }

    pub(super) fn check_restart(&self, agent_ids: &[String]) -> Result<()> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        if agent_ids.is_empty() {
            return Err(Error::Invalid {
                field: "agent_ids",
                problem: "name at least one agent".into(),
            });
        }
        let (mut returning, mut load) = (0, 0.0);
        for agent_id in agent_ids {
            check_id("agent_ids", agent_id)?;
            let machine = self.table.get(agent_id)?;
            if let Some(why) = machine.restart_blocked() {
                return Err(Error::CannotRestart {
                    id: agent_id.clone(),
                    why: why.into(),
                });
            }
            let record = machine.record();
            if !record.state.holds_capacity() {
                returning += 1;
                load += record.spec.load_percentage;
            }
        }
        self.table.has_room(returning, load, &self.limits)
    }

    /// Answers everyone waiting for this agent to run again.
    pub(super) fn answer_restart(
        &mut self,
        agent_id: &str,
        answer: impl Fn() -> Result<AgentStatus>,
    ) {
        for waiter in self.restart_waiters.remove(agent_id).unwrap_or_default() {
            let _ = waiter.send(answer());
        }
    }
}

/// An agent may run as root (uid 0, or group 0 among its groups) only when `allowed` names
/// its user, and as anyone else unless `allowed` is a list that leaves them out.
pub(super) fn check_user_allowed(agent_id: &str, run_as: &RunAs, allowed: &[String]) -> Result<()> {
    let listed = allowed
        .iter()
        .any(|entry| *entry == run_as.user || entry.parse() == Ok(run_as.uid));
    let why = if listed {
        return Ok(());
    } else if run_as.uid == 0 {
        "uid 0 is root, which agentd grants only to users listed in --allow-users".to_string()
    } else if run_as.gid == 0 || run_as.groups.contains(&0) {
        "group 0 is root's, which agentd grants only to users listed in --allow-users".to_string()
    } else if !allowed.is_empty() {
        format!("--allow-users lists only {}", allowed.join(", "))
    } else {
        return Ok(());
    };
    Err(Error::UserNotAllowed {
        id: agent_id.to_string(),
        user: run_as.user.clone(),
        why,
    })
}

/// An agent whose process the keeper is starting.
pub(super) struct Launching {
    /// The Spawn's request id (empty for a restart), and every Spawn waiting for its answer.
    request_id: String,
    waiters: Vec<oneshot::Sender<Result<AgentStatus>>>,
    /// The span the start belongs to: the Spawn's, or the restart's.
    span: tracing::Span,
    restart: bool,
    /// Its parent ended meanwhile, and it follows its parent (`stop_followers`).
    pub(super) parent_ended: bool,
}

impl Launching {
    fn spawn(request_id: String) -> Launching {
        Launching {
            request_id,
            waiters: Vec::new(),
            span: tracing::Span::current(),
            restart: false,
            parent_ended: false,
        }
    }

    fn restart(span: tracing::Span) -> Launching {
        Launching {
            request_id: String::new(),
            waiters: Vec::new(),
            span,
            restart: true,
            parent_ended: false,
        }
    }
}

/// How an ordered launch went, back in the supervisor's loop.
pub(super) struct LaunchDone {
    agent_id: String,
    started: Result<launch::Started>,
}
