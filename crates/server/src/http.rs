//! The HTTP face (`--http-listen`): REST/JSON over the same service the gRPC API runs,
//! server-sent events, Prometheus metrics, liveness and readiness. Bodies are the proto3
//! JSON mapping of the API's own messages (pbjson), so REST and gRPC cannot drift; every
//! route calls the gRPC service's method, so validation and errors are the same too.
//! `streams.rs` holds the two routes that stream: output and events.

mod dashboard;
mod streams;

use std::sync::Arc;

use agentd_core::SupervisorHandle;
use agentd_proto::v1 as pb;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pb::agent_supervisor_server::AgentSupervisor;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::auth::{Credential, Guard, Role};
use crate::connection::{Peer, peer_of};
use crate::convert::error_body;
use crate::metrics::Metrics;
use crate::origin::{self, Caller};
use crate::revoke::{Ending, Revocable};
use crate::service::AgentSupervisorService;

#[derive(Clone)]
pub struct Api {
    pub service: Arc<AgentSupervisorService>,
    pub supervisor: SupervisorHandle,
    pub metrics: Arc<Metrics>,
    /// Cancelled when shutdown begins: `/readyz` says so from then on.
    pub draining: CancellationToken,
    /// Cancelled when the daemon shuts down, to end streams.
    pub shutdown: CancellationToken,
    /// Tokens every request but the page's files and the probes must show; `None` with
    /// `--insecure-listen`.
    pub guard: Option<Arc<Guard>>,
    /// Session cookies get `Secure` (the listener speaks TLS).
    pub secure_cookies: bool,
    /// The largest request body (`--max-request-bytes`).
    pub max_request_bytes: usize,
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(dashboard::page))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/events.js", get(dashboard::events))
        .route("/dashboard/style.css", get(dashboard::style))
        .route("/v1/agents", get(list).post(spawn))
        .route("/v1/agents:stop", post(stop_many))
        .route(
            "/v1/agents/{id}",
            get(status).delete(remove).post(agent_verb),
        )
        .route("/v1/agents/{id}/health", get(check_health))
        .route("/v1/agents/{id}/history", get(history))
        .route("/v1/agents/{id}/progress", post(progress))
        .route("/v1/agents/{id}/logs", get(streams::logs))
        .route("/v1/summary", get(summary))
        .route("/v1/zombies:reap", post(reap))
        .route("/v1/events", get(streams::events))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/v1/session", post(open_session).delete(close_session))
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(api.max_request_bytes))
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ))
        .layer(axum::middleware::from_fn(refuse_grpc))
        .with_state(api)
}

/// A gRPC client sent here (`agentctl --addr` with `--http-listen`'s port) is told so in
/// gRPC's own terms, a trailers-only UNIMPLEMENTED, rather than sent JSON it would misread
/// as a message.
async fn refuse_grpc(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if !grpc {
        return next.run(request).await;
    }
    // Printable ASCII without `%`: a grpc-message that needs no percent-encoding.
    const MESSAGE: &str = "this is agentd's HTTP API (--http-listen): gRPC clients such as \
                           agentctl and grpcurl need agentd's gRPC address, its Unix socket \
                           or --listen";
    let code = (Code::Unimplemented as i32).to_string();
    (
        [
            (header::CONTENT_TYPE.as_str(), "application/grpc"),
            ("grpc-status", code.as_str()),
            ("grpc-message", MESSAGE),
        ],
        (),
    )
        .into_response()
}

const SESSION_COOKIE: &str = "agentd_session";

/// Every request needs a token (`Authorization: Bearer`) or a session cookie, a `read` one
/// for GET, an `admin` one for anything else; the page's files, the probes and opening a
/// session do not. What a browser could be made to send is checked first (`origin.rs`):
/// without tokens, the `Host`, and for a change the `Origin` and content type; with the
/// cookie, a change's `Origin` and content type. A stream ends once its credential is
/// revoked.
async fn require_token(
    State(api): State<Api>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let changes = origin::changes_state(request.method());
    let scheme = if api.secure_cookies { "https" } else { "http" };
    let Some(guard) = &api.guard else {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok());
        let local = peer_of(request.extensions()).and_then(|peer| peer.local);
        let checked = origin::check_loopback_host(host, local).and_then(|()| match changes {
            true => origin::check_state_change(request.headers(), scheme, Caller::Anyone),
            false => Ok(()),
        });
        return match checked {
            Ok(()) => next.run(request).await,
            Err(status) => ApiError(status).into_response(),
        };
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let session = cookie(request.headers(), SESSION_COOKIE);
    if changes
        && authorization.is_none()
        && session.is_some()
        && let Err(status) = origin::check_state_change(request.headers(), scheme, Caller::Cookie)
    {
        return ApiError(status).into_response();
    }
    let path = request.uri().path();
    let open = matches!(path, "/" | "/healthz" | "/readyz" | "/v1/session")
        || path.starts_with("/dashboard/");
    if open {
        return next.run(request).await;
    }
    let needs = match *request.method() {
        Method::GET | Method::HEAD => Role::Read,
        _ => Role::Admin,
    };
    let credential = match authorization {
        Some(_) => Credential::from_authorization(authorization),
        None => session.map_or(Credential::None, Credential::Session),
    };
    let peer = peer_of(request.extensions()).map(|peer| peer.remote.ip());
    let what = format!("{} {path}", request.method());
    let streams = request.method() == Method::GET
        && (path == "/v1/events" || (path.starts_with("/v1/agents/") && path.ends_with("/logs")));
    let revocation = guard.revocation();
    match guard.check(credential, peer, needs, &what) {
        Ok(_) => {
            let held = Guard::held(credential).filter(|_| streams);
            let response = next.run(request).await;
            match held {
                None => response,
                Some(held) => {
                    let ending = match response.headers().get(header::CONTENT_TYPE) {
                        Some(v) if v.as_bytes().starts_with(b"text/event-stream") => {
                            Ending::ServerSentEvents
                        }
                        _ => Ending::Cut,
                    };
                    let guard = guard.clone();
                    response.map(|body| {
                        axum::body::Body::new(Revocable::new(body, guard, held, revocation, ending))
                    })
                }
            }
        }
        Err(status) => {
            let mut response = ApiError(status).into_response();
            if response.status() == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// `POST /v1/session` with `{"token": "..."}` (or an `Authorization` header): a session
/// cookie (HttpOnly, SameSite=Strict) for the dashboard, whose EventSource cannot send a
/// header. The session has the token's role and ends when the token leaves the file.
async fn open_session(
    State(api): State<Api>,
    headers: HeaderMap,
    connect: Option<axum::Extension<ConnectInfo<Peer>>>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer {
    let Some(guard) = &api.guard else {
        return Err(ApiError(Status::failed_precondition(
            "this listener takes no tokens (--insecure-listen): no session is needed",
        )));
    };
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    struct SessionBody {
        #[serde(default)]
        token: String,
    }
    let body: SessionBody = body(&bytes)?;
    let token = match Credential::from_authorization(
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    ) {
        Credential::Bearer(token) => token.to_string(),
        _ => body.token,
    };
    let peer = connect.map(|c| c.0.0.remote.ip());
    let id = guard.open_session(&token, peer)?;
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        Guard::session_lifetime().as_secs(),
        if api.secure_cookies { "; Secure" } else { "" }
    );
    let mut response = json_response(StatusCode::OK, &serde_json::json!({}));
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    Ok(response)
}

/// `DELETE /v1/session`: ends the session (its cookie opens nothing from now on, and its
/// streams end) and forgets the cookie.
async fn close_session(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let (Some(guard), Some(id)) = (&api.guard, cookie(&headers, SESSION_COOKIE)) {
        guard.close_session(id);
    }
    let mut response = json_response(StatusCode::OK, &serde_json::json!({}));
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("agentd_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
}

/// A gRPC status as an HTTP answer: `{"code": "NOT_FOUND", "message": "..."}`, with the
/// HTTP status of its code.
pub struct ApiError(pub(crate) Status);

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        ApiError(status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(http_status(self.0.code()), &self.0)
    }
}

pub(crate) fn error_response(http: StatusCode, status: &Status) -> Response {
    json_response(http, &error_body(status))
}

/// The HTTP status of each gRPC code, as google.rpc.Code documents it; FAILED_PRECONDITION
/// is 412, so a client can tell "the host is not in a state to do it" from a bad request.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn json_response(http: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(json) => (
            http,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            json,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {error}"),
        )
            .into_response(),
    }
}

pub(crate) type Answer = Result<Response, ApiError>;

fn ok(body: &impl Serialize) -> Answer {
    Ok(json_response(StatusCode::OK, body))
}

/// A request body in the proto3 JSON mapping; an empty body is the empty message.
fn body<T: DeserializeOwned + Default>(
    bytes: &Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = bytes.as_ref().map_err(|rejection| {
        let status = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => crate::convert::exhausted(
                "the request body is over the bytes agentd reads (--max-request-bytes)",
                crate::convert::Exhausted::RequestSize,
            ),
            _ => Status::invalid_argument(format!("reading the request body: {rejection}")),
        };
        ApiError(status)
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|error| {
        ApiError(Status::invalid_argument(format!(
            "invalid JSON body: {error}"
        )))
    })
}

/// Query parameters in order, names in snake_case (`pageSize` is taken as `page_size`).
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub(crate) fn parse(raw: Option<String>) -> Query {
        let raw = raw.unwrap_or_default();
        Query(
            form_urlencoded::parse(raw.as_bytes())
                .map(|(name, value)| (snake_case(&name), value.into_owned()))
                .collect(),
        )
    }

    pub(crate) fn all<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn one(&self, name: &str) -> Option<&str> {
        self.all(name).last()
    }

    pub(crate) fn parsed<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ApiError> {
        self.one(name)
            .map(|value| {
                value.parse().map_err(|_| {
                    ApiError(Status::invalid_argument(format!(
                        "invalid query parameter `{name}`: `{value}`"
                    )))
                })
            })
            .transpose()
    }

    pub(crate) fn flag(&self, name: &str) -> Result<bool, ApiError> {
        Ok(self.parsed(name)?.unwrap_or(false))
    }

    /// Enum values by name (`AGENT_STATE_RUNNING`), repeatable.
    pub(crate) fn enums(
        &self,
        name: &str,
        from: fn(&str) -> Option<i32>,
    ) -> Result<Vec<i32>, ApiError> {
        self.all(name)
            .map(|value| {
                from(value).ok_or_else(|| {
                    ApiError(Status::invalid_argument(format!(
                        "invalid query parameter `{name}`: `{value}` is not one of its enum's names"
                    )))
                })
            })
            .collect()
    }

    /// A duration as proto3 JSON writes it: `"1.5s"`.
    pub(crate) fn duration(&self, name: &str) -> Result<Option<pbjson_types::Duration>, ApiError> {
        self.one(name)
            .map(|value| {
                serde_json::from_value(serde_json::Value::String(value.into())).map_err(|_| {
                    ApiError(Status::invalid_argument(format!(
                        "invalid query parameter `{name}`: `{value}` is not a duration such as `1.5s`"
                    )))
                })
            })
            .transpose()
    }
}

fn snake_case(name: &str) -> String {
    let mut snake = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    snake
}

async fn list(State(api): State<Api>, RawQuery(raw): RawQuery) -> Answer {
    let query = Query::parse(raw);
    let labels = query
        .all("label")
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    ApiError(Status::invalid_argument(format!(
                        "invalid query parameter `label`: `{pair}` is not KEY=VALUE"
                    )))
                })
        })
        .collect::<Result<_, _>>()?;
    let request = pb::ListAgentsRequest {
        states: query.enums("state", |name| {
            pb::AgentState::from_str_name(name).map(Into::into)
        })?,
        parent_agent_id: query.one("parent").unwrap_or_default().into(),
        labels,
        subtree_of: query.one("subtree_of").unwrap_or_default().into(),
        page_size: query.parsed("page_size")?.unwrap_or(0),
        page_token: query.one("page_token").unwrap_or_default().into(),
    };
    let response = api
        .service
        .list_agents(tonic::Request::new(request))
        .await?;
    ok(response.get_ref())
}

async fn spawn(State(api): State<Api>, bytes: Result<Bytes, BytesRejection>) -> Answer {
    let request: pb::SpawnRequest = body(&bytes)?;
    let response = api.service.spawn(tonic::Request::new(request)).await?;
    Ok(json_response(StatusCode::CREATED, response.get_ref()))
}

async fn status(State(api): State<Api>, Path(agent_id): Path<String>) -> Answer {
    let request = pb::StatusRequest { agent_id };
    let response = api.service.status(tonic::Request::new(request)).await?;
    ok(&response.into_inner().status.unwrap_or_default())
}

async fn check_health(State(api): State<Api>, Path(agent_id): Path<String>) -> Answer {
    let request = pb::CheckHealthRequest { agent_id };
    let response = api
        .service
        .check_health(tonic::Request::new(request))
        .await?;
    ok(response.get_ref())
}

/// `GET /v1/agents/{id}/history?since=2026-11-27T14:00:00Z`.
async fn history(
    State(api): State<Api>,
    Path(agent_id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Answer {
    let query = Query::parse(raw);
    let since = query
        .one("since")
        .map(|value| {
            serde_json::from_value(serde_json::Value::String(value.into())).map_err(|_| {
                ApiError(Status::invalid_argument(format!(
                    "invalid query parameter `since`: `{value}` is not an RFC 3339 time such as `2026-11-27T14:00:00Z`"
                )))
            })
        })
        .transpose()?;
    let request = pb::GetAgentHistoryRequest { agent_id, since };
    let response = api
        .service
        .get_agent_history(tonic::Request::new(request))
        .await?;
    ok(response.get_ref())
}

async fn remove(State(api): State<Api>, Path(agent_id): Path<String>) -> Answer {
    let request = pb::RemoveRequest { agent_id };
    let response = api.service.remove(tonic::Request::new(request)).await?;
    ok(response.get_ref())
}

/// `POST /v1/agents/{id}:stop`, `:pause`, `:resume`, `:restart`, `:sandbox`, `:budget`, `:usage`
/// (custom methods, as Google's API style guide writes them).
async fn agent_verb(
    State(api): State<Api>,
    Path(target): Path<String>,
    method: Method,
    uri: Uri,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer {
    let Some((agent_id, verb)) = target.rsplit_once(':') else {
        return Err(no_such_route(&method, &uri));
    };
    let agent_ids = vec![agent_id.to_string()];
    match verb {
        "stop" => {
            #[derive(serde::Deserialize, Default)]
            #[serde(deny_unknown_fields, rename_all = "camelCase")]
            struct StopBody {
                #[serde(default)]
                force: bool,
                #[serde(default)]
                cascade: bool,
            }
            let options: StopBody = body(&bytes)?;
            let request = pb::CleanupRequest {
                agent_ids,
                all: false,
                force: options.force,
                cascade: options.cascade,
            };
            let response = api.service.cleanup(tonic::Request::new(request)).await?;
            ok(response.get_ref())
        }
        "pause" => {
            let request = pb::PauseRequest { agent_ids };
            let response = api.service.pause(tonic::Request::new(request)).await?;
            ok(response.get_ref())
        }
        "resume" => {
            let request = pb::ResumeRequest { agent_ids };
            let response = api.service.resume(tonic::Request::new(request)).await?;
            ok(response.get_ref())
        }
        "restart" => {
            let request = pb::RestartRequest { agent_ids };
            let response = api.service.restart(tonic::Request::new(request)).await?;
            ok(response.get_ref())
        }
        "usage" => {
            let mut request: pb::ReportUsageRequest = body(&bytes)?;
            request.agent_id = agent_id.to_string();
            let response = api
                .service
                .report_usage(tonic::Request::new(request))
                .await?;
            ok(response.get_ref())
        }
        "budget" => {
            let mut request: pb::SetBudgetRequest = body(&bytes)?;
            request.agent_id = agent_id.to_string();
            let response = api.service.set_budget(tonic::Request::new(request)).await?;
            ok(response.get_ref())
        }
        "sandbox" => {
            let mut request: pb::UpdateSandboxRequest = body(&bytes)?;
            request.agent_id = agent_id.to_string();
            let response = api
                .service
                .update_sandbox(tonic::Request::new(request))
                .await?;
            ok(response.get_ref())
        }
        _ => Err(no_such_route(&method, &uri)),
    }
}

async fn stop_many(State(api): State<Api>, bytes: Result<Bytes, BytesRejection>) -> Answer {
    let request: pb::CleanupRequest = body(&bytes)?;
    let response = api.service.cleanup(tonic::Request::new(request)).await?;
    ok(response.get_ref())
}

async fn progress(
    State(api): State<Api>,
    Path(agent_id): Path<String>,
    bytes: Result<Bytes, BytesRejection>,
) -> Answer {
    let mut request: pb::ReportProgressRequest = body(&bytes)?;
    if !request.agent_id.is_empty() && request.agent_id != agent_id {
        return Err(ApiError(Status::invalid_argument(format!(
            "the body's `agentId` `{}` is not the path's `{agent_id}`",
            request.agent_id
        ))));
    }
    request.agent_id = agent_id;
    let response = api
        .service
        .report_progress(tonic::Request::new(request))
        .await?;
    ok(response.get_ref())
}

async fn summary(State(api): State<Api>) -> Answer {
    let request = pb::GetSummaryRequest {};
    let response = api
        .service
        .get_summary(tonic::Request::new(request))
        .await?;
    ok(response.get_ref())
}

async fn reap(State(api): State<Api>) -> Answer {
    let request = pb::ReapZombiesRequest {};
    let response = api
        .service
        .reap_zombies(tonic::Request::new(request))
        .await?;
    ok(response.get_ref())
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), else the classic text
/// format.
async fn metrics(State(api): State<Api>, headers: HeaderMap) -> Answer {
    let text = api.metrics.render(&api.supervisor).await?;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|accept| accept.contains("application/openmetrics-text"));
    let (content_type, text) = match openmetrics {
        true => (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        ),
        false => (
            "text/plain; version=0.0.4; charset=utf-8",
            Metrics::classic_text(&text),
        ),
    };
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}

/// Ready once the records are recovered (the listener only opens after that) and until
/// shutdown begins.
async fn ready(State(api): State<Api>) -> Response {
    if api.draining.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match api.supervisor.summary().await {
        Ok(_) => "ready\n".into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the supervisor is not answering\n",
        )
            .into_response(),
    }
}

fn no_such_route(method: &Method, uri: &Uri) -> ApiError {
    ApiError(Status::not_found(format!(
        "no route for {method} {}: see README, \"HTTP API\"",
        uri.path()
    )))
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    no_such_route(&method, &uri)
}
