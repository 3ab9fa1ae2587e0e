//! The agentd daemon's fronts: the `AgentSupervisor` gRPC service over the supervisor in
//! `agentd-core`, plus `grpc.health.v1` and server reflection, served on a Unix socket and
//! optionally a TCP address; and optionally an HTTP listener (REST/JSON, server-sent events,
//! metrics) over the same service. `bin/agentd.rs` parses options, binds and calls [`run`].

pub mod auth;
pub mod connection;
mod convert;
pub mod gateway;
mod grpc_auth;
mod host;
mod http;
mod limits;
mod logs;
mod metrics;
pub mod notify;
mod origin;
mod revoke;
mod service;
pub mod telemetry;
pub mod tls;
mod watch;
mod watch_route;

pub use metrics::{Metrics, PerAgent};

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use agentd_core::SupervisorHandle;
use agentd_proto::v1::agent_supervisor_server::AgentSupervisorServer;
use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::service::AgentSupervisorService;
use crate::watch_route::WatchAgentsRoute;

/// A bound listener the daemon serves on.
pub enum Listener {
    /// gRPC.
    Unix(UnixListener),
    /// gRPC.
    Tcp(TcpListener),
    /// The HTTP API.
    Http(TcpListener),
    /// Plaintext gRPC with `grpc.health.v1` alone, for probes that cannot speak TLS or send
    /// tokens (Kubernetes' native gRPC probe): it tells whether agentd serves, nothing else.
    Health(TcpListener),
}

/// How the gRPC front behaves, beyond the supervisor's own configuration.
/// How the TCP listeners are guarded: TLS, tokens (both, or neither with
/// `--insecure-listen`), and how much one peer may hold.
#[derive(Clone)]
pub struct Security {
    pub tls: Option<Arc<tls::Tls>>,
    pub guard: Option<Arc<auth::Guard>>,
    /// Connections per TCP listener and per peer address, and how long an idle one stays.
    pub connections: connection::Limits,
    /// Concurrent HTTP/2 streams (calls) per gRPC connection.
    pub max_streams: u32,
}

#[derive(Clone)]
pub struct ServeOptions {
    /// Events queued per watcher before a watcher that does not read is ended.
    pub watch_buffer: usize,
    /// Watchers (WatchAgents and `/v1/events`) open at once.
    pub max_watchers: usize,
    /// The largest request body (a gRPC message or an HTTP body).
    pub max_request_bytes: usize,
    pub security: Security,
}

/// How long open connections get to finish after the agents are stopped.
const DRAIN_GRACE: Duration = Duration::from_secs(5);
/// HTTP/2 pings on gRPC connections over TCP: a peer that does not answer within the
/// timeout is gone, and its connection (with its streams) is closed.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves until `shutdown` completes, then marks the service NOT_SERVING, stops every agent
/// with its ladder, flushes the store, ends watch streams and drains connections.
pub async fn run(
    listeners: Vec<Listener>,
    supervisor: SupervisorHandle,
    options: ServeOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop_serving = CancellationToken::new();
    let draining = CancellationToken::new();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AgentSupervisorServer<AgentSupervisorService>>()
        .await;
    // grpcurl 1.8 speaks only reflection v1alpha; newer clients use v1.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(agentd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let service = Arc::new(AgentSupervisorService::new(
        supervisor.clone(),
        stop_serving.clone(),
        options.watch_buffer,
        options.max_watchers,
        metrics.clone(),
    ));
    let security = options.security.clone();
    let api = http::Api {
        service: service.clone(),
        supervisor: supervisor.clone(),
        metrics,
        draining: draining.clone(),
        shutdown: stop_serving.clone(),
        guard: security.guard.clone(),
        secure_cookies: security.tls.is_some(),
        max_request_bytes: options.max_request_bytes,
    };
    // The request limit is `limits::RequestLimit`'s (RESOURCE_EXHAUSTED), not tonic's.
    let service = WatchAgentsRoute {
        generated: AgentSupervisorServer::from_arc(service.clone())
            .max_decoding_message_size(usize::MAX),
        service,
    };
    let request_limit = limits::RequestLimit {
        max_bytes: options.max_request_bytes,
    };
    let tracing_on = telemetry::wanted();
    let traced = |front| telemetry::TraceLayer {
        front,
        enabled: tracing_on,
    };

    let mut servers = tokio::task::JoinSet::new();
    let grpc = || {
        Server::builder()
            .layer(traced(telemetry::Front::Grpc))
            .layer(request_limit)
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(service.clone())
    };
    for listener in listeners {
        let stopped = stop_serving.clone().cancelled_owned();
        match listener {
            Listener::Unix(listener) => {
                let incoming = UnixListenerStream::new(listener);
                let serving = grpc().serve_with_incoming_shutdown(incoming, stopped);
                servers.spawn(async move { serving.await.context("serving gRPC") })
            }
            Listener::Tcp(listener) => {
                let tls = security.tls.clone().map(|t| (t, tls::Protocol::Grpc));
                let conns = connection::accept(listener, tls, security.connections);
                let incoming = ReceiverStream::new(conns).map(Ok::<_, std::io::Error>);
                let serving = Server::builder()
                    .max_concurrent_streams(security.max_streams)
                    .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
                    .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
                    .layer(connection::InFlightLayer)
                    .layer(traced(telemetry::Front::Grpc))
                    .layer(request_limit)
                    .layer(grpc_auth::GrpcLayer {
                        guard: security.guard.clone(),
                        loopback_only: security.guard.is_none(),
                    })
                    .add_service(health_service.clone())
                    .add_service(reflection_v1.clone())
                    .add_service(reflection_v1alpha.clone())
                    .add_service(service.clone())
                    .serve_with_incoming_shutdown(incoming, stopped);
                servers.spawn(async move { serving.await.context("serving gRPC") })
            }
            Listener::Health(listener) => {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                let serving = Server::builder()
                    .add_service(health_service.clone())
                    .serve_with_incoming_shutdown(incoming, stopped);
                servers.spawn(async move { serving.await.context("serving gRPC health") })
            }
            Listener::Http(listener) => {
                let local = listener.local_addr()?;
                let tls = security.tls.clone().map(|t| (t, tls::Protocol::Http));
                let conns = connection::accept(listener, tls, security.connections);
                let incoming = connection::Incoming { conns, local };
                let app = http::router(api.clone())
                    .layer(traced(telemetry::Front::Http))
                    .layer(connection::InFlightLayer)
                    .into_make_service_with_connect_info::<connection::Peer>();
                let serving = axum::serve(incoming, app).with_graceful_shutdown(stopped);
                servers.spawn(async move { serving.await.context("serving HTTP") })
            }
        };
    }

    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested"),
        Some(ended) = servers.join_next() => {
            ended.context("server task")??;
            anyhow::bail!("a listener stopped serving unexpectedly");
        }
        () = supervisor.stopped() => {
            // Never limp: health says so at once, and the daemon exits non-zero so that
            // systemd or Kubernetes start it again (it adopts the agents that still run).
            health
                .set_not_serving::<AgentSupervisorServer<AgentSupervisorService>>()
                .await;
            stop_serving.cancel();
            anyhow::bail!("the supervisor stopped unexpectedly (its reason is logged above)");
        }
    }
    draining.cancel();
    health
        .set_not_serving::<AgentSupervisorServer<AgentSupervisorService>>()
        .await;
    supervisor
        .shutdown()
        .await
        .context("stopping agents at shutdown")?;
    stop_serving.cancel();
    let drained = tokio::time::timeout(DRAIN_GRACE, async {
        while let Some(ended) = servers.join_next().await {
            if let Err(error) = ended.context("server task").and_then(|r| r) {
                tracing::warn!(%error, "listener ended with an error");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("connections still open after {DRAIN_GRACE:?}; exiting anyway");
    }
    Ok(())
}
