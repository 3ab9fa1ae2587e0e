//! Confinement of one sandboxed agent, set up by its own process between clone and exec:
//! its network namespace, a mount namespace that hides what it may not reach, no
//! capabilities, a Landlock domain for its files and a seccomp filter for its system calls.
//!
//! The keeper turns a [`Confinement`] into plain values before the clone ([`Prepared`]): the
//! Landlock ruleset is built and the seccomp program compiled there, and the mount namespace
//! becomes a list of [`Step`]s of prepared strings. The child then only makes system calls.
//!
//! Below Landlock ABI 6 (Linux 6.12), which scopes signals to the sandbox, the agent runs in a
//! PID namespace of its own (see `launch.rs`), with its own `/proc`: it can name no process
//! outside it, so it can signal none (agentd, the keeper, other agents, whatever else runs as
//! its user).
//!
//! Why a mount namespace as well as Landlock: Landlock (before ABI 9) has no right for
//! connecting to a Unix socket by path, so agentd's own socket, the keeper's and every other
//! socket on the host would stay reachable. Every top-level folder that is not a system folder
//! is covered by an empty read-only tmpfs, with the paths the agent may use bound back in;
//! `/tmp` and `/dev/shm` are private tmpfs; secrets inside the system folders (`/etc/shadow`,
//! SSH host keys) are covered by `/dev/null` or an empty tmpfs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::libc;
use serde::{Deserialize, Serialize};

mod seccomp;

pub use seccomp::syscall_name;
use seccomp::{clone3_enosys, seccomp_cached};

/// Top-level folders an agent sees as the host has them (Landlock still decides what it may
/// do in them).
const SYSTEM: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "sys",
];

/// Private, writable, empty at start: each sandboxed agent has its own.
const PRIVATE: &[&str] = &["/tmp", "/dev/shm"];

/// Read and executed by every sandboxed agent.
const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/proc",
    "/sys/devices/system/cpu",
];

/// Device files every program may open for reading and writing.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// Secrets inside the system folders, covered wherever they exist.
const SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/security/opasswd",
    "/etc/krb5.keytab",
    "/etc/ssl/private",
    "/etc/sudoers",
    "/etc/sudoers.d",
];

/// The first descriptor number the mount steps hold paths at.
const HOLD_BASE: i32 = 900;

/// What agentd asks the keeper to confine an agent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// The network namespace to join, as a path the keeper can open
    /// (`/proc/AGENTD/fd/N`); `None` keeps the host's network.
    pub net_ns: Option<PathBuf>,
    /// Read and executed beneath these (besides the system folders).
    pub read: Vec<PathBuf>,
    /// Read, written, created and removed beneath these.
    pub write: Vec<PathBuf>,
    /// Whether the agent may create namespaces (`unshare`, `setns`, `clone` with `CLONE_NEW*`).
    pub namespaces: bool,
}

/// One mount-namespace operation, made of values prepared before the clone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Open `path` (`O_PATH`) as descriptor `slot`, before what hides it is mounted.
    Hold {
        path: CString,
        slot: i32,
    },
    /// An empty tmpfs on `target` (`options`: its mode and size).
    Tmpfs {
        target: CString,
        options: CString,
    },
    MakeDir {
        path: CString,
    },
    /// An empty file to bind a file onto.
    MakeFile {
        path: CString,
    },
    /// Binds `source` (`/proc/self/fd/SLOT` or `/dev/null`) onto `target`, with what is
    /// mounted below it.
    Bind {
        source: CString,
        target: CString,
    },
    /// Makes the mount at `target` read-only (`bind`: a bind mount).
    ReadOnly {
        target: CString,
        bind: bool,
    },
}

/// What the host's root holds, as the plan needs it.
pub(crate) struct HostView {
    /// Top-level folders (not symbolic links).
    pub top_dirs: Vec<String>,
    /// Secrets that exist: path and whether it is a folder.
    pub secrets: Vec<(PathBuf, bool)>,
}

impl HostView {
    pub(crate) fn read() -> io::Result<HostView> {
        let mut top_dirs = Vec::new();
        for entry in std::fs::read_dir("/")? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                top_dirs.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        top_dirs.sort();
        let mut secrets = Vec::new();
        let mut note = |path: PathBuf| {
            if let Ok(meta) = std::fs::symlink_metadata(&path)
                && !meta.file_type().is_symlink()
            {
                secrets.push((path, meta.is_dir()));
            }
        };
        SECRETS.iter().for_each(|path| note(PathBuf::from(path)));
        // SSH host keys: every `*_key` (the `.pub` halves are public).
        if let Ok(entries) = std::fs::read_dir("/etc/ssh") {
            for entry in entries.flatten() {
                if entry.file_name().as_bytes().ends_with(b"_key") {
                    note(entry.path());
                }
            }
        }
        // The system log socket, where one exists.
        if std::fs::symlink_metadata("/dev/log").is_ok() {
            note(PathBuf::from("/dev/log"));
        }
        Ok(HostView { top_dirs, secrets })
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

/// The mount steps that leave `allowed` (canonical, absolute) and the system folders in
/// view, and nothing else of the host's top-level folders.
pub(crate) fn mount_plan(allowed: &[PathBuf], host: &HostView) -> io::Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut slot = HOLD_BASE;
    // Where the hiding tmpfs go: every top-level folder not a system one and not allowed
    // whole, and the private ones; each with the allowed paths beneath it.
    let mut covers: Vec<(PathBuf, bool)> = host
        .top_dirs
        .iter()
        .filter(|name| !SYSTEM.contains(&name.as_str()) && name.as_str() != "tmp")
        .map(|name| (Path::new("/").join(name), false))
        .filter(|(top, _)| !allowed.iter().any(|path| path == top))
        .collect();
    covers.extend(PRIVATE.iter().map(|path| (PathBuf::from(path), true)));
    for (cover, private) in covers {
        if !cover.is_dir() {
            continue;
        }
        // Beneath this cover, and not beneath another allowed path (that one brings it).
        let kept: Vec<&PathBuf> = allowed
            .iter()
            .filter(|path| path.starts_with(&cover) && **path != cover)
            .filter(|path| {
                !allowed
                    .iter()
                    .any(|other| other != *path && other != &cover && path.starts_with(other))
            })
            .collect();
        let first = slot;
        for path in &kept {
            steps.push(Step::Hold {
                path: c_path(path)?,
                slot,
            });
            slot += 1;
        }
        let options = if private {
            "mode=1777,size=50%"
        } else {
            "mode=0755,size=64k"
        };
        steps.push(Step::Tmpfs {
            target: c_path(&cover)?,
            options: CString::new(options).map_err(io::Error::other)?,
        });
        for (index, path) in kept.iter().enumerate() {
            let relative = path.strip_prefix(&cover).map_err(io::Error::other)?;
            let mut at = cover.clone();
            let parts: Vec<_> = relative.components().collect();
            for (depth, part) in parts.iter().enumerate() {
                at.push(part);
                let last = depth + 1 == parts.len();
                if last && !path.is_dir() {
                    steps.push(Step::MakeFile { path: c_path(&at)? });
                } else {
                    steps.push(Step::MakeDir { path: c_path(&at)? });
                }
            }
            steps.push(Step::Bind {
                source: CString::new(format!("/proc/self/fd/{}", first + index as i32))
                    .map_err(io::Error::other)?,
                target: c_path(path)?,
            });
        }
        if !private {
            steps.push(Step::ReadOnly {
                target: c_path(&cover)?,
                bind: false,
            });
        }
    }
    for (secret, is_dir) in &host.secrets {
        // A secret the agent was given explicitly stays in view.
        if allowed.iter().any(|path| secret.starts_with(path)) {
            continue;
        }
        let target = c_path(secret)?;
        if *is_dir {
            steps.push(Step::Tmpfs {
                target: target.clone(),
                options: CString::new("mode=0000,size=4k").map_err(io::Error::other)?,
            });
            steps.push(Step::ReadOnly {
                target,
                bind: false,
            });
        } else {
            steps.push(Step::Bind {
                source: CString::new("/dev/null").map_err(io::Error::other)?,
                target: target.clone(),
            });
            steps.push(Step::ReadOnly { target, bind: true });
        }
    }
    Ok(steps)
}

/// A [`Confinement`] turned into values the child only passes to system calls.
pub(crate) struct Prepared {
    net_ns: Option<OwnedFd>,
    steps: Vec<Step>,
    landlock: OwnedFd,
    /// Landlock rules added once the mounts are in place (a rule made before would name the
    /// host's folder, not the agent's own): the private folders (every right the ruleset
    /// handles) and, in a PID namespace, the agent's own `/proc` (read).
    after_mounts: Vec<(CString, u64)>,
    /// `landlock_restrict_self` flags: denials after the exec logged, where the kernel can.
    landlock_flags: u32,
    seccomp: Vec<seccompiler::sock_filter>,
    /// `clone3` answered `ENOSYS` (unless namespaces are allowed), in a filter of its own
    /// that is not logged: every fork tries it first, and that is no denial.
    quiet: Option<[seccompiler::sock_filter; 4]>,
    /// Landlock cannot scope signals on this kernel: the agent gets a PID namespace and a
    /// `/proc` of its own.
    pub(crate) pid_namespace: bool,
}

impl Prepared {
    /// In the keeper, before the clone.
    pub(crate) fn new(confinement: &Confinement) -> io::Result<Prepared> {
        let net_ns = match &confinement.net_ns {
            Some(path) => Some(OwnedFd::from(std::fs::File::open(path)?)),
            None => None,
        };
        let mut allowed: Vec<PathBuf> = confinement.read.clone();
        allowed.extend(confinement.write.iter().cloned());
        let steps = mount_plan(&allowed, &HostView::read()?)?;
        let pid_namespace = landlock_abi() < LANDLOCK_SCOPES_ABI;
        let (all, read) = rights();
        let mut after_mounts = PRIVATE
            .iter()
            .map(|path| Ok((c_path(Path::new(path))?, all)))
            .collect::<io::Result<Vec<_>>>()?;
        if pid_namespace {
            after_mounts.push((c"/proc".into(), read));
        }
        Ok(Prepared {
            net_ns,
            steps,
            landlock: landlock_ruleset(&confinement.read, &confinement.write)?,
            after_mounts,
            landlock_flags: if landlock_abi() >= 7 {
                LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON
            } else {
                0
            },
            seccomp: seccomp_cached(confinement.namespaces)?,
            quiet: (!confinement.namespaces).then(clone3_enosys),
            pid_namespace,
        })
    }

    /// In the child, as root, before its limits and its user: the namespaces. `cwd` is
    /// entered again afterwards, so it is the path as the new mounts show it.
    pub(crate) fn enter(&self, cwd: &CString) -> io::Result<()> {
        let check = |result: libc::c_int| {
            if result < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: system calls on descriptors and strings that live until exec.
        unsafe {
            if let Some(net) = &self.net_ns {
                check(libc::setns(net.as_raw_fd(), libc::CLONE_NEWNET))?;
            }
            check(libc::unshare(libc::CLONE_NEWNS))?;
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for step in &self.steps {
                match step {
                    Step::Hold { path, slot } => {
                        let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                        check(fd)?;
                        check(libc::dup3(fd, *slot, libc::O_CLOEXEC))?;
                        libc::close(fd);
                    }
                    Step::Tmpfs { target, options } => check(libc::mount(
                        c"tmpfs".as_ptr(),
                        target.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        options.as_ptr().cast(),
                    ))?,
                    Step::MakeDir { path } => {
                        if libc::mkdir(path.as_ptr(), 0o755) < 0
                            && *libc::__errno_location() != libc::EEXIST
                        {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Step::MakeFile { path } => {
                        let fd = libc::open(
                            path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        check(fd)?;
                        libc::close(fd);
                    }
                    Step::Bind { source, target } => check(libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?,
                    Step::ReadOnly { target, bind } => {
                        let flags = libc::MS_REMOUNT
                            | libc::MS_RDONLY
                            | libc::MS_NOSUID
                            | libc::MS_NODEV
                            | if *bind { libc::MS_BIND } else { 0 };
                        check(libc::mount(
                            std::ptr::null(),
                            target.as_ptr(),
                            std::ptr::null(),
                            flags,
                            std::ptr::null(),
                        ))?
                    }
                }
            }
            for step in &self.steps {
                if let Step::Hold { slot, .. } = step {
                    libc::close(*slot);
                }
            }
            if self.pid_namespace {
                // This process is already in its PID namespace: the new `/proc` shows it.
                check(libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ))?;
            }
            for (path, rights) in &self.after_mounts {
                let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                check(fd)?;
                let rule = PathBeneath {
                    allowed_access: *rights,
                    parent_fd: fd,
                };
                let added = libc::syscall(
                    libc::SYS_landlock_add_rule,
                    self.landlock.as_raw_fd(),
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const PathBeneath,
                    0,
                );
                libc::close(fd);
                if added < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::chdir(cwd.as_ptr()))
        }
    }

    /// In the child, last before exec (after `no_new_privs`): Landlock, then seccomp. The
    /// kernel reports their denials to its audit log (see `audit.rs`).
    pub(crate) fn restrict(&self) -> io::Result<()> {
        let check = |result: libc::c_long| {
            if result < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let install = |filter: &[seccompiler::sock_filter], flags: libc::c_ulong| {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut().cast(),
            };
            // SAFETY: a pointer to a live filter program.
            check(unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    flags,
                    &program as *const libc::sock_fprog,
                )
            })
        };
        // SAFETY: a ruleset descriptor of ours.
        check(unsafe {
            libc::syscall(
                libc::SYS_landlock_restrict_self,
                self.landlock.as_raw_fd(),
                self.landlock_flags,
            )
        })?;
        if let Some(quiet) = &self.quiet {
            install(quiet, 0)?;
        }
        install(
            &self.seccomp,
            libc::SECCOMP_FILTER_FLAG_LOG as libc::c_ulong,
        )
    }
}

/// `struct landlock_path_beneath_attr` (packed, as the kernel has it).
#[repr(C, packed)]
struct PathBeneath {
    allowed_access: u64,
    parent_fd: i32,
}

const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
/// Landlock ABI 7: log denials made after the exec too (by default only those made by the
/// program that called `landlock_restrict_self`, here agentd's child before it execs).
const LANDLOCK_RESTRICT_SELF_LOG_NEW_EXEC_ON: u32 = 1 << 1;

/// The Landlock ABI that scopes signals and abstract Unix sockets to the sandbox.
pub const LANDLOCK_SCOPES_ABI: i32 = 6;

/// The newest Landlock ABI whose rights this code has been written for.
const NEWEST_ABI: landlock::ABI = landlock::ABI::V9;

/// The filesystem rights the ruleset handles here (those of [`NEWEST_ABI`] this kernel
/// knows), and of them the rights to read and execute.
fn rights() -> (u64, u64) {
    use landlock::{ABI, Access, AccessFs};
    let abi = ABI::from(landlock_abi().min(NEWEST_ABI as i32));
    (
        AccessFs::from_all(abi).bits(),
        AccessFs::from_read(abi).bits(),
    )
}

/// The Landlock ABI this kernel offers; 0 without Landlock.
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no ruleset.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(abi).unwrap_or(0).max(0)
}

/// The agent's Landlock domain: read and execute beneath the system folders and `read`, read
/// and write beneath `write`, the usual device files; signals and abstract Unix sockets only
/// within its own domain (ABI 6). Rights this kernel does not know are left out (the
/// supervisor refuses a policy that needs one).
fn landlock_ruleset(read: &[PathBuf], write: &[PathBuf]) -> io::Result<OwnedFd> {
    use landlock::{
        ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, Scope,
    };
    let fail = |error: landlock::RulesetError| io::Error::other(format!("landlock: {error}"));
    let all = AccessFs::from_all(NEWEST_ABI);
    let read_access = AccessFs::from_read(NEWEST_ABI);
    let devices = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    let mut rules: Vec<(&Path, landlock::BitFlags<AccessFs>)> = Vec::new();
    rules.extend(
        SYSTEM_READ
            .iter()
            .map(|path| (Path::new(*path), read_access)),
    );
    rules.extend(DEVICES.iter().map(|path| (Path::new(*path), devices)));
    rules.push((Path::new("/dev"), AccessFs::ReadDir.into()));
    rules.extend(read.iter().map(|path| (path.as_path(), read_access)));
    rules.extend(write.iter().map(|path| (path.as_path(), all)));
    let mut ruleset = Ruleset::default()
        .handle_access(all)
        .map_err(fail)?
        .scope(Scope::from_all(ABI::V6))
        .map_err(fail)?
        .create()
        .map_err(fail)?;
    for (path, access) in rules {
        let fd = match PathFd::new(path) {
            Ok(fd) => fd,
            // A system folder this host does not have.
            Err(_) if !path.exists() => continue,
            Err(error) => return Err(io::Error::other(format!("landlock: {error}"))),
        };
        // A rule on a file takes only the rights a file has.
        let access = if path.is_dir() {
            access
        } else {
            access & AccessFs::from_file(NEWEST_ABI)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(fail)?;
    }
    Option::<OwnedFd>::from(ruleset).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel has no Landlock: the agent's files cannot be confined",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(step: &Step) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match step {
            Step::Hold { path, slot } => format!("hold {} {slot}", s(path)),
            Step::Tmpfs { target, .. } => format!("tmpfs {}", s(target)),
            Step::MakeDir { path } => format!("mkdir {}", s(path)),
            Step::MakeFile { path } => format!("touch {}", s(path)),
            Step::Bind { source, target } => format!("bind {} {}", s(source), s(target)),
            Step::ReadOnly { target, .. } => format!("ro {}", s(target)),
        }
    }

    #[test]
    fn the_mount_plan_hides_every_other_top_level_folder_and_binds_the_allowed_ones_back() {
        let host = HostView {
            top_dirs: ["etc", "home", "root", "tmp", "usr", "var"]
                .map(String::from)
                .into(),
            secrets: vec![(PathBuf::from("/etc/shadow"), false)],
        };
        // /var/tmp beneath a hidden folder; /home allowed whole; /var/tmp/x inside /var/tmp.
        let allowed = [
            PathBuf::from("/var/tmp"),
            PathBuf::from("/var/tmp/x"),
            PathBuf::from("/home"),
        ];
        let steps: Vec<String> = mount_plan(&allowed, &host)
            .expect("plan")
            .iter()
            .map(text)
            .collect();
        let has = |line: &str| steps.iter().any(|step| step == line);
        assert!(!has("tmpfs /home"), "{steps:#?}");
        assert!(has("tmpfs /root") && has("ro /root"), "{steps:#?}");
        assert!(has("hold /var/tmp 900"), "{steps:#?}");
        assert!(
            has("mkdir /var/tmp") && has("bind /proc/self/fd/900 /var/tmp"),
            "{steps:#?}"
        );
        // Held before the cover, bound after it, made read-only last.
        let at = |line: &str| steps.iter().position(|step| step == line).expect(line);
        assert!(at("hold /var/tmp 900") < at("tmpfs /var"));
        assert!(at("tmpfs /var") < at("bind /proc/self/fd/900 /var/tmp"));
        assert!(at("bind /proc/self/fd/900 /var/tmp") < at("ro /var"));
        // The outer path brings the inner one.
        assert!(
            !steps.iter().any(|step| step.contains("/var/tmp/x")),
            "{steps:#?}"
        );
        // Private and writable: never made read-only.
        assert!(has("tmpfs /tmp") && !has("ro /tmp"), "{steps:#?}");
        assert!(
            has("bind /dev/null /etc/shadow") && has("ro /etc/shadow"),
            "{steps:#?}"
        );
    }
}
