//! Streams end when what opened them no longer holds. A stream (WatchAgents, StreamLogs,
//! `/v1/events`, followed output) is authenticated once, when it opens; its answer's body is
//! wrapped so that whenever the token file is reloaded or a session is closed, it checks its
//! token or session again, and ends with UNAUTHENTICATED if it is gone: gRPC in the trailers,
//! server-sent events with a last `event: error`, raw output by cutting the body short.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::auth::{Guard, Held};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a revoked stream says so.
#[derive(Debug, Clone, Copy)]
pub enum Ending {
    /// `grpc-status` and `grpc-message` in the trailers.
    Grpc,
    /// A last `event: error` with `{code, message}`.
    ServerSentEvents,
    /// The body is cut short (a chunked body without its last chunk).
    Cut,
}

pub struct Revocable<B> {
    body: B,
    guard: Arc<Guard>,
    held: Held,
    revoked: Pin<Box<WaitForCancellationFutureOwned>>,
    ending: Ending,
    ended: bool,
}

impl<B> Revocable<B> {
    /// `revocation` is the guard's, taken before the request was checked.
    pub fn new(
        body: B,
        guard: Arc<Guard>,
        held: Held,
        revocation: CancellationToken,
        ending: Ending,
    ) -> Revocable<B> {
        Revocable {
            body,
            guard,
            held,
            revoked: Box::pin(revocation.cancelled_owned()),
            ending,
            ended: false,
        }
    }

    /// Whether the credential was revoked since the stream opened; else the revocation is
    /// watched again.
    fn revoked(&mut self, cx: &mut Context<'_>) -> bool {
        while self.revoked.as_mut().poll(cx).is_ready() {
            let next = self.guard.revocation();
            if !self.guard.still_valid(&self.held) {
                return true;
            }
            self.revoked = Box::pin(next.cancelled_owned());
        }
        false
    }
}

const MESSAGE: &str = "the token or session this stream was opened with was revoked (the token \
                       file no longer holds it, or the session was closed)";

impl<B> Body for Revocable<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if this.revoked(cx) {
            this.ended = true;
            tracing::info!("ended a stream whose token or session was revoked");
            let status = Status::unauthenticated(MESSAGE);
            return Poll::Ready(Some(match this.ending {
                Ending::Grpc => {
                    let mut trailers = axum::http::HeaderMap::new();
                    match status.add_header(&mut trailers) {
                        Ok(()) => Ok(Frame::trailers(trailers)),
                        Err(_) => Err(MESSAGE.into()),
                    }
                }
                Ending::ServerSentEvents => Ok(Frame::data(Bytes::from(format!(
                    "event: error\ndata: {}\n\n",
                    crate::convert::error_body(&status)
                )))),
                Ending::Cut => Err(MESSAGE.into()),
            }));
        }
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            polled => polled.map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
