//! The largest request agentd reads (`--max-request-bytes`). A gRPC body that grows past it
//! ends with RESOURCE_EXHAUSTED, as the gRPC specification asks of a server's message limit
//! (tonic's own limit answers OUT_OF_RANGE, so it is lifted and this one counts instead).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use tonic::Status;

use crate::convert::{Exhausted, exhausted};

/// Wraps every request body of a tonic server.
#[derive(Clone, Copy)]
pub struct RequestLimit {
    pub max_bytes: usize,
}

impl<S> tower::Layer<S> for RequestLimit {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            max_bytes: self.max_bytes,
        }
    }
}

#[derive(Clone)]
pub struct Limited<S> {
    inner: S,
    max_bytes: usize,
}

impl<S> tower::Service<axum::http::Request<tonic::body::Body>> for Limited<S>
where
    S: tower::Service<axum::http::Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<tonic::body::Body>) -> Self::Future {
        let max_bytes = self.max_bytes;
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(Counted {
                body,
                // A gRPC message has a 5-byte prefix; the limit is on the message.
                left: max_bytes.saturating_add(5),
                max_bytes,
            })
        }))
    }
}

struct Counted {
    body: tonic::body::Body,
    left: usize,
    max_bytes: usize,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let size = frame.data_ref().map_or(0, Bytes::len);
                if size > this.left {
                    return Poll::Ready(Some(Err(exhausted(
                        format!(
                            "the request is over the {} bytes agentd reads (--max-request-bytes)",
                            this.max_bytes
                        ),
                        Exhausted::RequestSize,
                    ))));
                }
                this.left -= size;
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
