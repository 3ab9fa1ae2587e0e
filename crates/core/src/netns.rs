//! Network namespaces for sandboxed agents: made by agentd before the spawn (the keeper's
//! child joins it), with loopback up and, for `PROXY`, the proxy's listener bound inside it
//! (and the LLM gateway's, on the port it has on the host, when agentd runs one).
//! A socket keeps the namespace it was created in, so agentd serves the listener from its
//! own namespace; the agent reaches nothing else.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use nix::libc;

/// Where the proxy listens inside every agent's namespace (each has its own loopback).
pub const PROXY_PORT: u16 = 3128;

/// The proxy's address as the agent sees it.
pub fn proxy_url() -> String {
    format!("http://127.0.0.1:{PROXY_PORT}")
}

/// A new network namespace with only loopback.
pub(crate) struct AgentNet {
    /// Holds the namespace until the agent has joined it.
    pub ns: OwnedFd,
    /// The proxy's listener, bound inside it (`PROXY` only).
    pub listener: Option<TcpListener>,
    /// The LLM gateway's listener, bound inside it (`PROXY` only, with a gateway).
    pub gateway: Option<TcpListener>,
}

/// Namespaces made ahead on a thread of their own, so a spawn does not wait for one: making
/// a network namespace costs about 0.8 ms here, more than the rest of a sandboxed spawn.
/// Started by the first sandboxed spawn, so a daemon that never sandboxes makes none.
pub(crate) struct NetPool {
    /// Ready namespaces: `[without a listener, with one]`.
    ready: Mutex<[Vec<AgentNet>; 2]>,
    taken: Condvar,
    /// The LLM gateway's port, bound in every `PROXY` namespace too.
    gateway: Option<u16>,
}

/// Namespaces of each kind kept ready.
const READY: usize = 4;

impl NetPool {
    pub(crate) fn start(gateway: Option<u16>) -> Arc<NetPool> {
        let pool = Arc::new(NetPool {
            ready: Mutex::new([Vec::new(), Vec::new()]),
            taken: Condvar::new(),
            gateway,
        });
        let filling = pool.clone();
        let spawned = std::thread::Builder::new()
            .name("agentd-netns".into())
            .spawn(move || filling.fill());
        if let Err(error) = spawned {
            tracing::warn!(%error, "no thread to make network namespaces ahead; each spawn makes its own");
        }
        pool
    }

    /// A new namespace: a ready one, or one made now.
    pub(crate) fn take(&self, proxy: bool) -> io::Result<AgentNet> {
        let ready = self.lock()[usize::from(proxy)].pop();
        self.taken.notify_one();
        match ready {
            Some(net) => Ok(net),
            None => create(proxy, self.gateway),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Vec<AgentNet>; 2]> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fill(&self) {
        loop {
            let short = {
                let mut ready = self.lock();
                loop {
                    match ready.iter().position(|kind| kind.len() < READY) {
                        Some(short) => break short,
                        None => {
                            ready = self
                                .taken
                                .wait(ready)
                                .unwrap_or_else(PoisonError::into_inner)
                        }
                    }
                }
            };
            match create(short == 1, self.gateway) {
                Ok(net) => self.lock()[short].push(net),
                Err(error) => {
                    tracing::warn!(%error, "making a network namespace ahead; spawns make their own");
                    return;
                }
            }
        }
    }
}

/// Makes a namespace on a thread of its own (a namespace belongs to the thread that
/// unshares it), so no other thread of agentd ever leaves the host's network.
fn create(proxy: bool, gateway: Option<u16>) -> io::Result<AgentNet> {
    on_own_thread(move || {
        // SAFETY: plain flags; affects this thread only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        loopback_up()?;
        let listener = if proxy {
            Some(listen(PROXY_PORT)?)
        } else {
            None
        };
        let gateway = match (proxy, gateway) {
            (true, Some(port)) => Some(listen(port)?),
            _ => None,
        };
        let ns = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?);
        Ok(AgentNet {
            ns,
            listener,
            gateway,
        })
    })
}

/// A listener on `port` (the proxy's, or the gateway's) again inside the namespace of a
/// running agent (after agentd restarted: the agent's namespace outlived the old listener).
pub(crate) fn listen_in(pid: i32, port: u16) -> io::Result<TcpListener> {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    on_own_thread(move || {
        // SAFETY: a namespace descriptor of ours; affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
            return Err(io::Error::last_os_error());
        }
        listen(port)
    })
}

fn on_own_thread<T: Send>(work: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(work)
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
    })
}

fn listen(port: u16) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// `ip link set lo up`, with the ioctl that does it.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a new datagram socket, owned at once.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if socket < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `socket` is a descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(socket) };
    // SAFETY: an all-zero ifreq is valid; the name is copied in with its NUL.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *to = *from as libc::c_char;
    }
    // SAFETY: a valid ifreq for the flag requests on a socket of ours.
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
