//! What a sandboxed agent may reach: its policy as asked for and validated, the rule that a
//! sub-agent never gets more than its parent, and what this host can enforce. The process
//! side is `confine.rs` (in the child) and `netns.rs` (its network); the proxy is
//! `egress.rs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::egress::HostRule;
use crate::error::{Error, Result};

/// Where a sandboxed agent's connections may go, from narrowest to widest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// Its own network namespace with only loopback.
    None,
    /// Its own namespace whose only way out is agentd's proxy, to `allow_hosts`.
    #[default]
    Proxy,
    /// The host's network, as an unsandboxed agent.
    Host,
}

impl Network {
    pub fn name(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Proxy => "proxy",
            Network::Host => "host",
        }
    }
}

/// A validated policy: paths are absolute and canonical.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sandbox {
    pub network: Network,
    pub allow_hosts: Vec<HostRule>,
    /// Read (and executed) beneath, besides the system folders, its folder and working dir.
    pub read_paths: Vec<PathBuf>,
    /// Read and written beneath, besides its folder and working dir.
    pub write_paths: Vec<PathBuf>,
    /// May create namespaces (`unshare`, `setns`, `clone` with `CLONE_NEW*`).
    pub allow_namespaces: bool,
}

/// A policy as a client sent it.
#[derive(Debug, Clone, Default)]
pub struct SandboxRequest {
    /// `None`: `PROXY`.
    pub network: Option<Network>,
    pub allow_hosts: Vec<String>,
    pub read_paths: Vec<String>,
    pub write_paths: Vec<String>,
    pub allow_namespaces: bool,
}

/// At most this many paths of each kind and hosts.
const MAX_ENTRIES: usize = 64;

impl SandboxRequest {
    pub(crate) fn validate(self) -> Result<Sandbox> {
        let network = self.network.unwrap_or_default();
        if self.allow_hosts.len() > MAX_ENTRIES {
            return invalid(
                "sandbox.allow_hosts",
                format!("at most {MAX_ENTRIES} entries"),
            );
        }
        if !self.allow_hosts.is_empty() && network != Network::Proxy {
            return invalid(
                "sandbox.allow_hosts",
                format!(
                    "hosts are allowed through the proxy: set network PROXY (it is {})",
                    network.name().to_uppercase()
                ),
            );
        }
        let allow_hosts = parse_hosts("sandbox.allow_hosts", &self.allow_hosts)?;
        Ok(Sandbox {
            network,
            allow_hosts,
            read_paths: paths("sandbox.read_paths", &self.read_paths)?,
            write_paths: paths("sandbox.write_paths", &self.write_paths)?,
            allow_namespaces: self.allow_namespaces,
        })
    }
}

/// `allow_hosts` entries as rules, or the first one that is not a host.
pub fn parse_hosts(field: &'static str, hosts: &[String]) -> Result<Vec<HostRule>> {
    hosts
        .iter()
        .map(|host| {
            HostRule::parse(host).map_err(|problem| Error::Invalid {
                field,
                problem: format!("`{host}`: {problem}"),
            })
        })
        .collect()
}

fn paths(field: &'static str, given: &[String]) -> Result<Vec<PathBuf>> {
    if given.len() > MAX_ENTRIES {
        return invalid(field, format!("at most {MAX_ENTRIES} paths"));
    }
    given
        .iter()
        .map(|path| {
            if path.contains('\0') {
                return invalid(
                    field,
                    format!("`{}` contains a NUL byte", path.escape_debug()),
                );
            }
            if !path.starts_with('/') {
                return invalid(field, format!("`{path}` is not an absolute path"));
            }
            std::fs::canonicalize(path).map_err(|error| Error::Invalid {
                field,
                problem: format!("`{path}`: {error}"),
            })
        })
        .collect()
}

fn invalid<T>(field: &'static str, problem: impl Into<String>) -> Result<T> {
    Err(Error::Invalid {
        field,
        problem: problem.into(),
    })
}

/// Whether `path` lies beneath one of `roots` (or is one).
fn beneath(path: &Path, roots: &[&Path]) -> bool {
    roots.iter().any(|root| path.starts_with(root))
}

impl Sandbox {
    /// Paths no agent may be given: they hold agentd's data folder (its socket, store,
    /// other agents' folders, the keeper's socket) or its API socket. An agent's own
    /// folder is always given to it.
    pub(crate) fn check_reach(
        &self,
        working_dir: Option<&Path>,
        agentd_paths: &[&Path],
    ) -> Result<()> {
        let working_dir: Vec<PathBuf> = working_dir.map(Path::to_path_buf).into_iter().collect();
        for (field, paths) in [
            ("sandbox.read_paths", &self.read_paths),
            ("sandbox.write_paths", &self.write_paths),
            ("working_dir", &working_dir),
        ] {
            for path in paths {
                if let Some(private) = agentd_paths
                    .iter()
                    .find(|private| private.starts_with(path) || path.starts_with(private))
                {
                    return Err(Error::SandboxWider {
                        problem: format!(
                            "`{field}` `{}` would reach agentd's own `{}`: no agent may (its \
                             own folder is always given to it)",
                            path.display(),
                            private.display()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// `Ok` if this policy (of an agent that works in `working_dir`) gives no more than
    /// `parent`'s (whose agent has the folder `parent_dir` and works in `parent_working_dir`);
    /// else what widens it.
    pub(crate) fn within(
        &self,
        working_dir: Option<&Path>,
        parent: &Sandbox,
        parent_dir: &Path,
        parent_working_dir: &Path,
    ) -> std::result::Result<(), String> {
        let mut writable: Vec<&Path> = parent.write_paths.iter().map(PathBuf::as_path).collect();
        writable.extend([parent_dir, parent_working_dir]);
        let mut readable = writable.clone();
        readable.extend(parent.read_paths.iter().map(PathBuf::as_path));
        if self.network > parent.network {
            return Err(format!(
                "network {} is wider than its parent's {}",
                self.network.name().to_uppercase(),
                parent.network.name().to_uppercase()
            ));
        }
        if self.allow_namespaces && !parent.allow_namespaces {
            return Err("allow_namespaces: its parent may not create namespaces".into());
        }
        if let Some(path) = self
            .read_paths
            .iter()
            .find(|path| !beneath(path, &readable))
        {
            return Err(format!(
                "read_paths: its parent may not read `{}`",
                path.display()
            ));
        }
        if let Some(path) = self
            .write_paths
            .iter()
            .find(|path| !beneath(path, &writable))
        {
            return Err(format!(
                "write_paths: its parent may not write `{}`",
                path.display()
            ));
        }
        if let Some(dir) = working_dir
            && !beneath(dir, &writable)
        {
            return Err(format!(
                "working_dir: its parent may not write `{}`",
                dir.display()
            ));
        }
        if self.network == Network::Proxy
            && parent.network == Network::Proxy
            && let Some(host) = self
                .allow_hosts
                .iter()
                .find(|host| !parent.allow_hosts.iter().any(|rule| rule.covers(host)))
        {
            return Err(format!(
                "allow_hosts: `{host}` is not within its parent's allow_hosts"
            ));
        }
        Ok(())
    }

    /// The variables a sandboxed agent gets on top of its environment: its folder as its
    /// home (its user's is out of reach), the private `/tmp`, and the proxy.
    pub(crate) fn env(&self, agent_dir: &Path) -> Vec<(String, String)> {
        let mut env = vec![
            ("HOME".to_string(), agent_dir.to_string_lossy().into_owned()),
            ("TMPDIR".to_string(), "/tmp".to_string()),
        ];
        if self.network == Network::Proxy {
            let url = crate::netns::proxy_url();
            for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"] {
                env.push((name.to_string(), url.clone()));
                env.push((name.to_lowercase(), url.clone()));
            }
            // Its own loopback (the LLM gateway is served there) is reached directly.
            for name in ["NO_PROXY", "no_proxy"] {
                env.push((name.to_string(), "127.0.0.1,localhost".to_string()));
            }
        }
        env
    }
}

/// What this host offers for sandboxes, found at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxSupport {
    /// 0 without Landlock.
    pub landlock_abi: i32,
    pub seccomp: bool,
    pub network_namespaces: bool,
    pub user_namespaces: bool,
    /// agentd runs as root: mount and network namespaces can be made for agents.
    pub privileged: bool,
    /// The keeper that runs knows how to confine (one left by an older agentd does not).
    pub keeper: bool,
    /// agentd reads the kernel's audit records (`audit.rs`): seccomp denials are counted.
    pub syscall_denials: bool,
    /// Landlock reports denials and the kernel's audit is on: file denials are counted.
    pub file_denials: bool,
}

impl SandboxSupport {
    pub(crate) fn detect(keeper: bool) -> SandboxSupport {
        use nix::libc;
        // SAFETY: a query with no arguments.
        let seccomp = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } >= 0;
        let user_namespaces = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .is_some_and(|most| most > 0);
        SandboxSupport {
            landlock_abi: crate::confine::landlock_abi(),
            seccomp,
            network_namespaces: Path::new("/proc/self/ns/net").exists(),
            user_namespaces,
            privileged: nix::unistd::geteuid().is_root(),
            keeper,
            syscall_denials: false,
            file_denials: false,
        }
    }

    /// With what agentd learns of the kernel's reports: whether it reads them, and whether
    /// audit is on now.
    pub(crate) fn reporting(mut self, listening: bool) -> SandboxSupport {
        self.syscall_denials = listening;
        self.file_denials =
            listening && self.landlock_abi >= 7 && crate::audit::enabled() == Some(true);
        self
    }

    /// One line for the log and GetSummary.
    pub fn describe(&self) -> String {
        let yes = |on: bool| if on { "yes" } else { "no" };
        format!(
            "Landlock ABI {}{}, seccomp {}, network namespaces {}, user namespaces {}, \
             agentd {}; denials: {}",
            self.landlock_abi,
            if (1..crate::confine::LANDLOCK_SCOPES_ABI).contains(&self.landlock_abi) {
                " (signals scoped by a PID namespace per agent)"
            } else {
                ""
            },
            yes(self.seccomp),
            yes(self.network_namespaces),
            yes(self.user_namespaces),
            if self.privileged {
                "root (sandboxes available)"
            } else {
                "not root (no sandboxes: they need mount and network namespaces)"
            },
            match (self.syscall_denials, self.file_denials) {
                (false, _) => "not counted (the kernel's audit records cannot be read)",
                (true, true) => "system calls and files counted",
                (true, false) if self.landlock_abi < 7 =>
                    "system calls counted, files not (Landlock reports from ABI 7)",
                (true, false) => "system calls counted, files only while the kernel's audit is on",
            }
        )
    }

    /// Refuses a policy this host cannot enforce whole: never a weaker sandbox than asked.
    /// (Below Landlock ABI 6, signals are scoped by a PID namespace instead: `confine.rs`.)
    pub(crate) fn check(&self, sandbox: &Sandbox) -> Result<()> {
        let unsupported = |problem: String| {
            Err(Error::Unsupported {
                field: "sandbox",
                problem,
            })
        };
        if !self.privileged {
            return unsupported(
                "agentd does not run as root, and a sandbox needs a mount namespace (to hide \
                 Unix sockets) and, for NONE and PROXY, a network namespace"
                    .into(),
            );
        }
        if !self.keeper {
            return unsupported(
                "the keeper that runs was started by an older agentd and cannot confine \
                 agents; sandboxes are available once it has exited"
                    .into(),
            );
        }
        if self.landlock_abi < 1 {
            return unsupported(
                "this kernel has no Landlock (Linux 5.13 or later, with `landlock` in its \
                 `lsm=` list), so an agent's files cannot be confined"
                    .into(),
            );
        }
        if !self.seccomp {
            return unsupported("this kernel has no seccomp filters".into());
        }
        if sandbox.network != Network::Host && !self.network_namespaces {
            return unsupported(format!(
                "network {} needs network namespaces, which this kernel lacks",
                sandbox.network.name().to_uppercase()
            ));
        }
        Ok(())
    }
}
