//! An agent's folder: its prompt, its output files and status file, made ready for a
//! launch; and the launch itself, with the environment that tells the agent who it is.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::agent::AgentRecord;
use crate::error::{Error, Result};
use crate::keeper::{KEEPER_DIR_VAR, SpawnOrder};
use crate::launch::ProcessSetup;
use crate::os::{self, Os};

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
/// which would make agentd (often root) write where the agent's user may not.
pub(crate) fn no_follow() -> std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.custom_flags(nix::libc::O_NOFOLLOW);
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
        // The folder itself: made here, or one an earlier spawn of this id made and never
        // started; never a symbolic link planted in its place.
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                let meta = std::fs::symlink_metadata(dir).map_err(failed(dir))?;
                if !meta.is_dir() {
                    return Err(Error::UnsafeAgentDir {
                        id: agent_id.to_string(),
                        path: dir.to_path_buf(),
                    });
                }
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
        let prompt_file = create("prompt.txt")?;
        std::fs::write(&prompt_file, prompt).map_err(failed(&prompt_file))?;
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

    pub(crate) fn launch(self, record: &AgentRecord, os: &dyn Os) -> Result<os::Started> {
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
        // The daemon's environment, then the spawn's, then agentd's own variables: a later
        // entry wins.
        let mut env: Vec<(String, String)> = daemon_env().to_vec();
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

/// agentd's own environment, which every agent starts from. Variables that are not UTF-8
/// cannot travel to the keeper and are left out.
fn daemon_env() -> &'static [(String, String)] {
    static ENV: OnceLock<Vec<(String, String)>> = OnceLock::new();
    ENV.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)))
            .filter(|(key, _)| key != KEEPER_DIR_VAR)
            .collect()
    })
}
