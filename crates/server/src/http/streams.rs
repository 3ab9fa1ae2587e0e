//! The HTTP routes that stream: an agent's output as raw bytes, and events as server-sent
//! events.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agentd_core::{EventFormat, LogStream};
use agentd_proto::figures::FIGURES_JSON;
use agentd_proto::v1 as pb;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use bytes::BytesMut;
use tokio_stream::{Stream, StreamExt};
use tonic::{Code, Status};

use super::{Answer, Api, ApiError, Query, error_response};
use crate::convert::{Mirror, error_body};
use crate::logs;
use crate::watch::{WatchStream, Watched};

/// Between two comments on an idle event stream, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The raw bytes of an agent's output, chunked as written. `Agentd-Stdout-Offset` and
/// `Agentd-Stderr-Offset` say where each stream starts: add the bytes received to resume
/// with `stdout_offset` (one stream at a time).
pub(super) async fn logs(
    State(api): State<Api>,
    Path(agent_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Answer {
    let started = Instant::now();
    let result = logs_started(&api, agent_id, Query::parse(raw)).await;
    let code = result.as_ref().map_or_else(|e| e.0.code(), |_| Code::Ok);
    api.metrics.rpc("StreamLogs", code, started.elapsed());
    let started = result?;
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    for (stream, offset) in started.offsets {
        let name = match stream {
            LogStream::Stdout => "agentd-stdout-offset",
            LogStream::Stderr => "agentd-stderr-offset",
        };
        headers.insert(name, HeaderValue::from(offset));
    }
    // An error after the first byte can only cut the body short.
    let body = started.chunks.map(|chunk| {
        chunk
            .map(|chunk| Bytes::from(chunk.data))
            .map_err(|status| std::io::Error::other(status.message().to_string()))
    });
    Ok((headers, Body::from_stream(body)).into_response())
}

async fn logs_started(
    api: &Api,
    agent_id: String,
    query: Query,
) -> Result<logs::Started, ApiError> {
    let stream = match query.one("stream") {
        None => pb::LogStream::Unspecified,
        Some(name) => pb::LogStream::from_str_name(name)
            .or_else(|| {
                pb::LogStream::from_str_name(&format!("LOG_STREAM_{}", name.to_ascii_uppercase()))
            })
            .ok_or_else(|| {
                ApiError(Status::invalid_argument(format!(
                    "invalid query parameter `stream`: `{name}` is not stdout or stderr"
                )))
            })?,
    };
    let request = pb::StreamLogsRequest {
        agent_id,
        stream: stream.into(),
        tail: query.parsed("tail")?.unwrap_or(0),
        stdout_offset: query.parsed("stdout_offset")?,
        stderr_offset: query.parsed("stderr_offset")?,
        follow: query.flag("follow")?,
    };
    Ok(logs::stream(api.supervisor.clone(), request, api.shutdown.clone()).await?)
}

/// `text/event-stream` of AgentEvents: `id:` the sequence, `event:` the kind's name,
/// `data:` the event's JSON. A browser's `Last-Event-ID` (or `after`) resumes exactly; a
/// position the daemon no longer holds is `410 Gone`. A watcher that ends (too slow,
/// shutdown) gets a last `event: error` with the error's JSON.
pub(super) async fn events(
    State(api): State<Api>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    let query = Query::parse(raw);
    let last_event_id = headers
        .get("last-event-id")
        .map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError(Status::invalid_argument(
                        "invalid `Last-Event-ID`: not an event sequence",
                    ))
                })
        })
        .transpose()?;
    // A browser reconnects to the same URL with `Last-Event-ID`: resuming then replaces
    // the snapshot it asked for the first time.
    let after_sequence = last_event_id.or(query.parsed("after")?);
    let request = pb::WatchAgentsRequest {
        agent_ids: query.all("agent").map(Into::into).collect(),
        parent_agent_id: query.one("parent").unwrap_or_default().into(),
        kinds: query.enums("kind", |name| {
            pb::EventKind::from_str_name(name).map(Into::into)
        })?,
        include_snapshot: last_event_id.is_none() && query.flag("snapshot")?,
        after_sequence,
        health_interval: query.duration("health_interval")?,
        replay_only: query.flag("replay_only")?,
        view: match query.one("view") {
            None | Some("full") => pb::EventView::Full,
            Some("figures") => pb::EventView::Figures,
            Some(other) => {
                return Err(ApiError(Status::invalid_argument(format!(
                    "unknown `view` `{other}`: `full` or `figures`"
                ))));
            }
        }
        .into(),
    };
    let stream = match api.service.watch(request).await {
        Ok(stream) => stream,
        Err(status) if status.code() == Code::OutOfRange => {
            return Ok(error_response(StatusCode::GONE, &status));
        }
        Err(status) => return Err(status.into()),
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    let body = ServerSentEvents {
        events: stream,
        keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE)),
        ended: false,
        batch: BytesMut::new(),
    };
    Ok((headers, Body::from_stream(body)).into_response())
}

/// Largest chunk written at once.
const BATCH: usize = 256 << 10;

/// The `text/event-stream` body, written by hand so that every event ready at once goes out
/// in one chunk: a round of a thousand samples is a few writes per client, not a thousand.
/// Each event's frame is made once, by the first client that sends it.
struct ServerSentEvents {
    events: WatchStream,
    /// A comment when nothing was sent for [`KEEP_ALIVE`], so proxies keep the stream open.
    keep_alive: Pin<Box<tokio::time::Sleep>>,
    ended: bool,
    /// Reused: once the last chunk is written and dropped, its allocation comes back.
    batch: BytesMut,
}

impl Stream for ServerSentEvents {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        while !this.ended && this.batch.len() < BATCH {
            match Pin::new(&mut this.events).poll_next(cx) {
                Poll::Ready(Some(Ok(event))) => this.batch.extend_from_slice(frame(&event)),
                // The watcher was ended (too slow, shutdown): say why, then end.
                Poll::Ready(Some(Err(status))) => this.batch.extend_from_slice(
                    format!("event: error\ndata: {}\n\n", error_body(&status)).as_bytes(),
                ),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => break,
            }
        }
        if !this.batch.is_empty() {
            let next = tokio::time::Instant::now() + KEEP_ALIVE;
            this.keep_alive.as_mut().reset(next);
            return Poll::Ready(Some(Ok(this.batch.split().freeze())));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        match self.keep_alive.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let next = tokio::time::Instant::now() + KEEP_ALIVE;
                self.keep_alive.as_mut().reset(next);
                Poll::Ready(Some(Ok(Bytes::from_static(b": keep-alive\n\n"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// `id: SEQUENCE`, `event: EVENT_KIND_...`, `data: JSON` (one line: serde_json writes no
/// newline), and the blank line that ends an event.
fn frame(watched: &Watched) -> &[u8] {
    let formats = (EventFormat::ServerSent, EventFormat::ServerSentFigures);
    watched.encoded(formats, |message| {
        let kind = watched.event.kind.to_wire().as_str_name();
        let sequence = watched.event.sequence;
        let mut frame = format!("id: {sequence}\nevent: {kind}\ndata: ").into_bytes();
        let json = serde_json::to_value(&message).map(|mut json| {
            if watched.figures
                && let Some(status) = json.get_mut("status").and_then(|s| s.as_object_mut())
            {
                status.retain(|field, _| FIGURES_JSON.contains(&field.as_str()));
            }
            json
        });
        if json
            .and_then(|json| serde_json::to_writer(&mut frame, &json))
            .is_err()
        {
            frame.extend_from_slice(b"{}");
        }
        frame.extend_from_slice(b"\n\n");
        frame
    })
}
