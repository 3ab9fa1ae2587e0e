//! `WatchAgents`: one forwarding task per watcher moves events from the supervisor's
//! broadcast ring into the watcher's bounded queue. A watcher whose queue stays full for
//! [`STUCK_AFTER`], or that falls behind the whole ring, is ended with RESOURCE_EXHAUSTED,
//! naming the last sequence it was given so it can resume. The supervisor never waits for a
//! watcher: it only writes to the ring, which overwrites what the slowest has not read.
//!
//! Below the service: `service.rs` starts watchers here, and `watch_route.rs` serves them to
//! gRPC clients; nothing here knows either.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use agentd_core::{Event, EventFilter, EventFormat, EventKind, Subscription};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::mpsc::error::{SendTimeoutError, TrySendError};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::convert;
use crate::metrics::{Metrics, WatcherEnd};

/// How long a watcher's queue may stay full before the watcher counts as stuck. Short
/// bursts (a sample of every agent at once) wait in the broadcast ring meanwhile.
const STUCK_AFTER: Duration = Duration::from_secs(2);

/// A watcher's place under `--max-watchers`, given back when its stream is dropped.
pub struct WatcherSlot(Arc<AtomicUsize>);

impl WatcherSlot {
    pub fn take(open: &Arc<AtomicUsize>, max: usize) -> Result<WatcherSlot, Status> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .map_err(|n| {
            convert::exhausted(
                format!(
                    "agentd serves at most {max} watchers at once (--max-watchers) and {n} are \
                         open: close one, or share one stream between consumers"
                ),
                convert::Exhausted::Watchers,
            )
        })?;
        Ok(WatcherSlot(open.clone()))
    }
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one watcher asked for beyond the event filter.
pub struct WatchOptions {
    pub filter: EventFilter,
    /// `None`: every health sample; zero: none; otherwise at most one per agent per interval.
    pub health_interval: Option<Duration>,
    /// Events queued for the connection before the watcher counts as stuck.
    pub buffer: usize,
    /// End once the replay is sent.
    pub replay_only: bool,
    /// HEALTH events with only the figures of the status (`EVENT_VIEW_FIGURES`).
    pub figures: bool,
}

/// The watcher's events, then, if it was ended, the status saying why. The events are the
/// supervisor's own, shared by every watcher: each API encodes one once per format
/// ([`Event::encoded`]).
pub struct WatchStream {
    queue: mpsc::Receiver<Arc<Event>>,
    end: Option<oneshot::Receiver<Status>>,
    figures: bool,
    /// Held until the client goes away.
    _slot: WatcherSlot,
}

/// An event as one watcher sends it: whole, or with only the figures of its status (a HEALTH
/// event to a watcher that asked for `EVENT_VIEW_FIGURES`).
pub struct Watched {
    pub event: Arc<Event>,
    pub figures: bool,
}

impl Watched {
    /// Its message, as the watcher sends it.
    pub fn message(&self) -> agentd_proto::v1::AgentEvent {
        match self.figures {
            true => convert::event_figures(&self.event),
            false => convert::event(&self.event),
        }
    }

    /// Its encoding in `whole` or `figures`, made once for every watcher that sends it so.
    pub fn encoded(
        &self,
        (whole, figures): (EventFormat, EventFormat),
        encode: impl FnOnce(agentd_proto::v1::AgentEvent) -> Vec<u8>,
    ) -> &[u8] {
        let format = if self.figures { figures } else { whole };
        self.event.encoded(format, |_| encode(self.message()))
    }
}

impl Stream for WatchStream {
    type Item = Result<Watched, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.queue.poll_recv(cx) {
            Poll::Ready(Some(event)) => {
                let figures = self.figures && event.kind == EventKind::Health;
                return Poll::Ready(Some(Ok(Watched { event, figures })));
            }
            Poll::Ready(None) => {}
            Poll::Pending => return Poll::Pending,
        }
        // The queue is drained and closed: the forwarder ended, with a status or without.
        let Some(end) = self.end.as_mut() else {
            return Poll::Ready(None);
        };
        let ended = Pin::new(end).poll(cx);
        self.end = None;
        match ended {
            Poll::Ready(Ok(status)) => Poll::Ready(Some(Err(status))),
            _ => Poll::Ready(None),
        }
    }
}

/// Starts the forwarder and returns the stream tonic sends.
pub fn start(
    subscription: Subscription,
    options: WatchOptions,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    slot: WatcherSlot,
) -> WatchStream {
    let (queue_tx, queue) = mpsc::channel(options.buffer.max(1));
    let figures = options.figures;
    let (end_tx, end) = oneshot::channel();
    metrics.watcher_started();
    tokio::spawn(async move {
        let mut forwarder = Forwarder {
            queue: queue_tx,
            options,
            last_sequence: 0,
            health_sent: HashMap::new(),
        };
        let ended = forwarder.run(subscription, shutdown).await;
        metrics.watcher_ended(match ended.as_ref().map(Status::code) {
            None => WatcherEnd::Gone,
            Some(Code::Unavailable) => WatcherEnd::Shutdown,
            Some(_) => WatcherEnd::Slow,
        });
        if let Some(status) = ended {
            // The status is in place before the queue closes (when `forwarder` drops).
            let _ = end_tx.send(status);
        }
    });
    WatchStream {
        queue,
        end: Some(end),
        figures,
        _slot: slot,
    }
}

struct Forwarder {
    queue: mpsc::Sender<Arc<Event>>,
    options: WatchOptions,
    /// The last sequence queued for this watcher.
    last_sequence: u64,
    /// When each agent's last health sample was queued, for `health_interval`.
    health_sent: HashMap<String, Instant>,
}

/// Why forwarding ended early: the client left.
struct Gone;

impl Forwarder {
    /// Returns the status to end the stream with, or `None` when the client went away.
    async fn run(
        &mut self,
        subscription: Subscription,
        shutdown: CancellationToken,
    ) -> Option<Status> {
        let Subscription {
            snapshot,
            replay,
            mut events,
            current,
            every_round: _every_round,
        } = subscription;
        // Snapshot and replay wait for the client: they are bounded, and the live events
        // meanwhile wait in the broadcast ring.
        let mut seam = snapshot.first().map_or(0, |event| event.sequence);
        for event in snapshot {
            self.send(Arc::new(event)).await.ok()?;
        }
        if let Some(replay) = replay {
            seam = replay.through();
            for event in replay.events() {
                if self.wanted(&event) {
                    self.send(Arc::new(event)).await.ok()?;
                }
            }
        }
        for event in current {
            self.send(Arc::new(event)).await.ok()?;
        }
        if self.options.replay_only {
            return None;
        }
        loop {
            let mut received = tokio::select! {
                () = shutdown.cancelled() => {
                    return Some(Status::unavailable("agentd is shutting down"));
                }
                () = self.queue.closed() => return None,
                received = events.recv() => received,
            };
            // Events come in bursts (a sample of every agent at once): take the rest of the
            // burst without going through the select again.
            loop {
                let event = match received {
                    // At or before the seam: the snapshot or replay already covered it.
                    Ok(event) if event.sequence <= seam => None,
                    Ok(event) => Some(event),
                    Err(RecvError::Lagged(missed)) => {
                        return Some(self.ended(format!("fell {missed} events behind the daemon")));
                    }
                    Err(RecvError::Closed) => return None,
                };
                if let Some(event) = event.filter(|event| self.wanted(event))
                    && let Err(end) = self.forward(event).await
                {
                    return end;
                }
                received = match events.try_recv() {
                    Ok(event) => Ok(event),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Lagged(missed)) => Err(RecvError::Lagged(missed)),
                    Err(TryRecvError::Closed) => Err(RecvError::Closed),
                };
            }
        }
    }

    /// Queues one live event; `Err` with the status to end with (`None`: the client left).
    /// The timer that tells a stuck watcher is only armed when the queue is full.
    async fn forward(&mut self, event: Arc<Event>) -> Result<(), Option<Status>> {
        let sequence = event.sequence;
        let sent = match self.queue.try_send(event) {
            Ok(()) => Ok(()),
            Err(TrySendError::Closed(_)) => return Err(None),
            Err(TrySendError::Full(event)) => self.queue.send_timeout(event, STUCK_AFTER).await,
        };
        match sent {
            Ok(()) => {
                self.last_sequence = sequence;
                Ok(())
            }
            Err(SendTimeoutError::Timeout(_)) => {
                let why = format!(
                    "did not read for {STUCK_AFTER:?} with {} events waiting",
                    self.options.buffer
                );
                Err(Some(self.ended(why)))
            }
            Err(SendTimeoutError::Closed(_)) => Err(None),
        }
    }

    async fn send(&mut self, event: Arc<Event>) -> Result<(), Gone> {
        let sequence = event.sequence;
        self.queue.send(event).await.map_err(|_| Gone)?;
        self.last_sequence = sequence;
        Ok(())
    }

    fn wanted(&mut self, event: &Event) -> bool {
        if !self.options.filter.matches(event) {
            return false;
        }
        if event.kind != EventKind::Health {
            return true;
        }
        match self.options.health_interval {
            None => true,
            Some(interval) if interval.is_zero() => false,
            Some(interval) => {
                let now = Instant::now();
                let agent_id = event.status.agent_id();
                match self.health_sent.get(agent_id) {
                    Some(sent) if now.duration_since(*sent) < interval => false,
                    _ => {
                        self.health_sent.insert(agent_id.to_string(), now);
                        true
                    }
                }
            }
        }
    }

    fn ended(&self, why: String) -> Status {
        convert::exhausted(
            format!(
                "this watcher {why} and was ended; the last event it was given is sequence {}: \
                 watch again with after_sequence set to it",
                self.last_sequence
            ),
            convert::Exhausted::SlowWatcher,
        )
    }
}
