//! Spawn: validate, prepare the agent's folder, record, start the process.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::agent::{AgentRecord, AgentState, AgentStatus};
use crate::error::{Error, Result};
use crate::events::EventKind;
use crate::os;
use crate::spec::SpawnRequest;
use crate::supervisor::{Agent, SupervisorTask};

impl SupervisorTask {
    pub(crate) fn spawn(&mut self, mut request: SpawnRequest) -> Result<AgentStatus> {
        if self.shutting_down {
            return Err(Error::ShuttingDown);
        }
        if let Some(agent_id) = self.by_request.get(&request.request_id) {
            return self.agent(agent_id).map(Agent::status);
        }
        if request.agent_id.is_empty() {
            request.agent_id = self.generate_id();
        }
        let (spec, prompt) = request.validate()?;
        // An id whose earlier spawn never started a process may be tried again.
        if self
            .agents
            .get(&spec.agent_id)
            .is_some_and(|agent| agent.record.pid.is_some())
        {
            return Err(Error::AlreadyExists { id: spec.agent_id });
        }
        self.admit(&spec)?;
        let agent_id = spec.agent_id.clone();
        let agent_dir = self.agents_dir.join(&agent_id);
        let files = AgentFiles::prepare(&agent_id, &agent_dir, &prompt)?;
        let mut record = AgentRecord {
            spec: Arc::new(spec),
            state: AgentState::Starting,
            agent_dir,
            pid: None,
            start_ticks: None,
            started_at: Some(SystemTime::now()),
            ended_at: None,
            exit: None,
            error: None,
            progress: 0.0,
            progress_message: String::new(),
            adopted: false,
            progress_details: Default::default(),
            last_heartbeat: None,
            health_issues: Vec::new(),
            restart_count: 0,
            last_exit: None,
            next_restart_at: None,
            backoff_step: 0,
        };
        self.store.put(&record)?;
        match files.launch(&record) {
            Ok(started) => {
                record.state = AgentState::Running;
                record.pid = Some(started.pid);
                record.start_ticks = started.start_ticks;
                self.persist(&record);
                if !record.spec.request_id.is_empty() {
                    self.by_request
                        .insert(record.spec.request_id.clone(), agent_id.clone());
                }
                self.by_pid.insert(started.pid, agent_id.clone());
                self.insert(record, true);
                tracing::info!(%agent_id, pid = started.pid, "spawned");
                self.emit(&agent_id, EventKind::Spawned, String::new());
                self.schedule_run_limits(&agent_id);
                self.agent(&agent_id).map(Agent::status)
            }
            Err(error) => {
                let message = error.to_string();
                tracing::warn!(%agent_id, "{message}");
                let _ = std::fs::write(record.agent_dir.join("error.log"), &message);
                record.state = AgentState::Failed;
                record.ended_at = record.started_at;
                record.error = Some(message.clone());
                self.persist(&record);
                self.insert(record, false);
                self.emit(&agent_id, EventKind::Failed, message);
                Err(error)
            }
        }
    }

    pub(crate) fn insert(&mut self, record: AgentRecord, alive: bool) {
        self.agents
            .insert(record.spec.agent_id.clone(), Agent::new(record, alive));
    }

    pub(crate) fn generate_id(&mut self) -> String {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        loop {
            self.ids_generated += 1;
            let id = format!("agent-{millis:x}-{}", self.ids_generated);
            if !self.agents.contains_key(&id) {
                return id;
            }
        }
    }
}

/// The file an agent writes its progress to.
pub(crate) const STATUS_FILE: &str = "status.json";

/// An agent's folder, made ready for a launch: prompt written, output files open.
pub(crate) struct AgentFiles {
    stdout: std::fs::File,
    stderr: std::fs::File,
}

impl AgentFiles {
    pub(crate) fn prepare(agent_id: &str, dir: &Path, prompt: &str) -> Result<AgentFiles> {
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::AgentDir {
                id: agent_id.to_string(),
                path,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(failed(dir))?;
        for stale in [STATUS_FILE, "error.log"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        let prompt_file = dir.join("prompt.txt");
        std::fs::write(&prompt_file, prompt).map_err(failed(&prompt_file))?;
        let create = |name: &str| {
            let path = dir.join(name);
            std::fs::File::create(&path).map_err(failed(&path))
        };
        Ok(AgentFiles {
            stdout: create("stdout.log")?,
            stderr: create("stderr.log")?,
        })
    }

    /// For a restart: the prompt stays, output is appended to the earlier runs'.
    pub(crate) fn reopen(agent_id: &str, dir: &Path) -> Result<AgentFiles> {
        let _ = std::fs::remove_file(dir.join(STATUS_FILE));
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| Error::AgentDir {
                    id: agent_id.to_string(),
                    path,
                    source,
                })
        };
        Ok(AgentFiles {
            stdout: open("stdout.log")?,
            stderr: open("stderr.log")?,
        })
    }

    pub(crate) fn launch(self, record: &AgentRecord) -> Result<os::Started> {
        let spec = &record.spec;
        let dir = &record.agent_dir;
        let working_dir = spec.working_dir.as_deref().unwrap_or(dir);
        match std::fs::metadata(working_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::WorkingDir {
                    id: spec.agent_id.clone(),
                    path: working_dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "not a directory",
                    ),
                });
            }
            Err(source) => {
                return Err(Error::WorkingDir {
                    id: spec.agent_id.clone(),
                    path: working_dir.to_path_buf(),
                    source,
                });
            }
        }
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        let mut env: Vec<(String, String)> = spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.extend([
            ("AGENTD_AGENT_ID".into(), spec.agent_id.clone()),
            (
                "AGENTD_AGENT_DIR".into(),
                dir.to_string_lossy().into_owned(),
            ),
            (
                "AGENTD_PARENT_AGENT_ID".into(),
                spec.parent_agent_id.clone(),
            ),
            ("AGENTD_AGENT_NAME".into(), spec.agent_name.clone()),
            ("AGENTD_AGENT_TYPE".into(), spec.agent_type.clone()),
            ("AGENTD_MODEL".into(), spec.model.clone()),
            ("AGENTD_PROMPT_FILE".into(), path("prompt.txt")),
            ("AGENTD_STATUS_FILE".into(), path(STATUS_FILE)),
        ]);
        os::spawn(os::Launch {
            command: &spec.command,
            env: &env,
            working_dir,
            stdout: self.stdout,
            stderr: self.stderr,
        })
        .map_err(|source| Error::Spawn {
            id: spec.agent_id.clone(),
            program: spec.command.first().cloned().unwrap_or_default(),
            source,
        })
    }
}
