//! What a test needs beyond cargo and python3, and the one place that decides whether it can
//! run here. The tests fall in three tiers:
//!
//! - everyone: cargo and python3 (agents are often Python scripts);
//! - tools (`tests/setup.sh` installs them): Python packages, grpcurl, Chromium, tmux;
//! - root: root itself, and cgroups agentd can manage (root with cgroup v2 mounted).
//!
//! A test asks `if !requires(Need::Tmux) { return; }`. When the need is missing it prints one
//! line saying what it left out and how to get it, and the test passes; with
//! `AGENTD_TEST_ALL=1` (CI sets it) a missing need fails the test instead, so nothing is
//! left out silently where everything is supposed to run.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// The environment variable that turns every skip into a failure.
pub const TEST_ALL_VAR: &str = "AGENTD_TEST_ALL";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Need {
    /// The tests run as root (other users, agents as `nobody`, chown).
    Root,
    /// agentd can manage cgroups: root, with a cgroup v2 hierarchy mounted.
    Cgroups,
    /// Debian's Chromium on PATH, where `tests/python/dashboard.py` looks for it.
    Chromium,
    /// `tmux` runs (a real terminal for `agentctl top`).
    Tmux,
    /// `grpcurl` runs.
    Grpcurl,
    /// python3 imports this module (from `tests/requirements.txt`).
    Python(&'static str),
}

impl Need {
    fn what(self) -> String {
        match self {
            Need::Root => "root".into(),
            Need::Cgroups => "cgroups agentd can manage".into(),
            Need::Chromium => "Chromium".into(),
            Need::Tmux => "tmux".into(),
            Need::Grpcurl => "grpcurl".into(),
            Need::Python(module) => format!("the Python module `{module}`"),
        }
    }

    fn how(self) -> &'static str {
        match self {
            Need::Root => "run the tests as root",
            Need::Cgroups => "run the tests as root on a host with cgroup v2 mounted",
            Need::Chromium => "tests/setup.sh installs it as root: apt-get install chromium",
            Need::Tmux => "tests/setup.sh installs it as root: apt-get install tmux",
            Need::Grpcurl | Need::Python(_) => {
                "tests/setup.sh installs it: pip install -r tests/requirements.txt"
            }
        }
    }

    fn present(self) -> bool {
        let root = nix::unistd::geteuid().is_root();
        match self {
            Need::Root => root,
            Need::Cgroups => {
                root && std::fs::read_to_string("/proc/self/mountinfo")
                    .is_ok_and(|mounts| mounts.contains(" - cgroup2 "))
            }
            Need::Chromium => ["chromium", "chromium-browser"]
                .iter()
                .any(|name| on_path(name)),
            Need::Tmux => runs("tmux", &["-V"]),
            Need::Grpcurl => runs("grpcurl", &["-version"]),
            Need::Python(module) => runs("python3", &["-c", &format!("import {module}")]),
        }
    }
}

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(program).is_file())
}

fn runs(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether the calling test can go on: `true` when `need` is met; otherwise it prints
/// `skipped TEST: needs WHAT (HOW)` and returns `false`, or fails the test under
/// `AGENTD_TEST_ALL=1`.
pub fn requires(need: Need) -> bool {
    requires_for(None, need)
}

/// As [`requires`], for one part of a test that goes on without it.
pub fn requires_in_part(part: &str, need: Need) -> bool {
    requires_for(Some(part), need)
}

fn requires_for(part: Option<&str>, need: Need) -> bool {
    static KNOWN: OnceLock<Mutex<HashMap<Need, bool>>> = OnceLock::new();
    let known = KNOWN.get_or_init(Default::default);
    let cached = known.lock().expect("needs").get(&need).copied();
    let present = cached.unwrap_or_else(|| {
        let present = need.present();
        known.lock().expect("needs").insert(need, present);
        present
    });
    if present {
        return true;
    }
    let (what, how) = (need.what(), need.how());
    if std::env::var_os(TEST_ALL_VAR).is_some_and(|value| value == "1") {
        panic!("{TEST_ALL_VAR}=1 but {what} is missing ({how})");
    }
    // libtest names each test's thread after the test.
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("a test");
    let skipped = match part {
        None => format!("skipped {test}: needs {what} ({how})\n"),
        Some(part) => format!("skipped {part} of {test}: needs {what} ({how})\n"),
    };
    // Straight to stderr: libtest would keep what `println!` prints from a passing test.
    let _ = std::io::stderr().write_all(skipped.as_bytes());
    false
}
