//! The store attacked while agentd is down and its agents run on (`--on-shutdown detach`):
//! emptied, overwritten with garbage at the start, or rolled back to an older copy. agentd
//! must refuse to start, say what it found and how to go on, and kill nothing; started with
//! `--recover-store rebuild` it adopts the agents that run and reports what it could not
//! know.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agentd_proto::v1 as pb;
use pb::AgentState;

use crate::harness::*;

const DETACH: [&str; 2] = ["--on-shutdown", "detach"];

/// Kills what a test left running in a data folder once it is done, even when it fails
/// between daemons (a `Daemon` guards only while one runs).
struct Leftovers {
    data_dir: PathBuf,
    cgroup_root: Option<PathBuf>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in processes_under(&self.data_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Some(root) = &self.cgroup_root {
            remove_cgroups(root);
        }
    }
}

/// A detaching daemon with three sleeping agents, stopped: the agents run on.
async fn agents_left_running() -> (tempfile::TempDir, Vec<pb::AgentStatus>, Leftovers) {
    let mut daemon = Daemon::builder().options(&DETACH).start().await;
    let leftovers = Leftovers {
        data_dir: daemon.data_dir.clone(),
        cgroup_root: daemon.cgroup_root.clone(),
    };
    let mut client = daemon.client().await;
    let mut agents = Vec::new();
    for id in ["a1", "a2", "a3"] {
        agents.push(spawn(&mut client, id, vec!["sleep".into(), "300".into()]).await);
    }
    drop(client);
    stop_detached(&mut daemon).await;
    (daemon.crash(), agents, leftovers)
}

async fn stop_detached(daemon: &mut Daemon) {
    let exit = daemon.terminate().await;
    assert!(exit.success(), "agentd exited with {exit}");
}

/// Starts agentd on `dir` expecting a refusal: its exit status is non-zero and its
/// stderr is returned.
async fn refused_start(dir: &Path) -> String {
    let log = dir.join("refused.log");
    let file = std::fs::File::create(&log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--socket")
        .arg(dir.join("agentd.sock"))
        .args(DETACH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("start agentd");
    // Killed if it started after all, when the wait below fails.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(child);
    let exit = eventually("agentd refuses the store and exits", async || {
        match child.0.try_wait().expect("wait agentd") {
            Some(exit) => Ok(exit),
            None => Err(Shown(std::fs::read_to_string(&log).unwrap_or_default())),
        }
    })
    .await;
    let stderr = std::fs::read_to_string(&log).expect("read the log");
    assert!(!exit.success(), "agentd exited with {exit}:\n{stderr}");
    stderr
}

/// Every regular file of the store.
fn store_files(data_dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read the store").flatten() {
            let path = entry.path();
            match entry.file_type().expect("file type").is_dir() {
                true => walk(&path, files),
                false => files.push(path),
            }
        }
    }
    let mut files = Vec::new();
    walk(&data_dir.join("store"), &mut files);
    assert!(!files.is_empty(), "the store has files");
    files
}

async fn assert_refused_and_alive(dir: &Path, agents: &[pb::AgentStatus], words: &[&str]) {
    let stderr = refused_start(dir).await;
    for word in [
        "cannot be trusted",
        "nothing was killed",
        "--recover-store rebuild",
    ]
    .iter()
    .chain(words)
    {
        assert!(stderr.contains(word), "no `{word}` in:\n{stderr}");
    }
    for agent in agents {
        assert!(
            process_exists(agent.pid as i32),
            "agent {} (pid {}) was killed:\n{stderr}",
            agent.agent_id,
            agent.pid
        );
    }
}

/// Starts with `--recover-store rebuild` and checks each agent runs, adopted, as before.
async fn rebuilt(dir: tempfile::TempDir, agents: &[pb::AgentStatus]) -> Daemon {
    let daemon = Daemon::builder()
        .dir(dir)
        .options(&["--recover-store", "rebuild"])
        .start()
        .await;
    let mut client = daemon.client().await;
    for agent in agents {
        let now = status(&mut client, &agent.agent_id).await;
        assert_eq!(
            (now.state, now.pid, now.adopted),
            (AgentState::Running as i32, agent.pid, true),
            "{now:#?}"
        );
    }
    let log = daemon.log();
    assert!(log.contains("records rebuilt"), "{log}");
    let aside = std::fs::read_dir(&daemon.data_dir)
        .expect("data folder")
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("store.damaged-")
        });
    assert!(aside, "the damaged store is kept aside");
    daemon
}

#[tokio::test]
async fn an_emptied_store_is_refused_and_its_agents_live_on() {
    let (dir, agents, _leftovers) = agents_left_running().await;
    for file in store_files(&dir.path().join("data")) {
        std::fs::File::create(&file).expect("truncate");
    }
    assert_refused_and_alive(
        dir.path(),
        &agents,
        &["agents with running processes: 3 (`a1`, `a2`, `a3`)"],
    )
    .await;
    let daemon = rebuilt(dir, &agents).await;
    kill_all(&mut daemon.client().await).await;
}

#[tokio::test]
async fn a_store_with_garbage_at_its_start_is_refused_and_its_agents_live_on() {
    use std::io::Write;
    let (dir, agents, _leftovers) = agents_left_running().await;
    for file in store_files(&dir.path().join("data")) {
        let length = std::fs::metadata(&file).expect("size").len().min(4096);
        let garbage: Vec<u8> = (0..length).map(|n| (n * 7 + 13) as u8).collect();
        let mut writing = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        writing.write_all(&garbage).expect("write garbage");
    }
    assert_refused_and_alive(
        dir.path(),
        &agents,
        &["agents with running processes: 3 (`a1`, `a2`, `a3`)"],
    )
    .await;
    let daemon = rebuilt(dir, &agents).await;
    kill_all(&mut daemon.client().await).await;
}

#[tokio::test]
async fn a_store_truncated_halfway_is_refused_and_its_agents_live_on() {
    let (dir, agents, _leftovers) = agents_left_running().await;
    for file in store_files(&dir.path().join("data")) {
        let length = std::fs::metadata(&file).expect("size").len();
        let writing = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        writing.set_len(length / 2).expect("truncate");
    }
    assert_refused_and_alive(dir.path(), &agents, &[]).await;
    let daemon = rebuilt(dir, &agents).await;
    kill_all(&mut daemon.client().await).await;
}

/// The store is copied aside, agents change, and the old copy is put back: the agent
/// that was stopped meanwhile must not silently become LOST, and the one spawned
/// meanwhile must not be killed for having no record.
#[tokio::test]
async fn a_store_rolled_back_to_an_older_copy_is_refused_and_reported() {
    rolled_back(false, &["older than its own last flush"]).await;
}

/// The same with the stamp beside the store put back too: the keeper knows the new
/// agent's record was on disk.
#[tokio::test]
async fn a_store_and_its_stamp_rolled_back_together_are_refused() {
    rolled_back(
        true,
        &["the keeper runs `a4`, whose running record was on disk"],
    )
    .await;
}

async fn rolled_back(with_stamp: bool, reasons: &[&str]) {
    let (dir, agents, _leftovers) = agents_left_running().await;
    let data = dir.path().join("data");
    let (store, copy) = (data.join("store"), dir.path().join("store-copy"));
    let (stamp, stamp_copy) = (data.join("store.generation"), dir.path().join("stamp-copy"));
    copy_dir(&store, &copy);
    std::fs::copy(&stamp, &stamp_copy).expect("copy the stamp");

    let mut daemon = Daemon::builder().dir(dir).options(&DETACH).start().await;
    let mut client = daemon.client().await;
    stop(&mut client, &["a1"], true).await;
    assert_eq!(
        status(&mut client, "a1").await.state,
        AgentState::Killed as i32
    );
    let late = spawn(&mut client, "a4", vec!["sleep".into(), "300".into()]).await;
    drop(client);
    stop_detached(&mut daemon).await;
    let dir = daemon.crash();
    std::fs::remove_dir_all(&store).expect("remove the store");
    copy_dir(&copy, &store);
    if with_stamp {
        std::fs::copy(&stamp_copy, &stamp).expect("put the stamp back");
    }

    let running = [agents[1].clone(), agents[2].clone(), late];
    let found = [
        "agent folders with no record: 1 (`a4`)",
        "agents the store says run, which do not: 1 (`a1`)",
    ];
    let words: Vec<&str> = reasons.iter().chain(&found).copied().collect();
    assert_refused_and_alive(dir.path(), &running, &words).await;
    let daemon = rebuilt(dir, &running).await;
    let mut client = daemon.client().await;
    // Its stop was acknowledged and forgotten by the keeper: only the old store knew it.
    let a1 = status(&mut client, "a1").await;
    assert_eq!(a1.state, AgentState::Lost as i32, "{a1:#?}");
    let log = daemon.log();
    for word in reasons
        .iter()
        .chain(["how they ended is unknown", "a1"].iter())
    {
        assert!(log.contains(word), "no `{word}` in:\n{log}");
    }
    kill_all(&mut client).await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read").flatten() {
        let target = to.join(entry.file_name());
        match entry.file_type().expect("file type").is_dir() {
            true => copy_dir(&entry.path(), &target),
            false => {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }
}

/// A second daemon on a data folder in use is told so plainly, not that the store is
/// damaged, and the first one and its agents go on.
#[tokio::test]
async fn a_second_daemon_on_the_same_data_folder_is_refused_plainly() {
    let daemon = Daemon::start().await;
    let mut client = daemon.client().await;
    let agent = spawn(&mut client, "a1", vec!["sleep".into(), "300".into()]).await;
    let stderr = refused_start(daemon.dir.path()).await;
    assert!(
        stderr.contains(&format!("another agentd (pid {})", daemon.pid())),
        "{stderr}"
    );
    assert!(!stderr.contains("cannot be trusted"), "{stderr}");
    let still = status(&mut client, "a1").await;
    assert_eq!(
        (still.state, still.pid),
        (AgentState::Running as i32, agent.pid)
    );
    kill_all(&mut client).await;
}
