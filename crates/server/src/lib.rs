//! The agentd daemon's gRPC front: the `AgentSupervisor` service over the supervisor in
//! `agentd-core`, plus `grpc.health.v1` and server reflection, served on a Unix socket and
//! optionally a TCP address. `bin/agentd.rs` parses options, binds and calls [`run`].

mod convert;
mod logs;
mod service;
pub mod settings;
mod watch;

use std::future::Future;
use std::time::Duration;

use agentd_core::SupervisorHandle;
use agentd_proto::v1::agent_supervisor_server::AgentSupervisorServer;
use anyhow::Context;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::service::AgentSupervisorService;

/// A bound listener the daemon serves on.
pub enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// How the gRPC front behaves, beyond the supervisor's own configuration.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Events queued per watcher before a watcher that does not read is ended.
    pub watch_buffer: usize,
}

/// How long open connections get to finish after the agents are stopped.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Serves until `shutdown` completes, then marks the service NOT_SERVING, stops every agent
/// with its ladder, flushes the store, ends watch streams and drains connections.
pub async fn run(
    listeners: Vec<Listener>,
    supervisor: SupervisorHandle,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let stop_serving = CancellationToken::new();
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
    let service = AgentSupervisorServer::new(AgentSupervisorService::new(
        supervisor.clone(),
        stop_serving.clone(),
        options.watch_buffer,
    ));

    let mut servers = tokio::task::JoinSet::new();
    for listener in listeners {
        let router = Server::builder()
            .add_service(health_service.clone())
            .add_service(reflection_v1.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(service.clone());
        let stopped = stop_serving.clone().cancelled_owned();
        match listener {
            Listener::Unix(listener) => servers.spawn(
                router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), stopped),
            ),
            Listener::Tcp(listener) => servers.spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped),
            ),
        };
    }

    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested"),
        Some(ended) = servers.join_next() => {
            ended.context("server task")?.context("serving gRPC")?;
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
            if let Err(error) = ended.context("server task").and_then(|r| Ok(r?)) {
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
