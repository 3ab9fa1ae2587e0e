//! The LLM gateway (`--llm-providers`): each provider's API served to agents on loopback, at
//! `http://127.0.0.1:PORT/NAME/...`, forwarded to the provider's `base_url` with the real key
//! in place of the agent's gateway key. The key names the agent (`agentd_core::GatewayKeys`),
//! so what each request costs is added to that agent's spend.
//!
//! A request is forwarded as it came apart from the key (and, for a streamed Chat
//! Completions request that did not ask for usage, `stream_options.include_usage`, whose
//! answer the client is then not shown). Answers pass through as they arrive; `usage.rs`
//! reads them on the way.

mod answer;
mod limits;
mod peer;
mod providers;
mod usage;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::Metrics;
use agentd_core::{GatewayEnv, Reserve, Spending, SupervisorHandle, Usage};
use anyhow::{Context, bail};
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use answer::{InFlight, Reading, Settle, over_budget};
pub use providers::load as load_providers;
use providers::{Kind, Provider};

/// The largest request body forwarded.
const MAX_REQUEST: usize = 32 << 20;
/// The most of a whole (not streamed) answer kept to read its usage.
const MAX_ANSWER_READ: usize = 16 << 20;
/// The longest an answer may go without a byte before the gateway gives up on it.
const ANSWER_IDLE: std::time::Duration = std::time::Duration::from_secs(600);
/// After an accept error (out of descriptors), the loop waits this long before accepting
/// again, rather than spin.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);
/// Where the gateway's port is kept, so agents keep their URL across restarts.
const PORT_FILE: &str = "llm-gateway.port";

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

pub struct Gateway {
    providers: Vec<Provider>,
    spending: Arc<Spending>,
    supervisor: SupervisorHandle,
    metrics: Arc<Metrics>,
    client: HttpsClient,
    /// Requests in the gateway now, per agent.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// The sockets each agent's processes had open when last looked at: a new connection
    /// found among them needs no new look.
    sockets: std::sync::Mutex<std::collections::HashMap<String, std::collections::HashSet<u64>>>,
}

/// Binds the gateway's listener on loopback: `address`, or the port it had before (kept in
/// the data folder), or any free one.
pub async fn bind(data_dir: &Path, address: Option<&str>) -> anyhow::Result<TcpListener> {
    let port_file = data_dir.join(PORT_FILE);
    let listener = match address {
        Some(address) => {
            let listener = TcpListener::bind(address)
                .await
                .with_context(|| format!("--llm-listen `{address}`"))?;
            // Connections are matched to agents through `/proc/net/tcp`: this host's IPv4
            // loopback only.
            if !matches!(listener.local_addr()?, SocketAddr::V4(v4) if v4.ip().is_loopback()) {
                bail!(
                    "--llm-listen `{address}`: the gateway serves agents on this host, on an IPv4 loopback address (127.0.0.1:PORT)"
                );
            }
            listener
        }
        None => {
            let before = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|text| text.trim().parse::<u16>().ok());
            let again = match before {
                Some(port) => TcpListener::bind(("127.0.0.1", port)).await.ok(),
                None => None,
            };
            match again {
                Some(listener) => listener,
                None => TcpListener::bind("127.0.0.1:0")
                    .await
                    .context("binding the LLM gateway on 127.0.0.1")?,
            }
        }
    };
    Ok(listener)
}

/// Keeps the port for the next start (once the data folder has been made and checked).
pub fn remember(data_dir: &Path, listener: &TcpListener) -> anyhow::Result<()> {
    let port_file = data_dir.join(PORT_FILE);
    let port = listener.local_addr()?.port();
    std::fs::write(&port_file, format!("{port}\n"))
        .with_context(|| format!("writing `{}`", port_file.display()))
}

/// The variables agents get: the first provider of each kind is the one their SDK finds.
pub fn env(address: SocketAddr, providers: &[Provider]) -> GatewayEnv {
    let first = |kind| {
        providers
            .iter()
            .find(|provider| provider.kind == kind)
            .map(|provider| provider.name.clone())
    };
    GatewayEnv {
        url: format!("http://{address}"),
        port: address.port(),
        openai: first(Kind::Openai),
        anthropic: first(Kind::Anthropic),
    }
}

pub fn names(providers: &[Provider]) -> String {
    providers
        .iter()
        .map(|provider| provider.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads every provider's key file again (SIGHUP); a key that cannot be read keeps the old.
pub fn reload_keys(gateway: &Gateway) {
    for provider in &gateway.providers {
        match provider.reload_key() {
            Ok(()) => tracing::info!(provider = %provider.name, "LLM provider key read again"),
            Err(error) => tracing::error!("{error:#}; the key in use stays"),
        }
    }
}

impl Gateway {
    pub fn new(
        providers: Vec<Provider>,
        spending: Arc<Spending>,
        supervisor: SupervisorHandle,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Gateway>> {
        // Small requests and answers: without TCP_NODELAY each waits out a delayed ACK.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .context("reading the system's trusted certificates")?
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Ok(Arc::new(Gateway {
            providers,
            spending,
            supervisor,
            metrics,
            sockets: Default::default(),
            in_flight: Default::default(),
            client: Client::builder(TokioExecutor::new()).build(https),
        }))
    }

    /// Serves each connection on a task of its own, which knows where it comes from.
    /// Serves the loopback listener, and the listeners the supervisor binds inside `PROXY`
    /// agents' namespaces (there, whoever connects is that agent), each connection on a task
    /// of its own.
    pub async fn serve(self: Arc<Gateway>, listener: TcpListener) {
        for index in 0..self.providers.len() {
            let gateway = self.clone();
            tokio::spawn(async move { gateway.providers[index].limits.run().await });
        }
        if let Some(mut namespaces) = self.spending.namespaces.take() {
            let gateway = self.clone();
            tokio::spawn(async move {
                while let Some(inside) = namespaces.recv().await {
                    let listener = match TcpListener::from_std(inside.listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            tracing::error!(agent_id = %inside.agent_id, %error, "serving the LLM gateway in an agent's namespace");
                            continue;
                        }
                    };
                    let (gateway, stop) = (gateway.clone(), inside.stop);
                    let owner = Some(inside.agent_id);
                    tokio::spawn(async move {
                        tokio::select! {
                            () = gateway.accept(listener, owner) => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
            });
        }
        self.accept(listener, None).await
    }

    /// Accepts connections; `owner`: the agent whose namespace the listener is in.
    async fn accept(self: Arc<Gateway>, listener: TcpListener, owner: Option<String>) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "LLM gateway: accepting a connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let gateway = self.clone();
            let owner = owner.clone();
            tokio::spawn(async move {
                let connection = Arc::new(Connection {
                    peer,
                    local,
                    owner,
                    agent: std::sync::Mutex::new(None),
                });
                let service = hyper::service::service_fn(move |request| {
                    let (gateway, connection) = (gateway.clone(), connection.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            forward(gateway, connection, request).await,
                        )
                    }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(30))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, %peer, "LLM gateway connection");
                }
            });
        }
    }
}

/// One client connection: where it comes from, and the agent it was found to belong to.
struct Connection {
    peer: SocketAddr,
    local: SocketAddr,
    /// Accepted inside this agent's network namespace: nobody else can connect there.
    owner: Option<String>,
    agent: std::sync::Mutex<Option<String>>,
}

impl Connection {
    /// Whether the connection comes from one of `agent_id`'s processes (checked once, then
    /// remembered for the connection).
    async fn belongs_to(&self, gateway: &Gateway, agent_id: &str) -> bool {
        if let Some(owner) = &self.owner {
            return owner == agent_id;
        }
        let lock = || {
            self.agent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if lock().as_deref() == Some(agent_id) {
            return true;
        }
        let Some(inode) = peer::socket_inode(self.peer, self.local) else {
            return false;
        };
        let known = |gateway: &Gateway| {
            (gateway.sockets.lock())
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(agent_id)
                .is_some_and(|sockets| sockets.contains(&inode))
        };
        let mut held = known(gateway);
        if !held {
            let pids = gateway
                .supervisor
                .agent_processes(agent_id.to_string())
                .await
                .unwrap_or_default();
            let sockets = tokio::task::spawn_blocking(move || peer::sockets_of(&pids))
                .await
                .unwrap_or_default();
            held = sockets.contains(&inode);
            (gateway.sockets.lock())
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(agent_id.to_string(), sockets);
        }
        if held {
            *lock() = Some(agent_id.to_string());
        }
        held
    }
}

/// An error in the provider's own format, so its SDK shows it as it would the provider's.
fn refuse(kind: Kind, status: StatusCode, kind_name: &str, message: &str) -> Response {
    let body = match kind {
        Kind::Openai => serde_json::json!({
            "error": {"message": message, "type": kind_name, "param": null, "code": null}
        }),
        Kind::Anthropic => serde_json::json!({
            "type": "error", "error": {"type": kind_name, "message": message}
        }),
    };
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The key the client sent: `Authorization: Bearer KEY` (OpenAI) or `x-api-key` (Anthropic).
fn client_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// Headers not passed on: the client's key, and what belongs to one connection.
const DROPPED: &[&str] = &[
    "authorization",
    "x-api-key",
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
    // Answers come uncompressed, so their usage can be read.
    "accept-encoding",
    // An agent does not choose whose organization or project the key bills.
    "openai-organization",
    "openai-project",
];

/// What the gateway forwards, by API: anything else (batches, files, fine-tuning...) could
/// spend without an answer to read usage from.
fn allowed(kind: Kind, method: &hyper::Method, path: &str) -> bool {
    use hyper::Method;
    match (kind, method) {
        (Kind::Openai, &Method::POST) => {
            matches!(path, "/chat/completions" | "/responses" | "/embeddings")
        }
        (Kind::Anthropic, &Method::POST) => {
            matches!(path, "/v1/messages" | "/v1/messages/count_tokens")
        }
        (Kind::Openai, &Method::GET) => path == "/models" || path.starts_with("/models/"),
        (Kind::Anthropic, &Method::GET) => path == "/v1/models" || path.starts_with("/v1/models/"),
        _ => false,
    }
}

/// Requests one agent may have in the gateway at once (each holds its body).
const PER_AGENT: usize = 256;

async fn forward(
    gateway: Arc<Gateway>,
    connection: Arc<Connection>,
    request: hyper::Request<hyper::body::Incoming>,
) -> Response {
    let path = request.uri().path().to_string();
    let (name, rest) = match path.trim_start_matches('/').split_once('/') {
        Some((name, rest)) => (name.to_string(), format!("/{rest}")),
        None => (path.trim_start_matches('/').to_string(), String::new()),
    };
    let Some(provider) = gateway.providers.iter().find(|p| p.name == name) else {
        return refuse(
            Kind::Openai,
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "agentd's LLM gateway has no provider `{name}`: it serves {}",
                names(&gateway.providers)
            ),
        );
    };
    let kind = provider.kind;
    let key = client_key(request.headers());
    let agent_id = match key.and_then(|key| gateway.spending.keys.agent(key)) {
        Some(agent_id) => agent_id,
        None => {
            gateway
                .metrics
                .llm_request(&provider.name, "refused_key", &Usage::default());
            return refuse(
                kind,
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "not an agentd gateway key: use the key agentd gave this agent \
                 (OPENAI_API_KEY or ANTHROPIC_API_KEY in its environment)",
            );
        }
    };
    if !connection.belongs_to(&gateway, &agent_id).await {
        gateway
            .metrics
            .llm_request(&provider.name, "refused_key", &Usage::default());
        return refuse(
            kind,
            StatusCode::FORBIDDEN,
            "permission_error",
            &format!(
                "this key is agent `{agent_id}`'s, and this connection does not come from its \
                 processes: each agent uses its own key"
            ),
        );
    }
    if !allowed(kind, request.method(), &rest) {
        return refuse(
            kind,
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!(
                "agentd's gateway does not forward {} {rest}: it serves {}",
                request.method(),
                match kind {
                    Kind::Openai =>
                        "POST /chat/completions, /responses, /embeddings and GET /models",
                    Kind::Anthropic =>
                        "POST /v1/messages, /v1/messages/count_tokens and GET /v1/models",
                }
            ),
        );
    }
    if request.headers().contains_key(header::CONTENT_ENCODING) {
        return refuse(
            kind,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "agentd's gateway reads request bodies as they are: send it uncompressed",
        );
    }
    let Some(_slot) = InFlight::take(&gateway, &agent_id) else {
        return refuse(
            kind,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!("agent `{agent_id}` has {PER_AGENT} requests in agentd's gateway already"),
        );
    };
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_REQUEST)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            return refuse(
                kind,
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &format!("reading the request (at most {MAX_REQUEST} bytes): {error}"),
            );
        }
    };
    let (info, asked) = usage::inspect(kind, &rest, &body);
    if info.background {
        return refuse(
            kind,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "agentd's gateway does not forward background responses: their usage never comes \
             back on this request",
        );
    }
    if provider.price(&info.model).is_none() && gateway.spending.ledger.cost_limited(&agent_id) {
        return refuse(
            kind,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!(
                "model `{}` has no price in agentd's providers file, and a cost budget applies \
                 to agent `{agent_id}`",
                info.model
            ),
        );
    }
    let mut worst = usage::worst_case(body.len(), &info);
    if let Some(price) = provider.price(&info.model) {
        worst.cost_micros = price.cost_micros(&worst);
    }
    // Waits while requests in flight could take a budget past its limit (each settle wakes
    // the waiters to try again).
    let chain = loop {
        let settled = gateway.spending.ledger.settled.notified();
        tokio::pin!(settled);
        settled.as_mut().enable();
        match gateway.spending.ledger.reserve(&agent_id, &worst) {
            Reserve::Held(chain) => break chain,
            Reserve::Wait => settled.await,
            Reserve::Refused(exhausted) => {
                gateway
                    .metrics
                    .llm_request(&provider.name, "refused_budget", &Usage::default());
                let message = over_budget(&agent_id, &exhausted);
                gateway.supervisor.budget_reached(exhausted);
                let error_type = match kind {
                    Kind::Openai => "insufficient_quota",
                    Kind::Anthropic => "rate_limit_error",
                };
                return refuse(kind, StatusCode::TOO_MANY_REQUESTS, error_type, &message);
            }
        }
    };
    // Settled on what the request used once the answer has passed; dropped before the
    // request went out, on nothing, and after, on its reservation.
    let mut settle = Settle {
        gateway: gateway.clone(),
        agent_id: agent_id.clone(),
        provider: provider.name.clone(),
        chain,
        worst: Some(worst),
        sent: false,
    };
    // Its turn under the provider's rate limits (shared by all agents, in turns).
    provider.limits.acquire(&agent_id, worst.tokens()).await;
    let hide_usage = asked.is_some();
    let body = asked.map(Bytes::from).unwrap_or(body);
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("{}{rest}{query}", provider.base_url);
    let mut upstream = axum::http::Request::builder()
        .method(parts.method)
        .uri(&url);
    if let Some(headers) = upstream.headers_mut() {
        for (name, value) in &parts.headers {
            if !DROPPED.contains(&name.as_str()) {
                headers.append(name, value.clone());
            }
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let key = provider.key();
        let auth = match kind {
            Kind::Openai => ("authorization", format!("Bearer {key}")),
            Kind::Anthropic => ("x-api-key", key),
        };
        match HeaderValue::from_str(&auth.1) {
            Ok(value) => {
                headers.insert(auth.0, value);
            }
            Err(_) => {
                return refuse(
                    kind,
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "api_error",
                    "the provider's key in agentd's key file is not a valid header value",
                );
            }
        }
    }
    let upstream = match upstream.body(Body::from(body)) {
        Ok(request) => request,
        Err(error) => {
            return refuse(
                kind,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &error.to_string(),
            );
        }
    };
    settle.sent = true;
    let answer = match gateway.client.request(upstream).await {
        Ok(answer) => answer,
        Err(error) => {
            tracing::warn!(%agent_id, provider = %provider.name, "LLM provider unreachable: {error:#}");
            // No answer came: not billed as far as anyone can tell.
            settle.sent = false;
            return refuse(
                kind,
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!(
                    "agentd's gateway could not reach provider `{}`",
                    provider.name
                ),
            );
        }
    };
    let (parts, body) = answer.into_parts();
    if parts.status == StatusCode::TOO_MANY_REQUESTS
        && let Some(wait) = (parts.headers.get(header::RETRY_AFTER))
            .and_then(|value| value.to_str().ok())
            .and_then(limits::retry_after)
    {
        // The provider is at its limit: every agent's requests wait, not only this one's.
        tracing::info!(provider = %provider.name, ?wait, "LLM provider answered 429: holding its requests");
        provider.limits.hold(wait);
    }
    let streamed = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    let success = parts.status.is_success();
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let reading = Reading {
        gateway: gateway.clone(),
        settle,
        kind,
        model: info.model,
        events: (streamed || info.stream).then(|| usage::EventStream::new(kind, hide_usage)),
        whole: Vec::new(),
        success,
        whole_answer: false,
    };
    tokio::spawn(reading.run(body, sender));
    let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
    let mut response = Response::new(Body::from_stream(stream));
    *response.status_mut() = parts.status;
    for (name, value) in &parts.headers {
        if !DROPPED.contains(&name.as_str()) || name == header::TRANSFER_ENCODING {
            response.headers_mut().append(name, value.clone());
        }
    }
    response.headers_mut().remove(header::TRANSFER_ENCODING);
    response
}
