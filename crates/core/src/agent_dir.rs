//! An agent's folder: its prompt, its output files and status file, made ready for a
//! launch; and the launch itself, with the environment that tells the agent who it is.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::agent::AgentRecord;
use crate::confine::Confinement;
use crate::error::{Error, Result};
use crate::files::{STATUS_FILE, no_follow, open_for_writing};
use crate::keeper::{KEEPER_DIR_VAR, SpawnOrder};
use crate::launch::{self, ProcessSetup};
use crate::os::Os;
use crate::sandbox::{Network, Sandbox};
use crate::spec::RunAs;
use crate::spend::GatewayEnv;

/// Agent folders made ahead (`ready/N` in the data folder, each with an empty prompt and
/// output files, and an empty `ready/N.json` for its spec), so that a spawn renames them into
/// place instead of allocating five inodes on its path; a blocking thread tops the pool up
/// whenever spawns pause. On this project's VM (ext4 with no journal, where an allocation
/// scans past recently freed inodes) making them was 40% of the supervisor's time in a storm
/// of 10,000 spawns, and 1.0 to 1.4 ms of a spawn.
#[derive(Clone)]
pub(crate) struct ReadyFolders(Arc<Pool>);

struct Pool {
    dir: PathBuf,
    ready: Mutex<Vec<Made>>,
    made: AtomicU64,
    refilling: AtomicBool,
    /// When a spawn last took a folder.
    taken_at: Mutex<Option<Instant>>,
}

/// A folder and a spec file made ahead.
pub(crate) struct Made {
    folder: PathBuf,
    pub spec: PathBuf,
}

/// How many folders the pool keeps, topped up once spawns pause for [`QUIET`]: a burst of
/// up to this many spawns after a pause finds its folders made.
const READY: usize = 64;
const QUIET: Duration = Duration::from_millis(20);
const FILES: [&str; 3] = ["prompt.txt", "stdout.log", "stderr.log"];

impl ReadyFolders {
    /// A pool in `dir`: what an earlier daemon left there is deleted first, on the same
    /// thread that then fills it.
    pub(crate) fn new(dir: PathBuf) -> ReadyFolders {
        let pool = ReadyFolders(Arc::new(Pool {
            dir,
            ready: Mutex::default(),
            made: AtomicU64::new(0),
            refilling: AtomicBool::new(false),
            taken_at: Mutex::new(None),
        }));
        pool.refill_soon(true);
        pool
    }

    /// A folder and spec file made ready, if one is left.
    pub(crate) fn take(&self) -> Option<Made> {
        *self
            .0
            .taken_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let taken = self
            .0
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        self.refill_soon(false);
        taken
    }

    fn refill_soon(&self, first: bool) {
        if self.0.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let pool = self.clone();
        let refill = move || {
            if first {
                let _ = std::fs::remove_dir_all(&pool.0.dir);
            }
            if let Err(error) = pool.refill() {
                tracing::warn!(dir = %pool.0.dir.display(), %error, "making agent folders ahead");
            }
            pool.0.refilling.store(false, Ordering::SeqCst);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(refill)),
            // Outside a runtime (a unit test), spawns make their folders themselves.
            Err(_) => self.0.refilling.store(false, Ordering::SeqCst),
        }
    }

    fn refill(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        // Not recursive: a data folder deleted meanwhile is not made again.
        match std::fs::DirBuilder::new().mode(0o700).create(&self.0.dir) {
            Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => return Err(error),
            _ => {}
        }
        let ready = || self.0.ready.lock().unwrap_or_else(PoisonError::into_inner);
        while ready().len() < READY {
            // Only while no spawn is under way: made beside a spawn, a folder slowed it by
            // more than it saved (the filesystem's locks, the other core), and 32 at once
            // raised the spawn p99 from 4 to 10 ms.
            let taken_at = *self
                .0
                .taken_at
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(wait) = taken_at.and_then(|at| QUIET.checked_sub(at.elapsed()))
                && !wait.is_zero()
            {
                std::thread::sleep(wait);
                continue;
            }
            let folder = (self.0.dir).join(self.0.made.fetch_add(1, Ordering::SeqCst).to_string());
            let spec = folder.with_extension("json");
            std::fs::DirBuilder::new().mode(0o700).create(&folder)?;
            for path in FILES.map(|name| folder.join(name)).iter().chain([&spec]) {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
            }
            ready().push(Made { folder, spec });
        }
        Ok(())
    }
}

/// An agent's folder, made ready for a launch: prompt written, output files open.
pub(crate) struct AgentFiles {
    stdout: PathBuf,
    stderr: PathBuf,
}

impl AgentFiles {
    /// `owner`: the user and group the agent runs as, who then own its folder and files.
    /// A folder made ahead is renamed into place when `dir` does not exist yet.
    pub(crate) fn prepare(
        agent_id: &str,
        dir: &Path,
        prompt: &str,
        owner: Option<(u32, u32)>,
        made: Option<&Made>,
    ) -> Result<AgentFiles> {
        let failed = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::AgentDir {
                id: agent_id.to_string(),
                path,
                source,
            }
        };
        let files = AgentFiles {
            stdout: dir.join("stdout.log"),
            stderr: dir.join("stderr.log"),
        };
        // rename(2) never replaces a link or a folder with anything in it: those take the
        // long way below, which says what is wrong or clears what an earlier spawn left.
        if let Some(made) = made
            && std::fs::rename(&made.folder, dir).is_ok()
        {
            if !prompt.is_empty() {
                let path = dir.join("prompt.txt");
                open_for_writing(no_follow().write(true), &path, None)
                    .and_then(|mut file| std::io::Write::write_all(&mut file, prompt.as_bytes()))
                    .map_err(failed(&path))?;
            }
            if let Some((uid, gid)) = owner {
                for path in FILES
                    .map(|name| dir.join(name))
                    .iter()
                    .chain([&dir.to_path_buf()])
                {
                    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(failed(path))?;
                }
            }
            return Ok(files);
        }
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
        let create = |name: &str, text: &str| {
            let path = dir.join(name);
            let options = no_follow().write(true).create(true).truncate(true).clone();
            open_for_writing(&options, &path, owner)
                .and_then(|mut file| std::io::Write::write_all(&mut file, text.as_bytes()))
                .map_err(failed(&path))?;
            Ok::<_, Error>(())
        };
        for (name, text) in [
            ("prompt.txt", prompt),
            ("stdout.log", ""),
            ("stderr.log", ""),
        ] {
            create(name, text)?;
        }
        // The folder last: until now its user could not reach into it. `agents/` is
        // agentd's, so the folder itself cannot be swapped for a link.
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(failed(dir))?;
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

    /// Orders the agent's process; `done` gets the outcome exactly once, on any thread,
    /// perhaps before this returns.
    pub(crate) fn launch(
        self,
        record: &AgentRecord,
        base_env: &BaseEnv,
        os: &dyn Os,
        done: impl FnOnce(Result<launch::Started>) + Send + 'static,
    ) {
        let spec = &record.spec;
        let dir = &record.agent_dir;
        let working_dir = spec.working_dir.as_deref().unwrap_or(dir);
        match std::fs::metadata(working_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return done(Err(Error::WorkingDir {
                    id: spec.agent_id.clone(),
                    path: working_dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotADirectory,
                        "not a directory",
                    ),
                }));
            }
            Err(source) => {
                return done(Err(Error::WorkingDir {
                    id: spec.agent_id.clone(),
                    path: working_dir.to_path_buf(),
                    source,
                }));
            }
        }
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        // What every agent gets, then the spawn's, then agentd's own variables: a later
        // entry wins.
        let mut env = base_env.for_agent(spec.run_as.as_ref());
        if let Some(sandbox) = &spec.sandbox {
            env.extend(sandbox.env(dir));
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let (Some(gateway), Some(key)) = (&base_env.gateway, &record.gateway_key) {
            env.extend(gateway.vars(key));
        }
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
        let (id, program) = (spec.agent_id.clone(), spec.command.first().cloned());
        let order = SpawnOrder {
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
                confine: spec
                    .sandbox
                    .as_ref()
                    .map(|sandbox| confinement(sandbox, dir, working_dir)),
                ..ProcessSetup::default()
            },
            network: spec.sandbox.as_ref().map(|sandbox| sandbox.network),
        };
        os.spawn(
            order,
            Box::new(move |started| {
                done(started.map_err(|source| Error::Spawn {
                    id,
                    program: program.unwrap_or_default(),
                    source,
                }));
            }),
        );
    }
}

/// What the keeper confines a sandboxed agent to: its folder and working folder besides
/// the policy's paths, all as the kernel resolves them (the mount plan compares real paths).
fn confinement(sandbox: &Sandbox, dir: &Path, working_dir: &Path) -> Confinement {
    let real = |path: &Path| std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut write = sandbox.write_paths.clone();
    write.extend([real(dir), real(working_dir)]);
    let mut read = sandbox.read_paths.clone();
    // On the host's network the agent resolves names itself, and `/etc/resolv.conf` often
    // points into `/run`.
    if sandbox.network == Network::Host
        && let Ok(resolv) = std::fs::canonicalize("/etc/resolv.conf")
        && !resolv.starts_with("/etc")
    {
        read.push(resolv);
    }
    Confinement {
        net_ns: None,
        read,
        write,
        namespaces: sandbox.allow_namespaces,
    }
}

/// The environment every agent starts from: never agentd's own (it may hold secrets such as
/// `OTEL_EXPORTER_OTLP_HEADERS`), only what a program expects of a login (`PATH`, the
/// locale, `TZ`, and `HOME`, `USER`, `LOGNAME` and `SHELL` of the user it runs as) and the
/// variables the operator passes on by name (`--pass-env`).
#[derive(Debug, Clone, Default)]
pub(crate) struct BaseEnv {
    /// From agentd's environment, read once at start: the locale, `TZ` and `--pass-env`.
    passed: Vec<(String, String)>,
    /// agentd's `PATH`, for agents of its own user; an agent with a user gets the system's
    /// (agentd's may name folders of its own user, such as `/root/.cargo/bin`), unless
    /// `--pass-env PATH` says otherwise.
    own_path: String,
    other_path: String,
    /// agentd's own user, for an agent that names none.
    own: Option<Login>,
    /// The LLM gateway's variables, for agents with a key to it.
    pub(crate) gateway: Option<GatewayEnv>,
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

/// Passed on from agentd's environment when set.
const DEFAULT_PASSED: &[&str] = &["LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ"];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl BaseEnv {
    /// Reads agentd's environment once: the defaults and the `pass` names, where set.
    pub(crate) fn from_daemon(pass: &[String], gateway: Option<GatewayEnv>) -> BaseEnv {
        let passed = DEFAULT_PASSED
            .iter()
            .copied()
            .chain(pass.iter().map(String::as_str))
            .filter(|name| *name != KEEPER_DIR_VAR && *name != "PATH")
            .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?)))
            .collect();
        let own_path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.into());
        let other_path = match pass.iter().any(|name| name == "PATH") {
            true => own_path.clone(),
            false => DEFAULT_PATH.into(),
        };
        BaseEnv {
            passed,
            own_path,
            other_path,
            own: Login::of(nix::unistd::geteuid().as_raw()),
            gateway,
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
        let path = match run_as {
            Some(_) => &self.other_path,
            None => &self.own_path,
        };
        let mut env = Vec::with_capacity(self.passed.len() + 5);
        env.push(("PATH".to_string(), path.clone()));
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
