//! Moving bytes from one socket to another, counted as they pass. Each direction goes
//! through a pipe with `splice(2)`, so the bytes never enter agentd's memory: on loopback
//! that costs agentd's thread about 250 ms of CPU per GB, where a copy through a 64 KiB
//! buffer cost about 410 (ARCHITECTURE.md). When no pipe can be had (out of descriptors),
//! such a buffer does. A request body is read through a buffer: its framing is checked.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use nix::sys::socket::Shutdown;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// What one `splice` moves at most, and the pipe's capacity when the kernel grants it.
const PIPE_CAPACITY: usize = 256 * 1024;
/// The buffer of a direction copied without a pipe.
const COPY_BUFFER: usize = 64 * 1024;

/// Moves `from`'s bytes to `to` until `from` ends, then ends `to`'s writing.
pub(super) async fn relay(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    match pipe() {
        Ok(pipe) => splice_all(from, to, &pipe, counter).await,
        Err(error) => {
            tracing::debug!(%error, "egress proxy: no pipe, copying instead");
            copy_all(from, to, counter).await
        }
    }
}

/// Moves the bytes of `from` to `to` until `until` says stop: it is shown each piece read
/// and answers how much of it to pass on and whether that was the last. `from` is not read
/// after that. If `from` ends first, `to`'s writing is ended.
pub(super) async fn relay_some(
    from: &TcpStream,
    to: &TcpStream,
    counter: &AtomicU64,
    mut until: impl FnMut(&[u8]) -> io::Result<(usize, bool)>,
) -> io::Result<()> {
    let mut buf = vec![0; COPY_BUFFER];
    loop {
        let read = read(from, &mut buf).await?;
        if read == 0 {
            return shutdown(to);
        }
        let (pass, done) = until(&buf[..read])?;
        write_all(to, &buf[..pass]).await?;
        counter.fetch_add(pass as u64, Ordering::Relaxed);
        if done {
            return Ok(());
        }
    }
}

/// Writes all of `bytes` to a socket shared with a reader.
pub(super) async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

async fn read(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        from.readable().await?;
        match from.try_read(buf) {
            Ok(read) => return Ok(read),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
}

fn shutdown(to: &TcpStream) -> io::Result<()> {
    match nix::sys::socket::shutdown(to.as_raw_fd(), Shutdown::Write) {
        // The peer is gone already: nothing is left to end.
        Ok(()) | Err(nix::errno::Errno::ENOTCONN) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

fn pipe() -> io::Result<Pipe> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe moves more per system call; the default (64 KiB) works too.
    let _ = fcntl(&write, FcntlArg::F_SETPIPE_SZ(PIPE_CAPACITY as i32));
    Ok(Pipe { read, write })
}

async fn splice_all(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counter: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so `WouldBlock` means `from` has nothing to read.
        let filled = loop {
            from.readable().await?;
            let spliced = from.try_io(Interest::READABLE, || {
                Ok(splice(from, None, &pipe.write, None, PIPE_CAPACITY, flags)?)
            });
            match spliced {
                Ok(filled) => break filled,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        };
        if filled == 0 {
            return shutdown(to);
        }
        // The pipe holds `left` bytes, so `WouldBlock` means `to` is full.
        let mut left = filled;
        while left > 0 {
            to.writable().await?;
            let spliced = to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pipe.read, None, to, None, left, flags)?)
            });
            match spliced {
                Ok(moved) => left -= moved,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
        counter.fetch_add(filled as u64, Ordering::Relaxed);
    }
}

async fn copy_all(from: &TcpStream, to: &TcpStream, counter: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0; COPY_BUFFER];
    loop {
        let read = read(from, &mut buf).await?;
        if read == 0 {
            return shutdown(to);
        }
        write_all(to, &buf[..read]).await?;
        counter.fetch_add(read as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Two connected sockets: the one connected, and the one accepted.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let address = listener.local_addr().expect("its address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (
            connected.expect("connecting"),
            accepted.expect("accepting").0,
        )
    }

    /// Sends a megabyte into `from`'s peer, runs `relay_one_way` from `from` to `to`, and
    /// checks that `to`'s peer gets it all, then the end, and the counter says so.
    async fn check<F>(relay_one_way: impl FnOnce(TcpStream, TcpStream, &'static AtomicU64) -> F)
    where
        F: Future<Output = io::Result<()>> + Send + 'static,
    {
        // One counter per test, alive as long as the relay's task.
        let counted: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
        let (mut sender, from) = connected().await;
        let (to, mut receiver) = connected().await;
        let relayed = tokio::spawn(relay_one_way(from, to, counted));
        let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
        let expected = payload.clone();
        let sending = tokio::spawn(async move {
            sender.write_all(&payload).await?;
            sender.shutdown().await
        });
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), receiver.read_to_end(&mut got))
            .await
            .expect("in time")
            .expect("reading");
        assert!(got == expected, "{} bytes of {}", got.len(), expected.len());
        sending.await.expect("the sender").expect("sending");
        relayed.await.expect("the relay").expect("relaying");
        assert_eq!(counted.load(Ordering::Relaxed), expected.len() as u64);
    }

    #[tokio::test]
    async fn splicing_moves_every_byte_and_the_end() {
        check(|from, to, counter| async move {
            let pipe = pipe()?;
            splice_all(&from, &to, &pipe, counter).await
        })
        .await;
    }

    #[tokio::test]
    async fn copying_moves_every_byte_and_the_end() {
        check(|from, to, counter| async move { copy_all(&from, &to, counter).await }).await;
    }
}
