//! Spawn orders to the keeper, pipelined on a connection of their own, so the supervisor
//! never waits for a fork: a writer task sends every order queued since its last write as
//! one message (one line each), and a reader task takes the answers, which come in the
//! same order, and hands each to its order's `done`. While the keeper forks one agent, the
//! supervisor prepares the next ones. Both tasks run on agentd's runtime, the supervisor's
//! own thread: an answer wakes that thread once, as a blocking read did.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{ANSWER_WITHIN, Reply, Request, SpawnOrder, unexpected};
use crate::launch::Started;

/// Called once with the keeper's answer to one order.
pub(crate) type SpawnDone = Box<dyn FnOnce(io::Result<Started>) + Send>;

/// The orders sent and not yet answered, oldest first, with when each was sent; `broken`
/// once the connection failed, after which every order fails as it is made.
#[derive(Default)]
struct Pending {
    orders: VecDeque<(Instant, SpawnDone)>,
    broken: bool,
}

type Shared = Arc<Mutex<Pending>>;

pub(super) struct Orders {
    lines: mpsc::UnboundedSender<Vec<u8>>,
    pending: Shared,
}

impl Orders {
    /// Starts the two tasks on `stream`, a connection to the keeper. Must be called inside
    /// the tokio runtime.
    pub fn start(stream: std::os::unix::net::UnixStream) -> io::Result<Orders> {
        stream.set_nonblocking(true)?;
        let (read, write) = tokio::net::UnixStream::from_std(stream)?.into_split();
        let (lines, queued) = mpsc::unbounded_channel();
        let pending = Shared::default();
        tokio::spawn(write_orders(write, queued, pending.clone()));
        tokio::spawn(read_answers(read, pending.clone()));
        Ok(Orders { lines, pending })
    }

    pub fn send(&self, order: SpawnOrder, done: SpawnDone) {
        let mut line = match serde_json::to_vec(&Request::Spawn(Box::new(order))) {
            Ok(line) => line,
            Err(error) => return done(Err(io::Error::other(error))),
        };
        line.push(b'\n');
        // Queued for the answer before the order can leave.
        let mut pending = lock(&self.pending);
        if pending.broken || self.lines.send(line).is_err() {
            drop(pending);
            return done(Err(gone()));
        }
        pending.orders.push_back((Instant::now(), done));
    }
}

fn lock(pending: &Shared) -> std::sync::MutexGuard<'_, Pending> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The connection failed: every order waiting fails (the first with `error`), and so does
/// every later one.
fn fail_all(pending: &Shared, error: io::Error) {
    tracing::error!(%error, "the keeper's spawn connection failed; spawns fail from now on");
    let orders = {
        let mut pending = lock(pending);
        pending.broken = true;
        std::mem::take(&mut pending.orders)
    };
    let mut first = Some(lost(format!(
        "the keeper's spawn connection failed: {error}"
    )));
    for (_, done) in orders {
        done(Err(first.take().unwrap_or_else(gone)));
    }
}

fn gone() -> io::Error {
    lost("the keeper stopped answering earlier; restart agentd".into())
}

/// The connection to the keeper failed: an order that fails so may still have been carried
/// out (the keeper may fork it later), so agentd must stop and adopt what runs at its next
/// start rather than record a failure.
#[derive(Debug)]
struct ConnectionLost(String);

impl std::fmt::Display for ConnectionLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectionLost {}

fn lost(why: String) -> io::Error {
    io::Error::other(ConnectionLost(why))
}

/// Whether a spawn failed because the connection to the keeper did, not the spawn itself.
pub(crate) fn connection_lost(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<ConnectionLost>())
}

/// Sends the orders, every one queued since the last write in one message.
async fn write_orders(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut queued: mpsc::UnboundedReceiver<Vec<u8>>,
    pending: Shared,
) {
    while let Some(mut message) = queued.recv().await {
        while let Ok(line) = queued.try_recv() {
            message.extend_from_slice(&line);
        }
        // Orders that failed already must not reach the keeper after all.
        if lock(&pending).broken {
            return;
        }
        if let Err(error) = write.write_all(&message).await {
            return fail_all(&pending, error);
        }
    }
}

/// Hands each answer to its order. Once the connection fails (closed, an answer that does
/// not parse or that nobody waits for, or none within `ANSWER_WITHIN`), it is never read
/// again: a late answer would be taken for the next order's. Every order then fails.
async fn read_answers(read: tokio::net::unix::OwnedReadHalf, pending: Shared) {
    let mut lines = tokio::io::BufReader::new(read).lines();
    let failure = loop {
        // Until the oldest order waiting is due; `next_line` is cancellation safe: a line
        // cut by the timeout is read whole next time.
        let due = lock(&pending)
            .orders
            .front()
            .map_or(ANSWER_WITHIN, |(sent, _)| {
                (*sent + ANSWER_WITHIN).saturating_duration_since(Instant::now())
            });
        let line = match tokio::time::timeout(due, lines.next_line()).await {
            Err(_) => {
                let late = lock(&pending)
                    .orders
                    .front()
                    .is_some_and(|(sent, _)| sent.elapsed() >= ANSWER_WITHIN);
                if late {
                    break io::Error::new(io::ErrorKind::TimedOut, "the keeper did not answer");
                }
                continue;
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                break io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the keeper closed the connection",
                );
            }
            Ok(Err(error)) => break error,
        };
        let answer = match serde_json::from_str(&line) {
            Ok(Reply::Spawned { pid, start_ticks }) => Ok(Started {
                pid,
                start_ticks,
                cgroup: None,
                fallbacks: Vec::new(),
                proxy: None,
                gateway: None,
            }),
            // The keeper could not start this one (fork, set-up or exec): its errno.
            Ok(Reply::Failed { errno, message }) => Err(match errno {
                Some(errno) => io::Error::from_raw_os_error(errno),
                None => io::Error::other(message),
            }),
            Ok(other) => break unexpected(&other),
            Err(error) => break io::Error::other(error),
        };
        let Some((_, done)) = lock(&pending).orders.pop_front() else {
            break io::Error::other("an answer from the keeper to no order");
        };
        done(answer);
    };
    fail_all(&pending, failure);
}
