//! Containment through cgroups: what the host offers, found once at start, and one cgroup
//! per agent under agentd's root. The unified (v2) hierarchy holds membership: joining,
//! signalling every member, `cgroup.kill`, `cgroup.events` (populated, frozen),
//! `cgroup.freeze` and `cpu.stat` work there even with no controller enabled. Limits and
//! memory accounting come from v2 controllers where they are delegated, else from the v1
//! hierarchies of a hybrid host. A host with neither keeps process groups and `setrlimit`.
//!
//! Only `os.rs` (the `System` backend) calls into this module.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::spec::Resources;
use crate::state::Containment;

mod scope;
use scope::keeper_scope_in_use;
pub use scope::{keeper_in_scope, keeper_scope};

/// `--cgroups`: use them where the host allows (`Auto`), or never (`Off`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupSetting {
    pub off: bool,
    /// `--cgroup-root`: a path inside the hierarchy, agentd's alone.
    pub root: Option<PathBuf>,
}

/// A controller agentd uses for limits and accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Cpu,
    Pids,
    Cpuset,
}

impl Controller {
    const ALL: [Controller; 4] = [
        Controller::Memory,
        Controller::Cpu,
        Controller::Pids,
        Controller::Cpuset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Cpuset => "cpuset",
        }
    }
}

/// Where a controller's files are for agentd's cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    /// Enabled in the v2 hierarchy, next to membership.
    V2,
    /// A v1 hierarchy mounted here.
    V1(PathBuf),
}

/// The host's cgroups, as agentd uses them.
#[derive(Debug, Clone)]
pub struct Cgroups {
    pub containment: Containment,
    /// The v2 hierarchy's mount point.
    unified: PathBuf,
    /// agentd's root, relative to each hierarchy's mount point.
    root: PathBuf,
    controllers: Vec<(Controller, Place)>,
    /// A folder above the root that agentd created and may remove once empty.
    created_parent: Option<PathBuf>,
    /// `cgroup.kill` (Linux 5.14); without it SIGKILL goes to each member in turn.
    /// `AGENTD_TEST_NO_CGROUP_KILL` makes agentd act as on an older kernel (for the tests).
    kill_file: bool,
}

/// What detection found: cgroups to use, or why agents keep process groups.
pub enum Detected {
    Cgroups(Cgroups),
    None(String),
}

impl Detected {
    /// One line for the ready line, the log and the summary.
    pub fn describe(&self) -> String {
        match self {
            Detected::None(why) => format!("process groups ({why})"),
            Detected::Cgroups(cgroups) => cgroups.describe(),
        }
    }
}

/// Finds what the host offers and prepares agentd's root in it.
pub fn detect(setting: &CgroupSetting, data_dir: &Path) -> Detected {
    if setting.off {
        return Detected::None("cgroups off".into());
    }
    let mounts = match fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => parse_mounts(&text),
        Err(error) => return Detected::None(format!("reading /proc/self/mountinfo: {error}")),
    };
    let Some(unified) = mounts
        .iter()
        .find(|mount| mount.fstype == "cgroup2")
        .map(|mount| mount.point.clone())
    else {
        return Detected::None("no cgroup v2 hierarchy is mounted".into());
    };
    let v1: Vec<(Controller, PathBuf)> = Controller::ALL
        .into_iter()
        .filter_map(|controller| {
            let mount = mounts.iter().find(|mount| {
                mount.fstype == "cgroup"
                    && mount
                        .options
                        .split(',')
                        .any(|option| option == controller.name())
            })?;
            Some((controller, mount.point.clone()))
        })
        .collect();
    let own = fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_else(|| "/".into());
    let own = PathBuf::from(own.trim_start_matches('/'));
    let hybrid = !v1.is_empty();
    let delegated = !hybrid && !own.as_os_str().is_empty() && is_delegated(&unified.join(&own));
    // Under systemd the keeper may run in a delegated scope of its own (`keeper_in_scope`):
    // the agents go there, so agentd's own unit never enables controllers.
    let scope = (!hybrid)
        .then(|| keeper_scope_in_use(&unified, data_dir))
        .flatten();
    let in_scope = scope.is_some();
    let scope = scope.unwrap_or_default();
    let (root, created_parent) = match &setting.root {
        Some(root) => (
            PathBuf::from(root.to_string_lossy().trim_start_matches('/')),
            None,
        ),
        None if in_scope => (scope.join("agents"), None),
        None if delegated => (own.join("agents"), None),
        None => (
            Path::new("agentd").join(escape_path(data_dir)),
            Some(PathBuf::from("agentd")),
        ),
    };
    let prepared = if hybrid {
        prepare_hybrid(&unified, &root, &v1)
    } else if in_scope && setting.root.is_none() {
        prepare_v2(&unified, &root, Some((&scope, "keeper")))
    } else {
        prepare_v2(
            &unified,
            &root,
            delegated.then_some((own.as_path(), "supervisor")),
        )
    };
    let kill_file = unified.join(&root).join("cgroup.kill").exists()
        && std::env::var_os("AGENTD_TEST_NO_CGROUP_KILL").is_none();
    match prepared {
        Ok(controllers) => Detected::Cgroups(Cgroups {
            containment: if hybrid {
                Containment::CgroupHybrid
            } else {
                Containment::CgroupV2
            },
            unified,
            root,
            controllers,
            created_parent,
            kill_file,
        }),
        Err(error) => Detected::None(format!(
            "cannot use cgroup root `/{}`: {error}",
            root.display()
        )),
    }
}

/// A hybrid host: membership in v2, controllers from v1. Creates the root in every
/// hierarchy.
fn prepare_hybrid(
    unified: &Path,
    root: &Path,
    v1: &[(Controller, PathBuf)],
) -> io::Result<Vec<(Controller, Place)>> {
    create_root(&unified.join(root))?;
    let mut controllers = Vec::new();
    for (controller, mount) in v1 {
        let made = if *controller == Controller::Cpuset {
            create_cpuset_dirs(mount, root)
        } else {
            create_root(&mount.join(root))
        };
        match made {
            Ok(()) => controllers.push((*controller, Place::V1(mount.clone()))),
            Err(error) => tracing::warn!(
                controller = controller.name(),
                %error,
                "a v1 controller is mounted but not usable; its limits will be refused"
            ),
        }
    }
    Ok(controllers)
}

/// A pure v2 host: the root's ancestors enable every controller they can for it. When the
/// root is under a delegated cgroup (agentd's own, or the keeper's scope), its processes
/// first move to a sibling leaf (`supervisor`, `keeper`), since a cgroup with processes
/// cannot enable controllers for its children.
fn prepare_v2(
    unified: &Path,
    root: &Path,
    delegated: Option<(&Path, &str)>,
) -> io::Result<Vec<(Controller, Place)>> {
    if let Some((own, leaf)) = delegated {
        let leaf = unified.join(own).join(leaf);
        fs::create_dir_all(&leaf)?;
        for pid in read_pids(&unified.join(own).join("cgroup.procs"))? {
            match fs::write(leaf.join("cgroup.procs"), pid.to_string()) {
                // Exited meanwhile.
                Err(error) if error.raw_os_error() == Some(Errno::ESRCH as i32) => {}
                other => other?,
            }
        }
    }
    create_root(&unified.join(root))?;
    // From the top down: each level enables what it has for the next.
    let mut level = unified.to_path_buf();
    let mut enabled = Vec::new();
    for part in root.components() {
        let available = fs::read_to_string(level.join("cgroup.controllers")).unwrap_or_default();
        enabled = Controller::ALL
            .into_iter()
            .filter(|c| available.split_whitespace().any(|name| name == c.name()))
            .filter(|c| {
                let line = format!("+{}", c.name());
                fs::write(level.join("cgroup.subtree_control"), line).is_ok()
                    || fs::read_to_string(level.join("cgroup.subtree_control"))
                        .is_ok_and(|text| text.split_whitespace().any(|name| name == c.name()))
            })
            .collect();
        level.push(part);
    }
    // The root's own children (the agents) get what the root enables for them.
    let available = fs::read_to_string(level.join("cgroup.controllers")).unwrap_or_default();
    let mut for_agents = Vec::new();
    for controller in enabled {
        if !available.split_whitespace().any(|n| n == controller.name()) {
            continue;
        }
        let line = format!("+{}", controller.name());
        if fs::write(level.join("cgroup.subtree_control"), line).is_ok() {
            for_agents.push((controller, Place::V2));
        }
    }
    Ok(for_agents)
}

/// Creates the root's folders in a v1 cpuset hierarchy: a new cpuset is empty until its
/// CPUs and memory nodes are copied from its parent.
fn create_cpuset_dirs(mount: &Path, root: &Path) -> io::Result<()> {
    racing_removal(|| {
        let mut level = mount.to_path_buf();
        for part in root.components() {
            let parent = level.clone();
            level.push(part);
            match fs::create_dir(&level) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(error),
            }
            copy_cpuset(&parent, &level)?;
        }
        Ok(())
    })
}

/// Creates agentd's root and the folders above it.
fn create_root(dir: &Path) -> io::Result<()> {
    racing_removal(|| fs::create_dir_all(dir))
}

/// Another daemon that shuts down removes the shared `agentd` folder once it is empty, which
/// may happen between the creation of that folder and of ours inside it: then try again.
fn racing_removal(mut create: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match create() {
            Err(error) if error.kind() == io::ErrorKind::NotFound && tries < 8 => tries += 1,
            other => return other,
        }
    }
}

fn copy_cpuset(parent: &Path, child: &Path) -> io::Result<()> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let value = fs::read_to_string(parent.join(file))?;
        fs::write(child.join(file), value.trim())?;
    }
    Ok(())
}

/// systemd's test for a delegated cgroup: the `trusted.delegate` (or, for a user's
/// manager, `user.delegate`) attribute on its folder.
fn is_delegated(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    ["trusted.delegate", "user.delegate"].iter().any(|name| {
        let Ok(name) = std::ffi::CString::new(*name) else {
            return false;
        };
        let mut value = [0u8; 8];
        // SAFETY: both strings are NUL-terminated and the buffer's length is passed along.
        let len = unsafe {
            nix::libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        len > 0 && value[0] == b'1'
    })
}

/// `systemd-escape --path`: `/var/lib/agentd` → `var-lib-agentd`, one folder name per
/// data folder, so two daemons on one host never share a root.
pub fn escape_path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    let trimmed = bytes.strip_prefix(b"/").unwrap_or(bytes);
    let trimmed = trimmed.strip_suffix(b"/").unwrap_or(trimmed);
    let mut name = String::new();
    for (i, &byte) in trimmed.iter().enumerate() {
        match byte {
            b'/' => name.push('-'),
            b'.' if i == 0 => name.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => {
                name.push(char::from(byte));
            }
            other => name.push_str(&format!("\\x{other:02x}")),
        }
    }
    if name.is_empty() { "-".into() } else { name }
}

/// One mount of `/proc/self/mountinfo`.
struct Mount {
    point: PathBuf,
    fstype: String,
    /// Super-block options: a v1 hierarchy lists its controllers there.
    options: String,
}

fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = mount.split(' ').nth(4)?;
            let mut fs = fs.split(' ');
            let fstype = fs.next()?.to_string();
            let options = fs.nth(1)?.to_string();
            Some(Mount {
                point: PathBuf::from(unescape_mount(point)),
                fstype,
                options,
            })
        })
        .collect()
}

/// Mount points in mountinfo write space, tab, newline and backslash as octal escapes.
fn unescape_mount(text: &str) -> String {
    let mut out = Vec::with_capacity(text.len());
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len() + 1
            && let Some(code) = text
                .get(i + 1..i + 4)
                .and_then(|octal| u8::from_str_radix(octal, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_pids(path: &Path) -> io::Result<Vec<i32>> {
    Ok(fs::read_to_string(path)?
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect())
}

/// One `key value` line of a flat-keyed cgroup file (`cgroup.events`, `memory.events`,
/// `cpu.stat`, `memory.oom_control`).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

fn absent(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound
}

/// Where a new agent process goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joins {
    /// Its v2 cgroup folder, which the process is cloned into.
    pub v2: PathBuf,
    /// v1 `cgroup.procs` files it writes itself into between clone and exec.
    pub v1_procs: Vec<PathBuf>,
}

/// What an agent's cgroup holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// Memory charged to the cgroup (resident and page cache), when a memory controller
    /// counts it.
    pub memory_bytes: Option<u64>,
    pub members: Vec<i32>,
    pub threads: u32,
}

/// `usage_usec` of a `cpu.stat`.
pub fn usage_usec(cpu_stat: &[u8]) -> Option<u64> {
    keyed(std::str::from_utf8(cpu_stat).ok()?, "usage_usec")
}

impl Cgroups {
    pub fn describe(&self) -> String {
        let controllers: Vec<String> = self
            .controllers
            .iter()
            .map(|(controller, place)| match place {
                Place::V2 => controller.name().to_string(),
                Place::V1(_) => format!("{} (v1)", controller.name()),
            })
            .collect();
        let kind = match self.containment {
            Containment::CgroupHybrid => "hybrid",
            _ => "v2",
        };
        format!(
            "cgroup {kind} at {}, root /{}, controllers: {}{}",
            self.unified.display(),
            self.root.display(),
            if controllers.is_empty() {
                "none".into()
            } else {
                controllers.join(", ")
            },
            if self.kill_file {
                ""
            } else {
                "; no cgroup.kill (SIGKILL to each member)"
            }
        )
    }

    /// agentd's root, relative to each hierarchy's mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The cgroup of an agent, relative to each hierarchy.
    pub fn path_of(&self, agent_id: &str) -> PathBuf {
        self.root.join(agent_id)
    }

    fn place(&self, controller: Controller) -> Option<&Place> {
        self.controllers
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, place)| place)
    }

    pub fn has(&self, controller: Controller) -> bool {
        self.place(controller).is_some()
    }

    /// The controller is a v2 one (v2-only limits such as `memory.high` work).
    pub fn v2(&self, controller: Controller) -> bool {
        self.place(controller) == Some(&Place::V2)
    }

    /// The folder of `controller`'s files for the cgroup `rel`.
    fn dir(&self, controller: Controller, rel: &Path) -> Option<PathBuf> {
        match self.place(controller)? {
            Place::V2 => Some(self.unified.join(rel)),
            Place::V1(mount) => Some(mount.join(rel)),
        }
    }

    fn v1_dirs(&self, rel: &Path) -> impl Iterator<Item = (Controller, PathBuf)> + '_ {
        let rel = rel.to_path_buf();
        self.controllers
            .iter()
            .filter_map(move |(controller, place)| match place {
                Place::V1(mount) => Some((*controller, mount.join(&rel))),
                Place::V2 => None,
            })
    }

    /// Creates the agent's cgroup with its limits. Returns where the new process goes: the
    /// v2 folder (it is born there, `CLONE_INTO_CGROUP`) and the v1 `cgroup.procs` files it
    /// writes itself into before it runs the agent's command.
    pub fn prepare(&self, rel: &Path, resources: &Resources) -> io::Result<Joins> {
        let v2 = self.unified.join(rel);
        if v2.exists() {
            // A restart: a fresh cgroup, so its counters (OOM kills) start at zero. One that
            // still holds a process of the earlier run is kept.
            let _ = self.remove(rel);
        }
        create_dir(&v2)?;
        let mut v1_procs = Vec::new();
        for (controller, dir) in self.v1_dirs(rel) {
            // Each v1 cgroup costs a mkdir and a migration on the spawn path: only for an
            // agent with a limit of that controller.
            let needed = match controller {
                Controller::Memory => resources.memory_max_mb.is_some(),
                Controller::Cpu => resources.cpu_max_cores.is_some(),
                Controller::Pids => resources.pids_max.is_some(),
                Controller::Cpuset => !resources.cpus.is_empty(),
            };
            if !needed {
                continue;
            }
            if controller == Controller::Cpuset {
                if create_dir(&dir)?
                    && let Some(parent) = dir.parent()
                {
                    copy_cpuset(parent, &dir)?;
                }
            } else {
                create_dir(&dir)?;
            }
            v1_procs.push(dir.join("cgroup.procs"));
        }
        self.write_limits(rel, resources)?;
        Ok(Joins { v2, v1_procs })
    }

    fn write_limits(&self, rel: &Path, resources: &Resources) -> io::Result<()> {
        let write = |controller: Controller, file: &str, value: String| -> io::Result<()> {
            let Some(dir) = self.dir(controller, rel) else {
                return Ok(());
            };
            fs::write(dir.join(file), &value).map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!("writing {value} to {}: {error}", dir.join(file).display()),
                )
            })
        };
        let v2 = |controller| self.place(controller) == Some(&Place::V2);
        if v2(Controller::Memory) {
            // The whole agent is one unit: an OOM kill takes all of it.
            write(Controller::Memory, "memory.oom.group", "1".into())?;
        }
        // A new cgroup has no limit: only the ones asked for are written.
        if let Some(max) = resources.memory_max_bytes() {
            if v2(Controller::Memory) {
                write(Controller::Memory, "memory.max", max.to_string())?;
                // The limit is on memory, not memory plus swap.
                let _ = write(Controller::Memory, "memory.swap.max", "0".into());
            } else {
                write(Controller::Memory, "memory.limit_in_bytes", max.to_string())?;
                // memsw (memory plus swap) exists only with swap accounting on.
                let memsw = self
                    .dir(Controller::Memory, rel)
                    .map(|dir| dir.join("memory.memsw.limit_in_bytes"))
                    .filter(|file| file.exists());
                if let Some(file) = memsw {
                    fs::write(file, max.to_string())?;
                }
            }
        }
        if let Some(high) = resources.memory_high_mb.map(mb_to_bytes) {
            write(Controller::Memory, "memory.high", high.to_string())?;
        }
        if let Some(cores) = resources.cpu_max_cores {
            const PERIOD: u64 = 100_000;
            let quota = ((cores * PERIOD as f64).round() as u64).max(1000);
            if v2(Controller::Cpu) {
                write(Controller::Cpu, "cpu.max", format!("{quota} {PERIOD}"))?;
            } else {
                write(Controller::Cpu, "cpu.cfs_period_us", PERIOD.to_string())?;
                write(Controller::Cpu, "cpu.cfs_quota_us", quota.to_string())?;
            }
        }
        if let Some(pids) = resources.pids_max {
            write(Controller::Pids, "pids.max", pids.to_string())?;
        }
        if !resources.cpus.is_empty() {
            let list: Vec<String> = resources.cpus.iter().map(u32::to_string).collect();
            write(Controller::Cpuset, "cpuset.cpus", list.join(","))?;
        }
        Ok(())
    }

    /// The members of the cgroup; empty once it is gone.
    pub fn members(&self, rel: &Path) -> Vec<i32> {
        read_pids(&self.unified.join(rel).join("cgroup.procs")).unwrap_or_default()
    }

    /// Signals every member. SIGKILL goes through `cgroup.kill`, which also catches a
    /// process forked meanwhile. `Ok(false)`: no member was left.
    pub fn signal(&self, rel: &Path, signal: Signal) -> io::Result<bool> {
        let dir = self.unified.join(rel);
        if signal == Signal::SIGKILL && self.kill_file {
            match fs::write(dir.join("cgroup.kill"), "1") {
                Ok(()) => return Ok(self.populated(rel)),
                Err(error) if absent(&error) && !dir.exists() => return Ok(false),
                // A kernel before 5.14: signal one by one.
                Err(error) if absent(&error) => {}
                Err(error) => return Err(error),
            }
        }
        let members = self.members(rel);
        for &pid in &members {
            match kill(Pid::from_raw(pid), signal) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => return Err(errno.into()),
            }
        }
        Ok(!members.is_empty())
    }

    /// Is any process (zombies aside) left in the cgroup?
    pub fn populated(&self, rel: &Path) -> bool {
        fs::read_to_string(self.events_file(rel))
            .ok()
            .and_then(|text| keyed(&text, "populated"))
            .is_some_and(|populated| populated == 1)
    }

    /// `cgroup.events`: modified when the cgroup empties or is frozen (watched with
    /// inotify).
    pub fn events_file(&self, rel: &Path) -> PathBuf {
        self.unified.join(rel).join("cgroup.events")
    }

    /// Freezes or thaws every member (v2 `cgroup.freeze`, which works without
    /// controllers).
    pub fn freeze(&self, rel: &Path, frozen: bool) -> io::Result<()> {
        fs::write(
            self.unified.join(rel).join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    /// How many times the kernel's OOM killer killed a member.
    pub fn oom_kills(&self, rel: &Path) -> u64 {
        let Some(dir) = self.dir(Controller::Memory, rel) else {
            return 0;
        };
        let (file, key) = match self.place(Controller::Memory) {
            Some(Place::V2) => ("memory.events", "oom_kill"),
            _ => ("memory.oom_control", "oom_kill"),
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| keyed(&text, key))
            .unwrap_or(0)
    }

    /// `cpu.stat`, there in v2 even without controllers: it tells whether anything in the
    /// cgroup ran.
    pub fn cpu_stat_file(&self, rel: &Path) -> PathBuf {
        self.unified.join(rel).join("cpu.stat")
    }

    /// Memory charged to the cgroup (resident and page cache), where a memory controller
    /// counts it; the processes and threads in it.
    pub fn usage(&self, rel: &Path) -> Usage {
        let threads = fs::read(self.unified.join(rel).join("cgroup.threads"))
            .map(|bytes| bytes.iter().filter(|&&b| b == b'\n').count() as u32)
            .unwrap_or(0);
        Usage {
            memory_bytes: self.memory_bytes(rel),
            members: self.members(rel),
            threads,
        }
    }

    /// Memory charged to the cgroup, where a memory controller counts it for this agent.
    pub fn memory_bytes(&self, rel: &Path) -> Option<u64> {
        match self.place(Controller::Memory)? {
            Place::V2 => read_number(&self.unified.join(rel).join("memory.current")),
            Place::V1(mount) => read_number(&mount.join(rel).join("memory.usage_in_bytes")),
        }
    }

    /// Removes an agent's cgroup from every hierarchy. Fails (and leaves it) while a
    /// process is in it.
    pub fn remove(&self, rel: &Path) -> io::Result<()> {
        let mut result = Ok(());
        for dir in std::iter::once(self.unified.join(rel)).chain(self.v1_dirs(rel).map(|(_, d)| d))
        {
            match fs::remove_dir(&dir) {
                Err(error) if !absent(&error) => result = Err(error),
                _ => {}
            }
        }
        result
    }

    /// The agents' cgroups under the root, by name.
    pub fn agent_cgroups(&self) -> Vec<String> {
        fs::read_dir(self.unified.join(&self.root))
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let entry = entry.ok()?;
                entry.file_type().ok()?.is_dir().then_some(())?;
                entry.file_name().into_string().ok()
            })
            .collect()
    }

    /// Removes agentd's root (and the folder above it that agentd created) once no agent's
    /// cgroup is left in it.
    pub fn remove_root(&self) {
        let mut dirs = vec![self.root.clone()];
        dirs.extend(self.created_parent.clone());
        for rel in dirs {
            let _ = self.remove(&rel);
        }
    }
}

/// Creates a cgroup folder; `true` when it is new.
fn create_dir(dir: &Path) -> io::Result<bool> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) => Err(error),
    }
}

fn read_number(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn mb_to_bytes(mb: f64) -> u64 {
    (mb * 1024.0 * 1024.0).round() as u64
}

impl Resources {
    pub(crate) fn memory_max_bytes(&self) -> Option<u64> {
        self.memory_max_mb.map(mb_to_bytes)
    }
}

/// Writes this process into each cgroup: for between `fork` and `exec`, so it allocates
/// nothing and calls only `write`. `procs` are descriptors opened before the fork.
pub fn join_self(procs: &[i32]) -> io::Result<()> {
    for &fd in procs {
        // SAFETY: `fd` is an open descriptor of a `cgroup.procs` file, and the buffer is a
        // static byte string.
        let written = unsafe { nix::libc::write(fd, b"0".as_ptr().cast(), 1) };
        if written < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
