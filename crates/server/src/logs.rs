//! `StreamLogs`: an agent's output read from its files by offset, and with `follow`, new
//! output as the folder changes (inotify), until the agent has ended for good and every
//! byte it wrote has been sent. Backpressure is the client's: a slow reader only slows its
//! own stream; the agent writes to its files and never waits for anyone.

use std::path::PathBuf;

use agentd_core::{
    EventFilter, EventKind, FolderWatch, LogError, LogFile, LogStream, SupervisorHandle, Watch,
};
use agentd_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::convert::error_status;

/// Largest chunk sent.
const CHUNK: usize = 64 * 1024;

/// One stream being sent, and where it is.
struct Cursor {
    stream: LogStream,
    log: LogFile,
    offset: u64,
}

/// A log stream that has started: where each of its streams starts, and the chunks.
pub struct Started {
    pub offsets: Vec<(LogStream, u64)>,
    pub chunks: ReceiverStream<Result<pb::LogChunk, Status>>,
}

pub async fn stream(
    supervisor: SupervisorHandle,
    request: pb::StreamLogsRequest,
    shutdown: CancellationToken,
) -> Result<Started, Status> {
    if request.tail > 0 && (request.stdout_offset.is_some() || request.stderr_offset.is_some()) {
        return Err(Status::invalid_argument(
            "give either `tail` or offsets, not both",
        ));
    }
    let streams: &[(LogStream, Option<u64>)] = match pb::LogStream::try_from(request.stream) {
        Ok(pb::LogStream::Unspecified) => &[
            (LogStream::Stdout, request.stdout_offset),
            (LogStream::Stderr, request.stderr_offset),
        ],
        Ok(pb::LogStream::Stdout) => &[(LogStream::Stdout, request.stdout_offset)],
        Ok(pb::LogStream::Stderr) => &[(LogStream::Stderr, request.stderr_offset)],
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "invalid `stream`: {} is not a LogStream",
                request.stream
            )));
        }
    };
    // Subscribe before looking at the agent, so its end cannot fall in between.
    let ends = match request.follow {
        false => None,
        true => Some(
            supervisor
                .watch(Watch {
                    filter: EventFilter {
                        agent_ids: [request.agent_id.clone()].into(),
                        kinds: [
                            EventKind::Exited,
                            EventKind::Failed,
                            EventKind::Killed,
                            EventKind::TimedOut,
                            EventKind::Lost,
                            EventKind::Removed,
                        ]
                        .into(),
                        ..EventFilter::default()
                    },
                    ..Watch::default()
                })
                .await
                .map_err(error_status)?
                .events,
        ),
    };
    let status = supervisor
        .status(request.agent_id.clone())
        .await
        .map_err(error_status)?;
    let dir = status.record.agent_dir.clone();
    // Finding the last lines may read hundreds of MB backwards: not on the runtime thread.
    let (tail, wanted, folder) = (request.tail, streams.to_vec(), dir.clone());
    let cursors = tokio::task::spawn_blocking(move || start_cursors(&folder, &wanted, tail))
        .await
        .map_err(|error| Status::internal(format!("finding where to start: {error}")))??;
    let offsets = cursors.iter().map(|c| (c.stream, c.offset)).collect();
    let (queue, chunks) = mpsc::channel(16);
    let mut sender = Sender {
        queue,
        supervisor,
        agent_id: request.agent_id,
        dir,
        ended: !status.record.state.holds_capacity(),
    };
    tokio::spawn(async move {
        if let Err(status) = sender.run(cursors, ends, request.follow, shutdown).await {
            let _ = sender.queue.send(Err(status)).await;
        }
    });
    Ok(Started {
        offsets,
        chunks: ReceiverStream::new(chunks),
    })
}

/// Where each stream starts: at an offset, at its last `tail` lines, or at its oldest byte.
fn start_cursors(
    dir: &std::path::Path,
    streams: &[(LogStream, Option<u64>)],
    tail: u32,
) -> Result<Vec<Cursor>, Status> {
    let mut cursors = Vec::new();
    for &(stream, offset) in streams {
        let log = LogFile::new(dir, stream);
        let start = match (tail, offset) {
            (0, Some(offset)) => offset,
            (0, None) => log.first_offset().map_err(read_error)?,
            (lines, _) => log.tail_offset(lines).map_err(log_error)?,
        };
        let end = log.end_offset().map_err(read_error)?;
        if start > end {
            return Err(Status::out_of_range(format!(
                "offset {start} is past the end of {} ({end})",
                stream.file_name()
            )));
        }
        cursors.push(Cursor {
            stream,
            log,
            offset: start,
        });
    }
    Ok(cursors)
}

struct Sender {
    queue: mpsc::Sender<Result<pb::LogChunk, Status>>,
    supervisor: SupervisorHandle,
    agent_id: String,
    dir: PathBuf,
    /// The agent has ended for good: once drained, the stream closes.
    ended: bool,
}

/// The client went away.
struct Gone;

impl Sender {
    async fn run(
        &mut self,
        mut cursors: Vec<Cursor>,
        mut ends: Option<tokio::sync::broadcast::Receiver<std::sync::Arc<agentd_core::Event>>>,
        follow: bool,
        shutdown: CancellationToken,
    ) -> Result<(), Status> {
        let mut folder = match follow {
            true => Some(FolderWatch::new(&self.dir).map_err(|e| {
                Status::internal(format!("watching the output of `{}`: {e}", self.agent_id))
            })?),
            false => None,
        };
        loop {
            // Changes from here on wake the watch, so nothing written during the drain is missed.
            let ended = self.ended;
            let sent = match self.drain(&mut cursors).await {
                Ok(sent) => sent,
                Err(Gone) => return Ok(()),
            };
            let Some(folder) = folder.as_mut() else {
                return Ok(());
            };
            // After the end, drain until a pass finds nothing more.
            if ended {
                if sent {
                    continue;
                }
                return Ok(());
            }
            tokio::select! {
                () = shutdown.cancelled() => {
                    return Err(Status::unavailable("agentd is shutting down"));
                }
                () = self.queue.closed() => return Ok(()),
                changed = folder.changed() => {
                    changed.map_err(|e| Status::internal(format!("watching output: {e}")))?;
                }
                open = recv_end(&mut ends) => {
                    if !open {
                        ends = None;
                    }
                    self.check_ended().await?;
                }
            }
        }
    }

    /// Sends everything written so far; returns whether there was anything.
    async fn drain(&mut self, cursors: &mut [Cursor]) -> Result<bool, Gone> {
        let mut sent = false;
        let mut buf = vec![0u8; CHUNK];
        for cursor in cursors {
            loop {
                let read = match cursor.log.read_at(cursor.offset, &mut buf) {
                    Ok(0) => break,
                    Ok(read) => read,
                    Err(error) => {
                        let _ = self.queue.send(Err(log_error(error))).await;
                        return Err(Gone);
                    }
                };
                let chunk = pb::LogChunk {
                    stream: match cursor.stream {
                        LogStream::Stdout => pb::LogStream::Stdout,
                        LogStream::Stderr => pb::LogStream::Stderr,
                    }
                    .into(),
                    offset: cursor.offset,
                    data: buf[..read].to_vec(),
                };
                self.queue.send(Ok(chunk)).await.map_err(|_| Gone)?;
                cursor.offset += read as u64;
                sent = true;
            }
        }
        Ok(sent)
    }

    /// After an end-like event: a restart continues the stream, an end for good closes it.
    async fn check_ended(&mut self) -> Result<(), Status> {
        match self.supervisor.status(self.agent_id.clone()).await {
            Ok(status) => self.ended = !status.record.state.holds_capacity(),
            Err(agentd_core::Error::NotFound { .. }) => self.ended = true,
            Err(error) => return Err(error_status(error)),
        }
        if self.ended {
            tracing::debug!(agent_id = %self.agent_id, "output follower: agent ended");
        }
        Ok(())
    }
}

/// Waits for the next end-like event (a lagged subscription also means "check the agent");
/// false once the subscription is closed. Pending forever without one.
async fn recv_end(
    ends: &mut Option<tokio::sync::broadcast::Receiver<std::sync::Arc<agentd_core::Event>>>,
) -> bool {
    match ends {
        Some(ends) => !matches!(
            ends.recv().await,
            Err(tokio::sync::broadcast::error::RecvError::Closed)
        ),
        None => std::future::pending().await,
    }
}

fn read_error(error: std::io::Error) -> Status {
    Status::internal(format!("reading agent output: {error}"))
}

fn log_error(error: LogError) -> Status {
    match error {
        LogError::Gone { offset, first } => Status::out_of_range(format!(
            "output before offset {first} was rotated away (asked for {offset}): resume from {first}"
        )),
        LogError::Io(error) => read_error(error),
    }
}
