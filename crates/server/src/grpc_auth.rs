//! The tower layer in front of gRPC on a TCP listener: each call's bearer token checked by
//! the [`Guard`] before it reaches a service, the streaming calls wrapped to end when their
//! token is revoked (`revoke.rs`), and without tokens (`--insecure-listen`) only the
//! listener's own loopback `:authority` answered.

use std::sync::Arc;

use crate::auth::{Credential, Guard, grpc_role};
use crate::connection::peer_of;
use crate::origin;
use crate::revoke::{Ending, Revocable};

/// Checks every gRPC call on a TCP listener before it reaches a service.
#[derive(Clone)]
pub struct GrpcLayer {
    pub guard: Option<Arc<Guard>>,
    /// Without tokens (`--insecure-listen`): only the listener's own loopback `:authority`
    /// is answered, against DNS rebinding.
    pub loopback_only: bool,
}

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = GrpcAuth<S>;

    fn layer(&self, inner: S) -> GrpcAuth<S> {
        GrpcAuth {
            inner,
            guard: self.guard.clone(),
            loopback_only: self.loopback_only,
        }
    }
}

#[derive(Clone)]
pub struct GrpcAuth<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
    loopback_only: bool,
}

/// The gRPC methods that stream for as long as the client wants: they end when what opened
/// them is revoked.
const STREAMING: [&str; 2] = [
    "/agentd.v1.AgentSupervisor/WatchAgents",
    "/agentd.v1.AgentSupervisor/StreamLogs",
];

type ResponseFuture<R, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<R, E>> + Send + 'static>>;

impl<S, B> tower::Service<axum::http::Request<B>> for GrpcAuth<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = axum::http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let peer = peer_of(request.extensions());
        if self.loopback_only {
            let authority = request.uri().authority().map(|a| a.as_str()).or_else(|| {
                request
                    .headers()
                    .get(axum::http::header::HOST)
                    .and_then(|v| v.to_str().ok())
            });
            if let Err(status) =
                origin::check_loopback_host(authority, peer.and_then(|peer| peer.local))
            {
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
        }
        let mut held = None;
        if let Some(guard) = &self.guard
            && let Some(needs) = grpc_role(request.uri().path())
        {
            let credential = Credential::from_authorization(
                request
                    .headers()
                    .get(axum::http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok()),
            );
            let peer = peer.map(|peer| peer.remote.ip());
            let method = request.uri().path().rsplit('/').next().unwrap_or_default();
            let revocation = guard.revocation();
            if let Err(status) = guard.check(credential, peer, needs, method) {
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
            if STREAMING.contains(&request.uri().path()) {
                held = Guard::held(credential).map(|held| (guard.clone(), held, revocation));
            }
        }
        let answer = self.inner.call(request);
        match held {
            None => Box::pin(answer),
            Some((guard, held, revocation)) => Box::pin(async move {
                let response = answer.await?;
                Ok(response.map(|body| {
                    tonic::body::Body::new(Revocable::new(
                        body,
                        guard,
                        held,
                        revocation,
                        Ending::Grpc,
                    ))
                }))
            }),
        }
    }
}
