//! Spawn orders to the keeper, pipelined on a connection of their own, so the supervisor
//! never waits for a fork: a writer thread sends every order queued since its last write as
//! one message (one line each), and a reader thread takes the answers, which come in the
//! same order, and hands each to its order's `done`. While the keeper forks one agent, the
//! supervisor prepares the next ones.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;

use super::{ANSWER_WITHIN, Reply, Request, SpawnOrder, unexpected};
use crate::launch::Started;

/// Called once with the keeper's answer to one order (on the reader thread).
pub(crate) type SpawnDone = Box<dyn FnOnce(io::Result<Started>) + Send>;

pub(super) struct Orders {
    queue: mpsc::Sender<(SpawnOrder, SpawnDone)>,
}

impl Orders {
    /// Starts the two threads on `stream`, a connection to the keeper.
    pub fn start(stream: UnixStream) -> io::Result<Orders> {
        stream.set_read_timeout(Some(ANSWER_WITHIN))?;
        let reading = stream.try_clone()?;
        let (queue, orders) = mpsc::channel();
        let (pending, answered) = mpsc::channel();
        std::thread::Builder::new()
            .name("keeper-orders".into())
            .spawn(move || write_orders(stream, &orders, &pending))?;
        std::thread::Builder::new()
            .name("keeper-answers".into())
            .spawn(move || read_answers(reading, &answered))?;
        Ok(Orders { queue })
    }

    pub fn send(&self, order: SpawnOrder, done: SpawnDone) {
        if let Err(mpsc::SendError((_, done))) = self.queue.send((order, done)) {
            done(Err(gone()));
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the keeper stopped answering earlier; restart agentd",
    )
}

/// Sends the orders, as many at a time as have queued; each `done` goes to the reader
/// before its order leaves, so the reader always knows whose the next answer is.
fn write_orders(
    mut stream: UnixStream,
    orders: &mpsc::Receiver<(SpawnOrder, SpawnDone)>,
    pending: &mpsc::Sender<SpawnDone>,
) {
    let mut message = Vec::new();
    while let Ok(first) = orders.recv() {
        message.clear();
        for (order, done) in std::iter::once(first).chain(orders.try_iter()) {
            let start = message.len();
            match serde_json::to_writer(&mut message, &Request::Spawn(Box::new(order))) {
                Ok(()) => message.push(b'\n'),
                Err(error) => {
                    message.truncate(start);
                    done(Err(io::Error::other(error)));
                    continue;
                }
            }
            if let Err(mpsc::SendError(done)) = pending.send(done) {
                message.truncate(start);
                done(Err(gone()));
            }
        }
        if let Err(error) = stream.write_all(&message) {
            // The reader then reads the end of the stream, and fails every order left.
            tracing::error!(%error, "sending spawn orders to the keeper");
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Hands each answer to its order. Once the connection fails (closed, an answer that does
/// not parse, or none within `ANSWER_WITHIN`), it is never read again: a late answer
/// would be taken for the next order's. Every order then fails at once.
fn read_answers(stream: UnixStream, answered: &mpsc::Receiver<SpawnDone>) {
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    while let Ok(done) = answered.recv() {
        line.clear();
        let reply = match stream.read_line(&mut line) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the keeper closed the connection",
            )),
            Ok(_) => serde_json::from_str(&line).map_err(io::Error::other),
            Err(error) => Err(error),
        };
        let failure = match reply {
            Ok(Reply::Spawned { pid, start_ticks }) => {
                done(Ok(Started {
                    pid,
                    start_ticks,
                    cgroup: None,
                    fallbacks: Vec::new(),
                    proxy: None,
                    gateway: None,
                }));
                continue;
            }
            // The keeper could not start this one (fork, set-up or exec): its errno.
            Ok(Reply::Failed { errno, message }) => {
                done(Err(match errno {
                    Some(errno) => io::Error::from_raw_os_error(errno),
                    None => io::Error::other(message),
                }));
                continue;
            }
            Ok(other) => unexpected(&other),
            Err(error) => error,
        };
        tracing::error!(error = %failure, "the keeper's spawn connection failed; spawns fail from now on");
        done(Err(failure));
        let _ = stream.get_ref().shutdown(std::net::Shutdown::Both);
        for done in answered.iter() {
            done(Err(gone()));
        }
        return;
    }
}
