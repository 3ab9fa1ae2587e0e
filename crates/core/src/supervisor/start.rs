//! Starting the supervisor: the data folder checked and locked, the keeper reached, the
//! store judged and the agents recovered, then the task, the exit forwarders and the sampler.

use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot};

use crate::cgroup;
use crate::clock::SystemClock;
use crate::config::{StoreRecovery, SupervisorConfig};
use crate::error::{Error, Result};
use crate::files;
use crate::handle::{Command, SupervisorHandle};
use crate::keeper::KeeperClient;
use crate::os;
use crate::process;
use crate::rebuild;
use crate::recorder::Recorder;
use crate::recover::KeeperState;
use crate::sampler;
use crate::sandbox::SandboxSupport;
use crate::store::Store;

use super::recovery::trusted_store;
use super::{Inboxes, Parts, SupervisorTask, acknowledge_exits, forward_kept_exits};

pub struct Supervisor;

impl Supervisor {
    /// Opens the store, recovers the agents of an earlier daemon, and starts the supervisor
    /// task and the sampler. Must be called inside a tokio runtime, before anything else in
    /// the process starts children. `recorder` hears of events, run ends, restarts, stops and
    /// sampling rounds as they happen.
    pub fn start(
        mut config: SupervisorConfig,
        recorder: Arc<dyn Recorder>,
    ) -> Result<SupervisorHandle> {
        create_private_dir(&config.data_dir)?;
        // Agents get absolute paths, and a restart recognises them whatever its own folder.
        config.data_dir =
            std::fs::canonicalize(&config.data_dir).map_err(|source| Error::Setup {
                what: format!("resolving `{}`", config.data_dir.display()),
                source,
            })?;
        check_owned_dir(&config.data_dir, "data folder")?;
        // Before anything in the folder is touched: one daemon per data folder.
        let data_lock = lock_data_dir(&config.data_dir)?;
        let agents_dir = config.data_dir.join("agents");
        let trash_dir = config.data_dir.join("trash");
        create_private_dir(&agents_dir)?;
        check_owned_dir(&agents_dir, "agents' folder")?;
        // Folders of removed agents that an earlier daemon did not finish deleting.
        check_owned_dir(&trash_dir, "trash folder")?;
        let _ = std::fs::remove_dir_all(&trash_dir);
        create_private_dir(&trash_dir)?;
        let specs_dir = config.data_dir.join(rebuild::SPECS);
        create_private_dir(&specs_dir)?;
        let store_dir = config.data_dir.join("store");
        check_owned_dir(&store_dir, "store folder")?;
        let rebuilding = config.recover_store == Some(StoreRecovery::Rebuild);
        // A store sled cannot read is judged with the rest, once the keeper has said what
        // it runs (`trusted_store`).
        let opened = match Store::open(&store_dir) {
            Err(Error::StoreUnreadable { problem, .. }) => Err(problem),
            other => Ok(other?),
        };
        process::become_subreaper().map_err(|source| Error::Setup {
            what: "becoming a child subreaper".into(),
            source,
        })?;
        let sigchld = signal(SignalKind::child()).map_err(|source| Error::Setup {
            what: "listening for SIGCHLD".into(),
            source,
        })?;
        // The keeper is this same executable, run with `KEEPER_ARG`.
        let program = std::env::current_exe().map_err(|source| Error::Setup {
            what: "finding agentd's own executable to run the keeper".into(),
            source,
        })?;
        let keeper_failed = |source| Error::Setup {
            what: format!("reaching the keeper in `{}`", config.data_dir.display()),
            source,
        };
        let (keeper, kept_exits, ack_sink) =
            KeeperClient::reach(&config.data_dir, &program).map_err(keeper_failed)?;
        let hello = keeper.hello().map_err(keeper_failed)?;
        let (children, exits, keeps_records) = (hello.children, hello.exits, hello.records);
        let open_files = process::raise_open_files_limit();
        let detected = if hello.cgroups {
            cgroup::detect(&config.cgroups, &config.data_dir)
        } else {
            cgroup::Detected::None(
                "the keeper that runs was started by an older agentd and cannot start agents \
                 in cgroups; new agents get cgroups once it has exited"
                    .into(),
            )
        };
        tracing::info!("containment: {}", detected.describe());
        let sampler_cgroups = match &detected {
            cgroup::Detected::Cgroups(cgroups) => Some(cgroups.clone()),
            cgroup::Detected::None(_) => None,
        };
        let audit = crate::audit::open();
        if let Err(error) = &audit {
            tracing::debug!("reading the kernel's audit records: {error}");
        }
        let sandbox = SandboxSupport::detect(hello.confines).reporting(audit.is_ok());
        tracing::info!("sandboxes: {}", sandbox.describe());
        let gateway_port = config.gateway.as_ref().map(|gateway| gateway.port);
        let system = Arc::new(os::System::new(keeper, detected, sandbox, gateway_port));
        let (store, records, rebuilt) = trusted_store(
            opened,
            rebuilding,
            (&store_dir, &specs_dir, &agents_dir),
            system.as_ref(),
            (&children, &exits),
        )?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Private even when the data folder is opened for agents of other users.
            std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| Error::Setup {
                    what: format!("making `{}` private", store_dir.display()),
                    source,
                },
            )?;
        }
        let (commands_tx, commands) = mpsc::channel(1024);
        let parts = Parts {
            os: system.clone(),
            clock: Arc::new(SystemClock),
            recorder,
            store: store.clone(),
            data_lock: Some(data_lock),
            commands: commands_tx.downgrade(),
        };
        let (
            mut task,
            Inboxes {
                adopted_exits,
                acks: ack_queue,
                denials,
                launches,
            },
        ) = SupervisorTask::new(parts, &config)?;
        let recovered_exits: Vec<i32> = exits.iter().map(|exit| exit.pid).collect();
        task.recover(KeeperState { children, exits }, records, rebuilt)?;
        task.reap();
        // What recovery learned is on disk before the keeper may forget it.
        store.flush_now()?;
        system
            .keeper()
            .ack(recovered_exits)
            .map_err(keeper_failed)?;
        task.serve_adopted_proxies();
        tokio::spawn(task.run(commands, sigchld, adopted_exits, denials, launches));
        if let Ok(socket) = audit {
            let mut denials = crate::audit::listen(socket).map_err(|source| Error::Setup {
                what: "starting the thread that reads the kernel's audit records".into(),
                source,
            })?;
            let commands = commands_tx.clone();
            tokio::spawn(async move {
                while let Some(denial) = denials.recv().await {
                    if commands.send(Command::KernelDenied(denial)).await.is_err() {
                        return;
                    }
                }
            });
        }
        tokio::spawn(forward_kept_exits(kept_exits, commands_tx.clone()));
        tokio::spawn(acknowledge_exits(
            ack_queue,
            ack_sink,
            store.clone(),
            keeps_records,
        ));

        let handle = SupervisorHandle {
            commands: commands_tx,
            store: store.clone(),
        };
        let (targets, deliver, died) = (handle.clone(), handle.clone(), handle.clone());
        sampler::start(
            config.sample_interval,
            config.log_rotation,
            sampler_cgroups,
            open_files,
            move |known| {
                let (reply, answer) = oneshot::channel();
                targets
                    .commands
                    .blocking_send(Command::SampleTargets(known, reply))
                    .ok()?;
                answer.blocking_recv().ok()
            },
            move |batch| {
                deliver
                    .commands
                    .blocking_send(Command::Samples(batch))
                    .is_ok()
            },
            move |problem| {
                let _ = died.commands.blocking_send(Command::Fatal(problem));
            },
        )
        .map_err(|source| Error::Setup {
            what: "starting the sampler thread".into(),
            source,
        })?;
        Ok(handle)
    }
}

/// agentd (often root) writes into its data folder: one that another user controls could
/// have a symbolic link put in place of `agents/` or the store and turn those writes against
/// any file on the host. Refused, before anything is written.
pub(super) fn check_owned_dir(path: &Path, what: &str) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => {}
    }
    files::check_folder(path, false).map_err(|problem| Error::Setup {
        what: format!("refusing the {what} `{}`", path.display()),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, problem),
    })
}

/// Locks the data folder for this daemon and writes its pid in the lock file, or says which
/// other one runs there.
pub(super) fn lock_data_dir(data_dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::{Read, Seek, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("agentd.lock");
    let failed = |source| Error::Setup {
        what: format!("locking `{}`", path.display()),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(failed)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(Error::DataDirTaken {
                data_dir: data_dir.to_path_buf(),
                holder: holder.trim().parse().ok(),
            });
        }
        Err((_, errno)) => return Err(failed(std::io::Error::from(errno))),
    };
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| writeln!(lock, "{}", std::process::id()))
        .map_err(failed)?;
    Ok(lock)
}

pub(super) fn create_private_dir(path: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| Error::Setup {
            what: format!("creating `{}`", path.display()),
            source,
        })
}
