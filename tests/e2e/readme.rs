//! README.md's quickstart, run as written: every `sh` and `python` block of its "Quickstart"
//! section, in order, in one bash script (`set -euo pipefail`: any failing command fails the
//! test), against a fresh daemon that the README's own command starts. So the README cannot
//! drift from what agentd and agentctl do.
//!
//! What the test changes, and only that: `HOME` is a temporary folder (so `~/.local/state/agentd`
//! is a fresh daemon's, and no `XDG_STATE_HOME` or `AGENTD_*` variable is passed on); the
//! `PATH` starts with this build's `agentd` and `agentctl` instead of the install block, which
//! is not run (marked `readme-test: not run`); the port `8080` becomes a free one; the block
//! marked `readme-test: in the background` runs in the background until its ready line; the
//! blocks run in a temporary copy of `examples/` and `proto/`, as from the repository's root.

use std::fmt::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// The whole quickstart, from the daemon's start to the last block.
const QUICKSTART_DEADLINE: Duration = Duration::from_secs(240);

#[derive(Debug, PartialEq)]
enum Run {
    Foreground,
    Background,
    Not,
}

#[derive(Debug)]
struct Block {
    line: usize,
    python: bool,
    run: Run,
    text: String,
}

/// The `sh` and `python` blocks between `## Quickstart` and the next `## ` heading, each with
/// what the HTML comment just before it says of how to run it.
fn quickstart_blocks(readme: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut inside = false;
    let mut marker = Run::Foreground;
    let mut open: Option<Block> = None;
    for (index, line) in readme.lines().enumerate() {
        if let Some(block) = &mut open {
            if line == "```" {
                blocks.extend(open.take());
            } else {
                block.text += line;
                block.text.push('\n');
            }
            continue;
        }
        if line.starts_with("## ") {
            inside = line == "## Quickstart";
            continue;
        }
        if !inside {
            continue;
        }
        if line.starts_with("<!-- readme-test: not run") {
            marker = Run::Not;
        } else if line.starts_with("<!-- readme-test: in the background") {
            marker = Run::Background;
        } else if let Some(language) = line.strip_prefix("```") {
            assert!(
                matches!(language, "sh" | "python"),
                "README.md line {}: a quickstart block in `{language}`: the test runs sh and python",
                index + 1
            );
            open = Some(Block {
                line: index + 1,
                python: language == "python",
                run: std::mem::replace(&mut marker, Run::Foreground),
                text: String::new(),
            });
        }
    }
    assert!(
        open.is_none(),
        "README.md: a quickstart block is not closed"
    );
    blocks
}

/// One bash script running the blocks in order; the daemon is stopped (SIGTERM: its agents
/// with it) when the script ends, however it ends.
fn script(blocks: &[Block], port: u16) -> String {
    let mut script = String::from(
        "set -euo pipefail\n\
         trap 'echo \"failed (exit $?): $BASH_COMMAND\" >&2' ERR\n\
         stop_daemon() { [ -z \"${daemon:-}\" ] || { kill -TERM \"$daemon\"; wait \"$daemon\" || true; }; }\n\
         trap stop_daemon EXIT\n",
    );
    for block in blocks {
        let text = block
            .text
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        let _ = writeln!(script, "echo '--- README.md line {}'", block.line);
        match (&block.run, block.python) {
            (Run::Not, _) => {}
            (Run::Background, _) => {
                let _ = write!(
                    script,
                    "{{\n{text}}} > daemon.log 2>&1 &\n\
                     daemon=$!\n\
                     until grep -q ' ready on ' daemon.log; do\n\
                       kill -0 \"$daemon\" 2>/dev/null || {{ cat daemon.log; exit 1; }}\n\
                       sleep 0.05\n\
                     done\n\
                     grep ' ready on ' daemon.log\n"
                );
            }
            (Run::Foreground, true) => {
                let _ = write!(script, "python3 - <<'README_PYTHON'\n{text}README_PYTHON\n");
            }
            (Run::Foreground, false) => script.push_str(&text),
        }
    }
    script.push_str("echo '--- every block ran'\n");
    script
}

fn copy_folder(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create folder");
    for entry in std::fs::read_dir(from).expect("read folder") {
        let entry = entry.expect("folder entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_folder(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

#[test]
fn quickstart_blocks_are_found_and_marked() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let blocks = quickstart_blocks(&readme);
    let runs: Vec<&Run> = blocks.iter().map(|b| &b.run).collect();
    assert_eq!(
        runs[..2],
        [&Run::Not, &Run::Background],
        "install, then the daemon"
    );
    assert!(blocks[1].text.starts_with("agentd "), "{:?}", blocks[1]);
    assert!(blocks.iter().any(|b| b.python), "a Python block");
    assert!(
        blocks.iter().any(|b| b.text.contains("grpcurl ")),
        "a grpcurl block"
    );
    assert!(
        blocks.iter().any(|b| b.text.contains("curl -fsS")),
        "a curl block"
    );
}

#[tokio::test]
async fn readme_quickstart_runs_verbatim_on_a_fresh_daemon() {
    if !requires(Need::Grpcurl) || !requires(Need::Python("grpc_tools")) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let blocks = quickstart_blocks(&readme);
    let home = tempfile::tempdir().expect("temporary HOME");
    let work = tempfile::tempdir().expect("temporary working folder");
    for folder in ["examples", "proto"] {
        copy_folder(&root.join(folder), &work.path().join(folder));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let bin = agentctl_path().parent().expect("the target folder");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = std::process::Command::new("bash");
    command
        .arg("-c")
        .arg(script(&blocks, port))
        .current_dir(work.path())
        .env("HOME", home.path())
        .env("PATH", path)
        .env_remove("XDG_STATE_HOME")
        .process_group(0);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AGENTD_") {
            command.env_remove(name);
        }
    }
    // pyenv's shims (python3, grpcurl from pip) find their versions under the real HOME.
    if std::env::var_os("PYENV_ROOT").is_none()
        && let Some(real_home) = std::env::var_os("HOME")
    {
        let pyenv = Path::new(&real_home).join(".pyenv");
        if pyenv.is_dir() {
            command.env("PYENV_ROOT", pyenv);
        }
    }
    let log = |name: &str| std::fs::File::create(work.path().join(name)).expect("log file");
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(log("stdout.log"))
        .stderr(log("stderr.log"))
        .spawn()
        .expect("running bash");
    let deadline = std::time::Instant::now() + QUICKSTART_DEADLINE;
    let status = loop {
        match child.try_wait().expect("waiting for bash") {
            Some(status) => break Some(status),
            None if std::time::Instant::now() > deadline => break None,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    // Whatever the script left (the daemon, when it did not end), then the agents and keeper.
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    let _ = child.wait();
    let data_dir = home.path().join(".local/state/agentd");
    let daemon_log = std::fs::read_to_string(work.path().join("daemon.log")).unwrap_or_default();
    kill_agents_under(&data_dir);
    if let Some(root) = daemon_log
        .split_once(", root ")
        .and_then(|(_, rest)| rest.split(',').next())
    {
        remove_cgroups(Path::new(root));
    }
    let read = |name: &str| std::fs::read_to_string(work.path().join(name)).unwrap_or_default();
    let (stdout, stderr) = (read("stdout.log"), read("stderr.log"));
    let Some(status) = status else {
        panic!(
            "the quickstart took longer than {QUICKSTART_DEADLINE:?}:\n{stdout}\nstderr:\n\
             {stderr}\ndaemon:\n{daemon_log}"
        )
    };
    assert!(
        status.success() && stdout.contains("--- every block ran"),
        "README.md's quickstart failed ({status}):\n{stdout}\nstderr:\n{stderr}\ndaemon:\n\
         {daemon_log}"
    );
    // What the blocks say happened did: the progress agent completed, the crashing one failed
    // with its own code after its restarts, the stubborn one needed SIGKILL, and the Python
    // client saw its agent complete.
    assert!(
        stdout
            .lines()
            .any(|line| line.starts_with("stubborn ") && line.contains(" killed ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("researcher-1: COMPLETED, exit 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("flaky failed with exit status 3"),
        "{stdout}"
    );
    assert!(stdout.contains("hello from a job"), "{stdout}");
    assert!(stdout.contains("AGENT_STATE_COMPLETED"), "{stdout}");
}
