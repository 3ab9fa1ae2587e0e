//! The keeper's own systemd scope: under systemd on pure cgroup v2, the keeper (and so the
//! agents) run in a delegated scope of their own, never in agentd's unit.

use std::fs;
use std::path::{Path, PathBuf};

use super::{escape_path, is_delegated, parse_mounts};

/// A new scope for the keeper of `data_dir` under systemd:
/// `agentd-keeper-var-lib-agentd.1796520000123.scope` (a name per start: a scope whose keeper
/// died lives on while its agents run, and must not stop a new keeper from starting).
pub fn keeper_scope(data_dir: &Path) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_millis())
        .unwrap_or_default();
    format!("agentd-keeper-{}.{millis}.scope", escape_path(data_dir))
}

/// The delegated scope (relative to `unified`) the running keeper of `data_dir` is in: of
/// its scopes, the newest with a process in its `keeper` leaf or at its top (a keeper just
/// started, not yet moved).
pub(super) fn keeper_scope_in_use(unified: &Path, data_dir: &Path) -> Option<PathBuf> {
    let prefix = format!("agentd-keeper-{}.", escape_path(data_dir));
    let slice = Path::new("system.slice");
    let has_processes = |dir: &Path| {
        fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|pids| !pids.trim().is_empty())
    };
    let mut scopes: Vec<(u128, PathBuf)> = fs::read_dir(unified.join(slice))
        .ok()?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let stamp = name.strip_prefix(&prefix)?.strip_suffix(".scope")?;
            Some((stamp.parse().ok()?, slice.join(&name)))
        })
        .filter(|(_, scope)| {
            let dir = unified.join(scope);
            is_delegated(&dir) && (has_processes(&dir.join("keeper")) || has_processes(&dir))
        })
        .collect();
    scopes.sort();
    scopes.pop().map(|(_, scope)| scope)
}

/// Whether a new keeper should run in a delegated systemd scope of its own
/// (`keeper_scope`): systemd is PID 1, the hierarchy is pure v2, agentd is root and was given
/// a delegated cgroup (`Delegate=yes`). Then the agents live in that scope, not in agentd's
/// unit: systemd starts a unit's new main process in the unit's cgroup, which the kernel
/// refuses once controllers are enabled there for children that still run (a restart while
/// agents run would fail with 219/CGROUP; systemd 254's `DelegateSubgroup=` is not there on
/// Debian 12 or RHEL 9).
pub fn keeper_in_scope() -> bool {
    if !Path::new("/run/systemd/system").is_dir() || !nix::unistd::geteuid().is_root() {
        return false;
    }
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let mounts = parse_mounts(&mounts);
    let Some(unified) = mounts.iter().find(|mount| mount.fstype == "cgroup2") else {
        return false;
    };
    if mounts.iter().any(|mount| mount.fstype == "cgroup") {
        return false;
    }
    fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_string))
        })
        .is_some_and(|own| is_delegated(&unified.point.join(own.trim_start_matches('/'))))
}
