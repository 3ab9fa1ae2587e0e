//! What the kernel refused a sandboxed agent. seccomp (the filter is installed with
//! `SECCOMP_FILTER_FLAG_LOG`) and Landlock (ABI 7, `LOG_NEW_EXEC_ON`) report their denials to
//! the kernel's audit subsystem, and nowhere else. agentd reads them from audit's read-only
//! multicast group, as journald does: beside auditd if one runs, without taking its place,
//! and without the rate limit of the kernel log. seccomp reports whether or not audit is on;
//! Landlock only while it is (`auditctl -e 1`, or auditd running).
//!
//! A record names a process: a seccomp record the one that made the call; a Landlock record
//! its domain, whose first record names the process that made it, which is the agent's
//! leader (agentd restricts its child just before the exec). The thread sends each denial
//! with that process and its ancestors, and the driver gives it to the agent whose leader
//! it finds first. A seccomp denial by a process that is gone before its record is read
//! counts for no agent.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;
use tokio::sync::mpsc;

/// One thing the kernel refused.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelDenial {
    /// The process the record names, then its ancestors, nearest first.
    pub pids: Vec<i32>,
    pub kind: DenialKind,
    /// `mount`, or `fs.read_file /etc/shadow`.
    pub what: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialKind {
    /// Landlock: a file (or, on newer kernels, a socket or a scope).
    File,
    /// seccomp: a system call.
    Syscall,
}

const AUDIT_GET: u16 = 1000;
const AUDIT_SYSCALL: u16 = 1300;
const AUDIT_SECCOMP: u16 = 1326;
const AUDIT_LANDLOCK_ACCESS: u16 = 1423;
const AUDIT_LANDLOCK_DOMAIN: u16 = 1424;
/// `AUDIT_NLGRP_READLOG`, as a bind mask.
const READLOG_GROUP: u32 = 1;
const NLMSG_HEADER: usize = 16;

/// Joins audit's multicast group. Fails where the kernel has no audit, or agentd lacks
/// `CAP_AUDIT_READ`.
pub(crate) fn open() -> io::Result<OwnedFd> {
    netlink(READLOG_GROUP)
}

/// Reads what `open` joined on a thread of its own for as long as agentd runs; the denials
/// come out of the channel it answers (a full channel drops them, and says so in the log).
pub(crate) fn listen(socket: OwnedFd) -> io::Result<mpsc::Receiver<KernelDenial>> {
    let (denials, received) = mpsc::channel(1024);
    std::thread::Builder::new()
        .name("agentd-audit".into())
        .spawn(move || read(&socket, &denials))?;
    Ok(received)
}

/// Whether the kernel's audit is on (Landlock reports only then); `None` where it cannot be
/// asked.
pub fn enabled() -> Option<bool> {
    let socket = netlink(0).ok()?;
    let mut request = [0u8; NLMSG_HEADER];
    request[0..4].copy_from_slice(&(NLMSG_HEADER as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&AUDIT_GET.to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    // SAFETY: a buffer of ours, sent to the kernel (the default destination of a netlink
    // socket).
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return None;
    }
    let mut reply = [0u8; 256];
    // SAFETY: a buffer of ours.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    let got = usize::try_from(got).ok()?;
    // `struct audit_status`: mask, then enabled.
    let enabled = reply
        .get(NLMSG_HEADER + 4..NLMSG_HEADER + 8)
        .filter(|_| got >= 24)?;
    let kind = u16::from_ne_bytes([reply[4], reply[5]]);
    (kind == AUDIT_GET)
        .then(|| u32::from_ne_bytes([enabled[0], enabled[1], enabled[2], enabled[3]]) != 0)
}

fn netlink(groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket calls on a descriptor we own from here.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_AUDIT,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        let mut address: libc::sockaddr_nl = std::mem::zeroed();
        address.nl_family = libc::AF_NETLINK as u16;
        address.nl_groups = groups;
        let bound = libc::bind(
            fd,
            (&address as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        );
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok(socket)
    }
}

fn read(socket: &OwnedFd, denials: &mpsc::Sender<KernelDenial>) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut reader = Reader::default();
    let mut found = Vec::new();
    let mut dropped = 0u64;
    loop {
        // SAFETY: a buffer of ours.
        let got = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        match usize::try_from(got) {
            Ok(got) => {
                let mut rest = &buffer[..got];
                while rest.len() >= NLMSG_HEADER {
                    let length = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                    let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                    let Some(payload) = rest.get(NLMSG_HEADER..length.max(NLMSG_HEADER)) else {
                        break;
                    };
                    let text = String::from_utf8_lossy(payload);
                    reader.record(kind, text.trim_end_matches('\0'), &mut found);
                    rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
                }
            }
            Err(_) => match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => reader.flush(&mut found),
                // The kernel had more for us than the socket held.
                Some(libc::ENOBUFS) => tracing::warn!("audit records lost: agentd read too slowly"),
                _ => {
                    tracing::warn!(
                        "reading the kernel's audit records: {}; sandbox denials are no longer \
                         counted",
                        io::Error::last_os_error()
                    );
                    return;
                }
            },
        }
        for mut denial in found.drain(..) {
            let pid = denial.pids[0];
            denial.pids.extend(ancestors(pid));
            match denials.try_send(denial) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => dropped += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        if dropped > 0 && found.is_empty() {
            tracing::warn!("{dropped} sandbox denials not counted: the driver was busy");
            dropped = 0;
        }
    }
}

/// `pid`'s parent, its parent's, ... up to (not including) PID 1.
fn ancestors(mut pid: i32) -> Vec<i32> {
    let mut chain = Vec::new();
    while chain.len() < 64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            break;
        };
        // After the command in parentheses: state, then the parent.
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|ppid| ppid.parse::<i32>().ok());
        match parent {
            Some(parent) if parent > 1 => {
                chain.push(parent);
                pid = parent;
            }
            _ => break,
        }
    }
    chain
}

/// Turns records into denials. Landlock's first record of a domain comes with a second one
/// (same serial) that names the process that made the domain; a denial whose domain is not
/// known yet waits for the next record.
#[derive(Default)]
struct Reader {
    /// Landlock domain → the process that made it.
    domains: HashMap<String, i32>,
    /// The serial of the records being read, the process a syscall record of it named, and
    /// its denials whose domain was not known.
    serial: String,
    serial_pid: Option<i32>,
    pending: Vec<(String, String)>,
}

impl Reader {
    fn record(&mut self, kind: u16, text: &str, found: &mut Vec<KernelDenial>) {
        // "audit(1796519781.122:8): field=value ..."
        let (stamp, fields) = text.split_once("): ").unwrap_or(("", text));
        let serial = stamp.rsplit(':').next().unwrap_or_default();
        if serial != self.serial {
            self.flush(found);
            self.serial = serial.to_string();
        }
        let field = |name: &str| field(fields, name);
        let pid = || field("pid").and_then(|pid| pid.parse::<i32>().ok());
        match kind {
            AUDIT_SECCOMP => {
                let Some(pid) = pid() else { return };
                let code = field("code")
                    .and_then(|code| u32::from_str_radix(code.trim_start_matches("0x"), 16).ok());
                // `SECCOMP_RET_LOG` and `SECCOMP_RET_ALLOW` were not refusals.
                if matches!(
                    code.map(|code| code & 0xffff_0000),
                    Some(0x7ffc_0000 | 0x7fff_0000)
                ) {
                    return;
                }
                let nr = field("syscall").and_then(|nr| nr.parse::<i64>().ok());
                let what = match nr {
                    Some(nr) => crate::confine::syscall_name(nr)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("system call {nr}")),
                    None => "a system call".into(),
                };
                found.push(KernelDenial {
                    pids: vec![pid],
                    kind: DenialKind::Syscall,
                    what,
                });
            }
            AUDIT_LANDLOCK_ACCESS => {
                let Some(domain) = field("domain") else {
                    return;
                };
                let what = access(fields);
                match self.domains.get(domain) {
                    Some(&pid) => found.push(KernelDenial {
                        pids: vec![pid],
                        kind: DenialKind::File,
                        what,
                    }),
                    None => self.pending.push((domain.to_string(), what)),
                }
            }
            AUDIT_LANDLOCK_DOMAIN => {
                let Some(domain) = field("domain") else {
                    return;
                };
                match field("status") {
                    Some("allocated") => {
                        if let Some(pid) = pid() {
                            self.domains.insert(domain.to_string(), pid);
                        }
                    }
                    Some("deallocated") => {
                        self.flush(found);
                        self.domains.remove(domain);
                    }
                    _ => {}
                }
            }
            AUDIT_SYSCALL => self.serial_pid = pid(),
            _ => {}
        }
    }

    /// Gives the waiting denials their process: their domain's maker, or else the process the
    /// syscall record named.
    fn flush(&mut self, found: &mut Vec<KernelDenial>) {
        for (domain, what) in self.pending.drain(..) {
            if let Some(pid) = self.domains.get(&domain).copied().or(self.serial_pid) {
                found.push(KernelDenial {
                    pids: vec![pid],
                    kind: DenialKind::File,
                    what,
                });
            }
        }
        self.serial_pid = None;
    }
}

/// The value of `name=` among space-separated fields (quotes taken off).
fn field<'a>(fields: &'a str, name: &str) -> Option<&'a str> {
    fields.split(' ').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| value.trim_matches('"'))
    })
}

/// A Landlock access record as "blockers object": `fs.read_file /etc/shadow`,
/// `net.connect_tcp 10.0.0.1:80`. Audit writes a value with spaces or quotes in hex.
fn access(fields: &str) -> String {
    let blockers = field(fields, "blockers").unwrap_or("access");
    let object = if let Some(path) = field(fields, "path") {
        untrusted(path)
    } else if let Some(address) = field(fields, "daddr") {
        match field(fields, "dest") {
            Some(port) => format!("{address}:{port}"),
            None => address.to_string(),
        }
    } else {
        String::new()
    };
    format!("{blockers} {object}").trim_end().to_string()
}

/// A string audit may have written in hex (when it holds spaces, quotes or control bytes).
fn untrusted(value: &str) -> String {
    let hex = value.len().is_multiple_of(2) && value.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex || value.is_empty() {
        return value.to_string();
    }
    let bytes: Option<Vec<u8>> = (0..value.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&value[at..at + 2], 16).ok())
        .collect();
    match bytes {
        Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        None => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(records: &[(u16, &str)]) -> Vec<KernelDenial> {
        let mut reader = Reader::default();
        let mut found = Vec::new();
        for (kind, text) in records {
            reader.record(*kind, text, &mut found);
        }
        reader.flush(&mut found);
        found
    }

    #[test]
    fn a_seccomp_refusal_names_the_call_and_the_process() {
        let found = read(&[(
            1326,
            "audit(1796519716.366:1): auid=4294967295 uid=0 gid=0 ses=4294967295 pid=23459 \
             comm=\"t\" exe=\"/tmp/sc/t\" sig=0 arch=c000003e syscall=246 compat=0 \
             ip=0x7f9ac5843829 code=0x50001",
        )]);
        assert_eq!(
            found,
            [KernelDenial {
                pids: vec![23459],
                kind: DenialKind::Syscall,
                what: "kexec_load".into()
            }]
        );
        // Logged, not refused.
        assert!(read(&[(1326, "audit(1.1:2): pid=5 syscall=246 code=0x7ffc0000")]).is_empty());
    }

    #[test]
    fn a_landlock_refusal_belongs_to_the_process_that_made_the_domain() {
        let first = [
            (
                1423,
                "audit(1796519781.122:8): domain=1e37b80cb blockers=fs.read_file \
                 path=\"/etc/passwd\" dev=\"vda\" ino=817",
            ),
            (
                1424,
                "audit(1796519781.122:8): domain=1e37b80cb status=allocated mode=enforcing \
                 pid=26788 uid=0 exe=\"/tmp/sc/l\" comm=\"l\"",
            ),
            (
                1300,
                "audit(1796519781.122:8): arch=c000003e syscall=257 success=no exit=-13 \
                 ppid=26786 pid=26790 comm=\"l\"",
            ),
            (
                1423,
                "audit(1796519781.130:9): domain=1e37b80cb blockers=fs.write_file \
                 path=2F746D702F6120622F63 dev=\"vda\" ino=818",
            ),
            (
                1423,
                "audit(1796519781.140:10): domain=1e37b80cb blockers=net.connect_tcp \
                 daddr=10.0.0.1 dest=80",
            ),
        ];
        let found = read(&first);
        let whats: Vec<_> = found.iter().map(|d| (d.pids[0], d.what.as_str())).collect();
        assert_eq!(
            whats,
            [
                (26788, "fs.read_file /etc/passwd"),
                (26788, "fs.write_file /tmp/a b/c"),
                (26788, "net.connect_tcp 10.0.0.1:80")
            ]
        );
        assert!(found.iter().all(|d| d.kind == DenialKind::File));
    }

    #[test]
    fn a_domain_made_before_agentd_started_falls_back_on_the_syscall_record() {
        let found = read(&[
            (
                1423,
                "audit(5.1:20): domain=77 blockers=fs.read_file path=\"/root/x\"",
            ),
            (1300, "audit(5.1:20): syscall=257 ppid=1 pid=4242"),
            (1320, "audit(5.1:20): "),
            (
                1424,
                "audit(5.2:21): domain=77 status=deallocated denials=1",
            ),
        ]);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pids, [4242]);
    }
}
