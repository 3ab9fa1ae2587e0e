//! systemd's notification protocol (`Type=notify`), written by hand: one datagram to
//! `$NOTIFY_SOCKET` per state. READY once the socket is bound and the records recovered,
//! WATCHDOG while the supervisor answers (when `WatchdogSec` sets `$WATCHDOG_USEC`),
//! STOPPING when shutdown begins. Without `$NOTIFY_SOCKET` nothing is sent.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use agentd_core::SupervisorHandle;

/// Sends one notification, such as `READY=1`; false when there is nobody to tell.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        use std::os::unix::ffi::OsStrExt;
        match path.as_bytes().strip_prefix(b"@") {
            // An abstract socket: `@` stands for the leading NUL byte.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &address)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    match sent {
        Ok(_) => true,
        Err(error) => {
            tracing::warn!(%error, "telling systemd `{}`", state.lines().next().unwrap_or(""));
            false
        }
    }
}

/// The watchdog interval systemd asked for, if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its interval, each time only once the supervisor task has
/// answered a summary within that half: a supervisor that hangs stops the pings, and systemd
/// restarts the daemon.
pub fn keep_watchdog(supervisor: SupervisorHandle) {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    let every = interval / 2;
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            ticks.tick().await;
            match tokio::time::timeout(every, supervisor.summary()).await {
                Ok(Ok(_)) => {
                    notify("WATCHDOG=1");
                }
                Ok(Err(_)) => return,
                Err(_) => tracing::warn!(
                    "the supervisor did not answer within {every:?}: no watchdog ping"
                ),
            }
        }
    });
}
