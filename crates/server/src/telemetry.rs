//! OpenTelemetry traces over OTLP/gRPC, on only when the standard `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; the exporter reads the other standard
//! `OTEL_*` variables itself. A span per RPC and HTTP request (`Traced`), continuing the
//! caller's W3C `traceparent` and lasting until the answer's body ends (`TracedBody`); a
//! spawned agent gets the span's context as `TRACEPARENT` and `TRACESTATE`, so its own spans
//! join the trace. The supervisor's own spans (`agentd_core::TRACE_TARGET`) are children of
//! these. Off, requests pass through without a span and the propagator is a no-op: nothing is
//! exported and no span is made.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use agentd_core::TRACE_TARGET;
use anyhow::Context as _;
use axum::http::{HeaderMap, Request, Response};
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Whether the variables ask for traces.
pub fn wanted() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// The exporter's provider (to flush at exit) and a tracer for the tracing layer.
pub fn provider() -> anyhow::Result<(SdkTracerProvider, opentelemetry_sdk::trace::Tracer)> {
    // The exporter's gRPC client gets a runtime and thread of its own: built inside it, its
    // connection tasks run there, so encoding and sending spans never take the thread that
    // serves requests.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the OTLP exporter's runtime")?;
    let exporting = runtime.handle().clone();
    std::thread::Builder::new()
        .name("agentd-otlp".into())
        .spawn(move || runtime.block_on(std::future::pending::<()>()))
        .context("starting the OTLP exporter's thread")?;
    let _inside = exporting.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .context("setting up the OTLP exporter from OTEL_EXPORTER_OTLP_*")?;
    let host = sysinfo::System::host_name().unwrap_or_default();
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("agentd")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("host.name", host),
        ])
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer("agentd");
    Ok((provider, tracer))
}

struct Headers<'a>(&'a HeaderMap);

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// `TRACEPARENT` and `TRACESTATE` for an agent started inside the current span; empty when
/// tracing is off.
pub fn agent_env() -> HashMap<String, String> {
    let mut carrier = HashMap::new();
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut carrier);
    });
    carrier
        .into_iter()
        .map(|(key, value)| (key.to_ascii_uppercase(), value))
        .collect()
}

/// Which front a request came in on: what the span is named after and which status it records.
#[derive(Clone, Copy)]
pub enum Front {
    Grpc,
    Http,
}

/// A span around every request, child of the caller's `traceparent` if it sent one.
#[derive(Clone, Copy)]
pub struct TraceLayer {
    pub front: Front,
    /// Off (no OTEL_* variables): requests pass untouched.
    pub enabled: bool,
}

impl<S> tower::Layer<S> for TraceLayer {
    type Service = Traced<S>;

    fn layer(&self, inner: S) -> Traced<S> {
        Traced {
            inner,
            front: self.front,
            enabled: self.enabled,
        }
    }
}

#[derive(Clone)]
pub struct Traced<S> {
    inner: S,
    front: Front,
    enabled: bool,
}

impl<S, B, R> tower::Service<Request<B>> for Traced<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<TracedBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if !self.enabled {
            let answer = self.inner.call(request);
            return Box::pin(async move {
                Ok(answer.await?.map(|body| TracedBody { body, call: None }))
            });
        }
        let path = request.uri().path();
        let span = match self.front {
            Front::Grpc => tracing::info_span!(
                target: TRACE_TARGET,
                "rpc",
                otel.name = path.trim_start_matches('/'),
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = path.rsplit('/').next().unwrap_or_default(),
                rpc.grpc.status_code = tracing::field::Empty,
                agent.id = tracing::field::Empty,
            ),
            Front::Http => tracing::info_span!(
                target: TRACE_TARGET,
                "http",
                otel.name = format!("{} {path}", request.method()),
                otel.kind = "server",
                http.request.method = request.method().as_str(),
                url.path = path,
                http.response.status_code = tracing::field::Empty,
                agent.id = tracing::field::Empty,
            ),
        };
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&Headers(request.headers()))
        });
        let _ = span.set_parent(parent);
        let front = self.front;
        let answer = self.inner.call(request).instrument(span.clone());
        Box::pin(async move {
            let response = answer.await?;
            let mut call = Call {
                span,
                status_known: false,
            };
            match front {
                // An error before any answer comes as headers alone; else the status is in
                // the trailers, after the last message of a stream.
                Front::Grpc => {
                    if let Some(code) = grpc_status(response.headers()) {
                        call.record_status(code);
                    }
                }
                Front::Http => {
                    // An i64: tracing-opentelemetry would turn an unsigned number into a string.
                    let code = i64::from(response.status().as_u16());
                    call.span.record("http.response.status_code", code);
                    call.status_known = true;
                }
            }
            Ok(response.map(|body| TracedBody {
                body,
                call: Some(call),
            }))
        })
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A call's span, kept open until its answer's body ends (a stream's last message).
struct Call {
    span: tracing::Span,
    status_known: bool,
}

impl Call {
    fn record_status(&mut self, code: i64) {
        self.span.record("rpc.grpc.status_code", code);
        self.status_known = true;
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // A gRPC answer dropped before its trailers: the client went away.
        if !self.status_known {
            self.record_status(i64::from(i32::from(tonic::Code::Cancelled)));
        }
        // The exported span ends when it was last exited: now, not when the handler answered.
        drop(self.span.enter());
    }
}

/// An answer's body that ends its call's span when it ends, with the gRPC status from the
/// trailers.
pub struct TracedBody<B> {
    body: B,
    /// None when tracing is off, and once the body has ended.
    call: Option<Call>,
}

impl<B: http_body::Body + Unpin> http_body::Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(call) = &mut this.call {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                        call.record_status(code);
                    }
                }
                Poll::Ready(_) => this.call = None,
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
