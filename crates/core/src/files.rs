//! An agent's folder: its prompt, its output files and status file, made ready for a
//! launch; and the launch itself, with the environment that tells the agent who it is.

use std::path::{Path, PathBuf};

use crate::agent::AgentRecord;
use crate::error::{Error, Result};
use crate::keeper::{KEEPER_DIR_VAR, SpawnOrder};
use crate::launch::ProcessSetup;
use crate::os::{self, Os};
use crate::spec::RunAs;

/// The file an agent writes its progress to.
pub(crate) const STATUS_FILE: &str = "status.json";

/// Opens a file in an agent's folder for reading: never through a symbolic link (the agent,
/// or the user it runs as, owns the folder and could plant one to any file agentd can read),
/// never blocking (a FIFO planted there would stop the reader), and only a regular file.
pub(crate) fn open_for_reading(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Options to open a file in an agent's folder for writing: never through a symbolic link,
/// which would make agentd (often root) write where the agent's user may not; created
/// readable by its owner only (a prompt or output may hold secrets).
pub(crate) fn no_follow() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.custom_flags(nix::libc::O_NOFOLLOW).mode(0o600);
    options
}

/// An agent's folder, made ready for a launch: prompt written, output files open.
pub(crate) struct AgentFiles {
    stdout: PathBuf,
    stderr: PathBuf,
}

impl AgentFiles {
    /// `owner`: the user and group the agent runs as, who then own its folder and files.
    pub(crate) fn prepare(
        agent_id: &str,
        dir: &Path,
        prompt: &str,
        owner: Option<(u32, u32)>,
    ) -> Result<AgentFiles> {
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::AgentDir {
                id: agent_id.to_string(),
                path,
                source,
            }
        };
        // The folder itself, its owner's only: made here, or one an earlier spawn of this
        // id made and never started; never a symbolic link planted in its place.
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(dir).map_err(failed(dir))?;
                if !meta.is_dir() {
                    return Err(Error::UnsafeAgentDir {
                        id: agent_id.to_string(),
                        path: dir.to_path_buf(),
                    });
                }
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(failed(dir))?;
            }
            Err(error) => return Err(failed(dir)(error)),
        }
        for stale in [STATUS_FILE, "error.log"] {
            let _ = std::fs::remove_file(dir.join(stale));
        }
        // Empty at the start; the keeper opens the output for appending.
        let create = |name: &str| {
            let path = dir.join(name);
            no_follow()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(failed(&path))?;
            Ok::<_, Error>(path)
        };
        let prompt_file = dir.join("prompt.txt");
        no_follow()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&prompt_file)
            .and_then(|mut file| std::io::Write::write_all(&mut file, prompt.as_bytes()))
            .map_err(failed(&prompt_file))?;
        let files = AgentFiles {
            stdout: create("stdout.log")?,
            stderr: create("stderr.log")?,
        };
        if let Some((uid, gid)) = owner {
            for path in [dir, &prompt_file, &files.stdout, &files.stderr] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(failed(path))?;
            }
        }
        Ok(files)
    }

    /// For a restart: the prompt stays, output is appended to the earlier runs'.
    pub(crate) fn reopen(dir: &Path) -> AgentFiles {
        let _ = std::fs::remove_file(dir.join(STATUS_FILE));
        AgentFiles {
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
        }
    }

    pub(crate) fn launch(
        self,
        record: &AgentRecord,
        base_env: &BaseEnv,
        os: &dyn Os,
    ) -> Result<os::Started> {
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
        // What every agent gets, then the spawn's, then agentd's own variables: a later
        // entry wins.
        let mut env = base_env.for_agent(spec.run_as.as_ref());
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
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
        os.spawn(SpawnOrder {
            agent_id: spec.agent_id.clone(),
            command: spec.command.clone(),
            env,
            working_dir: working_dir.to_path_buf(),
            stdout: self.stdout,
            stderr: self.stderr,
            resources: spec.resources.clone(),
            joins: None,
            setup: ProcessSetup {
                run_as: spec.run_as.clone(),
                ..ProcessSetup::default()
            },
        })
        .map_err(|source| Error::Spawn {
            id: spec.agent_id.clone(),
            program: spec.command.first().cloned().unwrap_or_default(),
            source,
        })
    }
}

/// The environment every agent starts from: never agentd's own (it may hold secrets such as
/// `OTEL_EXPORTER_OTLP_HEADERS`), only what a program expects of a login (`PATH`, the
/// locale, `TZ`, and `HOME`, `USER`, `LOGNAME` and `SHELL` of the user it runs as) and the
/// variables the operator passes on by name (`--pass-env`).
#[derive(Debug, Clone, Default)]
pub(crate) struct BaseEnv {
    /// From agentd's environment, read once at start: the defaults and `--pass-env`.
    passed: Vec<(String, String)>,
    /// agentd's own user, for an agent that names none.
    own: Option<Login>,
}

/// The variables that say who a process runs as.
#[derive(Debug, Clone)]
struct Login {
    user: String,
    home: String,
    shell: String,
}

impl Login {
    fn of(uid: u32) -> Option<Login> {
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok()??;
        Some(Login {
            user: user.name,
            home: user.dir.to_string_lossy().into_owned(),
            shell: user.shell.to_string_lossy().into_owned(),
        })
    }
}

/// Passed on from agentd's environment when set; `PATH` has a default.
const DEFAULT_PASSED: &[&str] = &["PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl BaseEnv {
    /// Reads agentd's environment once: the defaults and the `pass` names, where set.
    pub(crate) fn from_daemon(pass: &[String]) -> BaseEnv {
        let mut passed: Vec<(String, String)> = DEFAULT_PASSED
            .iter()
            .copied()
            .chain(pass.iter().map(String::as_str))
            .filter(|name| *name != KEEPER_DIR_VAR)
            .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
            .collect();
        if !passed.iter().any(|(name, _)| name == "PATH") {
            passed.insert(0, ("PATH".into(), DEFAULT_PATH.into()));
        }
        BaseEnv {
            passed,
            own: Login::of(nix::unistd::geteuid().as_raw()),
        }
    }

    fn for_agent(&self, run_as: Option<&RunAs>) -> Vec<(String, String)> {
        let login = match run_as {
            Some(run_as) => Login::of(run_as.uid).or_else(|| {
                // A uid with no entry in the user database: its number, and no home of its own.
                Some(Login {
                    user: run_as.user.clone(),
                    home: "/".into(),
                    shell: "/bin/sh".into(),
                })
            }),
            None => self.own.clone(),
        };
        let mut env = Vec::with_capacity(self.passed.len() + 4);
        if let Some(login) = login {
            env.extend([
                ("HOME".to_string(), login.home),
                ("USER".to_string(), login.user.clone()),
                ("LOGNAME".to_string(), login.user),
                ("SHELL".to_string(), login.shell),
            ]);
        }
        // A name passed on by the operator wins over the login's.
        env.extend(self.passed.iter().cloned());
        env
    }
}
