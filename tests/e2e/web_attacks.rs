//! Attacks from a hostile web page and a hostile client on loopback, each of which must
//! fail: cross-site requests riding the dashboard's session cookie, pages and DNS
//! rebinding against a listener without tokens, idle connections that hold every place,
//! and the weak spots of authentication (a throttle that locks out a valid token, a session
//! that outlives its logout, streams that outlive their token, a token file others can
//! read, a client that cannot present a certificate).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use agentd_proto::v1 as pb;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pb::agent_supervisor_client::AgentSupervisorClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::Code;
use tonic::transport::Endpoint;

use crate::harness::*;
use crate::security::{
    ADMIN, Pki, READER, address, grpc_over_tls, https, secured, tls_client, token_file, with_token,
};

/// A TCP connection to `address`, from `source` when given (127.0.0.2 is another peer on
/// Linux's loopback).
async fn tcp_from(source: Option<IpAddr>, address: &str) -> TcpStream {
    let target: SocketAddr = address.parse().expect("HOST:PORT");
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .expect("bind the source");
    }
    socket.connect(target).await.expect("connect")
}

/// One request over a new TLS connection from `source`; the answer as it starts.
async fn open_https(
    address: &str,
    ca: &Path,
    source: Option<IpAddr>,
    request: hyper::Request<String>,
) -> hyper::Response<Incoming> {
    let tcp = tcp_from(source, address).await;
    let tls = tls_client(ca, None, b"http/1.1")
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS");
    send(TokioIo::new(tls), request).await
}

/// One request over a new plaintext connection; the answer read whole.
async fn plain(address: &str, request: hyper::Request<String>) -> (u16, String) {
    let tcp = tcp_from(None, address).await;
    whole(send(TokioIo::new(tcp), request).await).await
}

async fn send<T>(io: T, request: hyper::Request<String>) -> hyper::Response<Incoming>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    tokio::time::timeout(DEADLINE, sender.send_request(request))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

async fn whole(response: hyper::Response<Incoming>) -> (u16, String) {
    let status = response.status().as_u16();
    let body = tokio::time::timeout(DEADLINE, response.into_body().collect())
        .await
        .expect("the body in time")
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into())
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> hyper::Request<String> {
    let mut request = hyper::Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(body.to_string()).expect("request")
}

fn port(address: &str) -> &str {
    address.rsplit(':').next().expect("a port")
}

/// The dashboard's login: a token for a session cookie (`agentd_session=...`).
async fn login(address: &str, ca: &Path, host: &str, token: &str) -> String {
    let body = format!(r#"{{"token": "{token}"}}"#);
    let headers = [("host", host), ("content-type", "application/json")];
    let (status, headers, body) =
        https(address, ca, request("POST", "/v1/session", &headers, &body)).await;
    assert_eq!(status, 200, "{body}");
    let set_cookie = headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a cookie");
    set_cookie
        .split(';')
        .next()
        .expect("name=value")
        .to_string()
}

/// What a hostile page makes the browser send.
struct Attack<'a> {
    what: &'a str,
    origin: Option<&'a str>,
    content_type: Option<&'a str>,
    body: String,
    /// What the refusal says.
    says: &'a str,
}

fn spawn_json(agent_id: &str) -> String {
    format!(r#"{{"agentId": "{agent_id}", "command": ["sh", "-c", "id; sleep 30"]}}"#)
}

#[tokio::test]
async fn a_page_on_another_port_cannot_ride_the_session_cookie() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(dir.path(), &pki, "--http-listen", &[]).await;
    let address = daemon.http_address.clone().expect("HTTP address");
    let ca = pki.ca_path();
    let host = format!("localhost:{}", port(&address));
    let own = format!("https://{host}");
    let other = "https://127.0.0.1:4443";
    let cookie = login(&address, &ca, &host, ADMIN).await;
    let bearer = format!("Bearer {ADMIN}");

    // What the hostile page made the browser send, with the admin's cookie each time.
    let form = "agentId=csrf-form&command=id";
    let attacks = [
        Attack {
            what: "a no-cors fetch from another port",
            origin: Some(other),
            content_type: Some("text/plain;charset=UTF-8"),
            body: spawn_json("csrf-fetch"),
            says: "Origin `https://127.0.0.1:4443` is not this listener's",
        },
        Attack {
            what: "an auto-submitted form from another port",
            origin: Some(other),
            content_type: Some("application/x-www-form-urlencoded"),
            body: form.to_string(),
            says: "cross-site request forgery",
        },
        Attack {
            what: "JSON from another port",
            origin: Some(other),
            content_type: Some("application/json"),
            body: spawn_json("csrf-json"),
            says: "is not this listener's",
        },
        Attack {
            what: "text/plain claiming the own origin",
            origin: Some(&own),
            content_type: Some("text/plain"),
            body: spawn_json("csrf-text"),
            says: "content-type: application/json",
        },
        Attack {
            what: "no Origin at all",
            origin: None,
            content_type: Some("application/json"),
            body: spawn_json("csrf-bare"),
            says: "needs the page's `Origin`",
        },
    ];
    for Attack {
        what,
        origin,
        content_type,
        body,
        says,
    } in attacks
    {
        let mut headers = vec![("host", host.as_str()), ("cookie", cookie.as_str())];
        headers.extend(origin.map(|o| ("origin", o)));
        headers.extend(content_type.map(|t| ("content-type", t)));
        let (status, _, answer) = https(
            &address,
            &ca,
            request("POST", "/v1/agents", &headers, &body),
        )
        .await;
        assert_eq!(status, 403, "{what}: {answer}");
        assert!(answer.contains("PERMISSION_DENIED"), "{what}: {answer}");
        assert!(answer.contains(says), "{what}: {answer}");
    }
    // Stopping is refused the same way.
    let victim = [("host", host.as_str()), ("authorization", bearer.as_str())];
    let (status, _, answer) = https(
        &address,
        &ca,
        request("POST", "/v1/agents", &victim, &spawn_json("victim")),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let stop = [
        ("host", host.as_str()),
        ("cookie", cookie.as_str()),
        ("origin", other),
        ("content-type", "text/plain"),
    ];
    let (status, _, answer) = https(
        &address,
        &ca,
        request("POST", "/v1/agents/victim:stop", &stop, ""),
    )
    .await;
    assert_eq!(status, 403, "{answer}");

    // Nothing the page asked for happened.
    let mut local = daemon.client().await;
    let listed = local
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = listed.agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, ["victim"]);
    assert_eq!(
        crate::harness::status(&mut local, "victim").await.state,
        pb::AgentState::Running as i32
    );

    // The dashboard's own request (its Origin, JSON) passes, and so does a bearer token
    // with neither.
    let own_request = [
        ("host", host.as_str()),
        ("cookie", cookie.as_str()),
        ("origin", own.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, _, answer) = https(
        &address,
        &ca,
        request("POST", "/v1/agents", &own_request, &spawn_json("by-page")),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let (status, _, answer) = https(
        &address,
        &ca,
        request("POST", "/v1/agents", &victim, &spawn_json("by-token")),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    kill_all(&mut local).await;
}

#[tokio::test]
async fn a_listener_without_tokens_refuses_other_pages_and_rebound_names() {
    let daemon = Daemon::builder()
        .options(&["--http-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"])
        .start()
        .await;
    let address = daemon.http_address.clone().expect("HTTP address");
    let port = port(&address);
    let (own_ip, own_name) = (format!("127.0.0.1:{port}"), format!("localhost:{port}"));
    let json = ("content-type", "application/json");

    // DNS rebinding: the page's own name, now pointing at 127.0.0.1.
    for rebound in ["attacker.example", &format!("attacker.example:{port}")] {
        let (status, body) = plain(
            &address,
            request("GET", "/v1/agents", &[("host", rebound)], ""),
        )
        .await;
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains(&format!(
                "Host `{rebound}` is not this listener's ({own_ip} or {own_name}): refused against DNS rebinding"
            )),
            "{body}"
        );
        let (status, body) = plain(
            &address,
            request(
                "POST",
                "/v1/agents",
                &[("host", rebound), json],
                &spawn_json("rebound"),
            ),
        )
        .await;
        assert_eq!(status, 403, "{body}");
    }
    // A page of another port on localhost: a no-cors fetch, a form, JSON with its Origin.
    let other = "http://localhost:9999";
    let attacks: [(&[(&str, &str)], String); 4] = [
        (
            &[
                ("host", &own_name),
                ("origin", other),
                ("content-type", "text/plain;charset=UTF-8"),
            ],
            spawn_json("page-fetch"),
        ),
        (
            &[
                ("host", &own_name),
                ("origin", other),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "agentId=page-form&command=id".into(),
        ),
        (
            &[("host", &own_name), ("origin", other), json],
            spawn_json("page-json"),
        ),
        // Without an Origin, a body that is not JSON is still refused.
        (
            &[("host", &own_ip), ("content-type", "text/plain")],
            spawn_json("page-text"),
        ),
    ];
    for (headers, body) in attacks {
        let (status, answer) = plain(&address, request("POST", "/v1/agents", headers, &body)).await;
        assert_eq!(status, 403, "{headers:?}: {answer}");
        assert!(answer.contains("PERMISSION_DENIED"), "{answer}");
    }

    // gRPC over TCP answers only its own authority too.
    let grpc = daemon.grpc_address.clone().expect("gRPC address");
    let rebound = Endpoint::from_shared(grpc.clone())
        .expect("endpoint")
        .origin("http://attacker.example".parse().expect("uri"))
        .connect()
        .await
        .expect("connect");
    let refused = AgentSupervisorClient::new(rebound)
        .spawn(spawn_request("rebound-grpc", sh("id")))
        .await
        .expect_err("a foreign authority");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("DNS rebinding"), "{refused:?}");

    // Nothing ran; curl, the dashboard and gRPC clients that name the listener pass.
    assert!(agents_under(&daemon.data_dir).is_empty());
    let (status, answer) = plain(
        &address,
        request(
            "POST",
            "/v1/agents",
            &[("host", &own_name), json],
            &spawn_json("curl"),
        ),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let own_origin = format!("http://{own_ip}");
    let (status, answer) = plain(
        &address,
        request(
            "POST",
            "/v1/agents/curl:stop",
            &[("host", &own_ip), ("origin", &own_origin), json],
            "{}",
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let mut over_tcp = AgentSupervisorClient::new(
        Endpoint::from_shared(grpc)
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    spawn(&mut over_tcp, "grpc", sh("sleep 30")).await;
    kill_all(&mut over_tcp).await;
}

/// Waits until the peer closes `stream` (EOF or an error), failing at the deadline.
async fn closed_by_peer(what: &str, mut stream: impl tokio::io::AsyncRead + Unpin) {
    let mut buffer = [0u8; 256];
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buffer)).await {
            Err(_) => panic!("{what}: still open after {DEADLINE:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test]
async fn idle_connections_from_one_address_cannot_lock_out_the_admin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(
        dir.path(),
        &pki,
        "--http-listen",
        &["--max-connections", "50"],
    )
    .await;
    let address = daemon.http_address.clone().expect("HTTP address");
    let ca = pki.ca_path();

    // 50 TLS connections from 127.0.0.1 that never send a request: only a quarter of the
    // places is theirs, the others are closed at once.
    let mut held = Vec::new();
    for _ in 0..50 {
        let tcp = tcp_from(None, &address).await;
        let connector = tls_client(&ca, None, b"http/1.1");
        let name = ServerName::try_from("localhost").expect("name");
        if let Ok(tls) = connector.connect(name, tcp).await {
            held.push(tls);
        }
    }
    assert!(
        (1..=12).contains(&held.len()),
        "{} idle connections held from one address",
        held.len()
    );
    eventually("the refusals are logged", async || {
        daemon.log().contains("--max-connections-per-peer reached")
    })
    .await;

    // The admin from another address is answered at once, long before any of them would
    // have timed out.
    let started = Instant::now();
    let summary = request(
        "GET",
        "/v1/summary",
        &[
            ("host", "localhost"),
            ("authorization", &format!("Bearer {ADMIN}")),
        ],
        "",
    );
    let other_address: IpAddr = "127.0.0.2".parse().expect("ip");
    let (status, body) = whole(open_https(&address, &ca, Some(other_address), summary).await).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the admin waited {:?}",
        started.elapsed()
    );
    drop(held);
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_and_open_streams_are_not() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(
        dir.path(),
        &pki,
        "--http-listen",
        &["--listen", "127.0.0.1:0", "--idle-timeout", "1s"],
    )
    .await;
    let http = daemon.http_address.clone().expect("HTTP address");
    let grpc = address(&daemon);
    let ca = pki.ca_path();
    let tls = |alpn: &'static [u8], address: String| {
        let ca = ca.clone();
        async move {
            let tcp = tcp_from(None, &address).await;
            tls_client(&ca, None, alpn)
                .connect(ServerName::try_from("localhost").expect("name"), tcp)
                .await
                .expect("TLS")
        }
    };

    // Streams open before the idle connections below, quiet for longer than the idle
    // timeout: an event stream over HTTP and WatchAgents over gRPC.
    let events = request(
        "GET",
        "/v1/events",
        &[
            ("host", "localhost"),
            ("authorization", &format!("Bearer {ADMIN}")),
        ],
        "",
    );
    let mut sse = SseReader::new(open_https(&http, &ca, None, events).await);
    let mut watcher = grpc_over_tls(&grpc, &ca, None)
        .await
        .expect("gRPC over TLS");
    let mut watch = watcher
        .watch_agents(with_token(pb::WatchAgentsRequest::default(), ADMIN))
        .await
        .expect("watch")
        .into_inner();

    // No TLS handshake, a handshake and nothing, half a request's headers, and an HTTP/2
    // connection with no call: each is closed by its deadline.
    let no_handshake = tcp_from(None, &http).await;
    let idle_http = tls(b"http/1.1", http.clone()).await;
    let mut half_sent = tls(b"http/1.1", http.clone()).await;
    half_sent
        .write_all(b"GET /v1/summary HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .expect("write");
    let idle_h2 = tls(b"h2", grpc.clone()).await;
    tokio::join!(
        closed_by_peer("a connection with no TLS handshake", no_handshake),
        closed_by_peer("an idle TLS connection", idle_http),
        closed_by_peer("half a request", half_sent),
        closed_by_peer("an idle HTTP/2 connection", idle_h2),
    );
    // A keep-alive connection is closed once its request is done and the idle time passed.
    let tcp = tcp_from(None, &http).await;
    let tls_stream = tls_client(&ca, None, b"http/1.1")
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls_stream))
        .await
        .expect("HTTP handshake");
    let connection = tokio::spawn(connection);
    let healthz = request("GET", "/healthz", &[("host", "localhost")], "");
    let (status, _) = whole(sender.send_request(healthz).await.expect("answer")).await;
    assert_eq!(status, 200);
    // Closed by the server, cleanly or not: either way the connection task ends.
    let _closed = tokio::time::timeout(DEADLINE, connection)
        .await
        .expect("the idle keep-alive connection closed in time")
        .expect("connection task");

    // The quiet streams still deliver.
    let mut local = daemon.client().await;
    spawn(&mut local, "after-idle", sh("sleep 30")).await;
    tokio::time::timeout(
        DEADLINE,
        sse.until(|event| event.data.contains("after-idle")),
    )
    .await
    .expect("the quiet event stream delivers");
    assert_eq!(next_event(&mut watch).await.agent_id, "after-idle");
    kill_all(&mut local).await;
}

#[tokio::test]
async fn failed_attempts_never_lock_out_a_valid_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(dir.path(), &pki, "--http-listen", &[]).await;
    let address = daemon.http_address.clone().expect("HTTP address");
    let ca = pki.ca_path();
    let summary = |token: &str| {
        request(
            "GET",
            "/v1/summary",
            &[
                ("host", "localhost"),
                ("authorization", &format!("Bearer {token}")),
            ],
            "",
        )
    };
    for _ in 0..10 {
        let (status, _, body) = https(&address, &ca, summary("guessed-token-0000000")).await;
        assert_eq!(status, 401, "{body}");
    }
    let (status, _, body) = https(&address, &ca, summary("guessed-token-0000001")).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too many failed authentications"), "{body}");
    // The admin's token, from the same address, right after.
    let (status, _, body) = https(&address, &ca, summary(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let host = format!("localhost:{}", port(&address));
    let cookie = login(&address, &ca, &host, READER).await;
    let by_cookie = request(
        "GET",
        "/v1/summary",
        &[("host", "localhost"), ("cookie", &cookie)],
        "",
    );
    let (status, _, body) = https(&address, &ca, by_cookie).await;
    assert_eq!(status, 200, "{body}");
}

/// The `event: error` an event stream ends with, within the deadline (its keep-alive
/// comments would otherwise keep a reader waiting for ever).
async fn last_error(events: &mut SseReader) -> serde_json::Value {
    let seen = tokio::time::timeout(DEADLINE, events.until(|event| event.event == "error"))
        .await
        .expect("the stream ends with an error in time");
    seen.last().expect("an error event").json()
}

#[tokio::test]
async fn logging_out_ends_the_session_and_its_streams() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(dir.path(), &pki, "--http-listen", &[]).await;
    let address = daemon.http_address.clone().expect("HTTP address");
    let ca = pki.ca_path();
    let host = format!("localhost:{}", port(&address));
    let cookie = login(&address, &ca, &host, READER).await;
    let with_cookie = |method: &str, path: &str| {
        request(
            method,
            path,
            &[
                ("host", &host),
                ("cookie", &cookie),
                ("origin", &format!("https://{host}")),
                ("content-type", "application/json"),
            ],
            "",
        )
    };
    let mut events =
        SseReader::new(open_https(&address, &ca, None, with_cookie("GET", "/v1/events")).await);
    let (status, _, body) = https(&address, &ca, with_cookie("GET", "/v1/summary")).await;
    assert_eq!(status, 200, "{body}");

    let (status, headers, body) = https(&address, &ca, with_cookie("DELETE", "/v1/session")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("Max-Age=0"))
    );
    // The copied cookie opens nothing any more, and the stream it opened ended.
    let (status, _, body) = https(&address, &ca, with_cookie("GET", "/v1/summary")).await;
    assert_eq!(status, 401, "{body}");
    let error = last_error(&mut events).await;
    assert_eq!(error["code"], "UNAUTHENTICATED", "{error}");
    assert!(events.next().await.is_none(), "the stream goes on");
}

#[tokio::test]
async fn streams_opened_with_a_revoked_token_end_after_the_reload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(
        dir.path(),
        &pki,
        "--listen",
        &["--http-listen", "127.0.0.1:0"],
    )
    .await;
    let grpc = address(&daemon);
    let http = daemon.http_address.clone().expect("HTTP address");
    let ca = pki.ca_path();
    let mut client = grpc_over_tls(&grpc, &ca, None)
        .await
        .expect("gRPC over TLS");
    let watch = |token: &str| {
        let mut client = client.clone();
        let request = with_token(pb::WatchAgentsRequest::default(), token);
        async move {
            client
                .watch_agents(request)
                .await
                .expect("watch")
                .into_inner()
        }
    };
    let mut revoked = watch(READER).await;
    let mut kept = watch(ADMIN).await;
    let logs_of = |token: &str| {
        let request = with_token(
            pb::StreamLogsRequest {
                agent_id: "talker".into(),
                follow: true,
                ..Default::default()
            },
            token,
        );
        let mut client = client.clone();
        async move {
            client
                .stream_logs(request)
                .await
                .expect("logs")
                .into_inner()
        }
    };
    let mut local = daemon.client().await;
    spawn(&mut local, "talker", sh("echo hello; sleep 30")).await;
    let mut revoked_logs = logs_of(READER).await;
    let events = request(
        "GET",
        "/v1/events",
        &[
            ("host", "localhost"),
            ("authorization", &format!("Bearer {READER}")),
        ],
        "",
    );
    let mut sse = SseReader::new(open_https(&http, &ca, None, events).await);
    assert_eq!(next_event(&mut revoked).await.agent_id, "talker");
    assert_eq!(next_event(&mut kept).await.agent_id, "talker");

    // The reader's token leaves the file; SIGHUP.
    token_file(dir.path(), &format!("{ADMIN} admin\n"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let ended = async |stream: &mut tonic::Streaming<pb::AgentEvent>| loop {
        match tokio::time::timeout(DEADLINE, stream.message()).await {
            Err(_) => panic!("the revoked stream is still open"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the revoked stream ended without a status"),
            Ok(Err(status)) => return status,
        }
    };
    let status = ended(&mut revoked).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    let logs_ended = loop {
        match tokio::time::timeout(DEADLINE, revoked_logs.message()).await {
            Err(_) => panic!("the revoked output stream is still open"),
            Ok(Ok(Some(_))) => continue,
            Ok(Ok(None)) => panic!("the revoked output stream ended without a status"),
            Ok(Err(status)) => break status,
        }
    };
    assert_eq!(logs_ended.code(), Code::Unauthenticated, "{logs_ended:?}");
    let error = last_error(&mut sse).await;
    assert_eq!(error["code"], "UNAUTHENTICATED", "{error}");

    // The admin's stream goes on.
    spawn(&mut local, "after-reload", sh("exit 0")).await;
    loop {
        if next_event(&mut kept).await.agent_id == "after-reload" {
            break;
        }
    }
    let refused = client
        .get_summary(with_token(pb::GetSummaryRequest {}, READER))
        .await
        .expect_err("a revoked token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    kill_all(&mut local).await;
}

#[tokio::test]
async fn a_token_file_other_users_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let (cert, key) = pki.issue("server", false);
    let tokens = token_file(dir.path(), &format!("{ADMIN} admin\n"));
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = Command::new(env!("CARGO_BIN_EXE_agentd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--token-file")
        .arg(&tokens)
        .stdin(Stdio::null())
        .output()
        .expect("agentd");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("chmod 600 {}", tokens.display())),
        "{stderr}"
    );
    assert!(processes_under(&dir.path().join("data")).is_empty());

    // A running daemon keeps its tokens when the file becomes readable, and says why.
    let daemon = secured(dir.path(), &pki, "--listen", &[]).await;
    let tokens = dir.path().join("tokens");
    std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    eventually("the refused reload is logged", async || {
        daemon.log().contains("token file not reloaded") && daemon.log().contains("chmod 600")
    })
    .await;
    let mut client = grpc_over_tls(&address(&daemon), &pki.ca_path(), None)
        .await
        .expect("TLS");
    client
        .get_summary(with_token(pb::GetSummaryRequest {}, READER))
        .await
        .expect("the tokens in use stay");
}

#[tokio::test]
async fn agentctl_presents_a_client_certificate_for_mtls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "server");
    let clients = Pki::new(dir.path(), "clients");
    let client_ca = clients.ca_path();
    let daemon = secured(
        dir.path(),
        &pki,
        "--listen",
        &["--tls-client-ca", client_ca.to_str().expect("path")],
    )
    .await;
    let address = address(&daemon);
    let (cert, key) = clients.issue("client", false);
    let agentctl = |identity: &[&str]| {
        Command::new(agentctl_path())
            .args(["--addr", &format!("https://{address}"), "--ca-cert"])
            .arg(pki.ca_path())
            .args(identity)
            .env("AGENTD_TOKEN", READER)
            .arg("list")
            .stdin(Stdio::null())
            .output()
            .expect("agentctl")
    };
    let refused = agentctl(&[]);
    assert!(
        !refused.status.success(),
        "served without a client certificate"
    );
    let (cert, key) = (cert.to_str().expect("path"), key.to_str().expect("path"));
    for flags in [
        ["--client-cert", "--client-key"],
        ["--tls-cert", "--tls-key"],
    ] {
        let listed = agentctl(&[flags[0], cert, flags[1], key]);
        assert!(
            listed.status.success(),
            "{flags:?}: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    let missing_key = agentctl(&["--client-cert", cert]);
    assert!(!missing_key.status.success());
    assert!(String::from_utf8_lossy(&missing_key.stderr).contains("--client-key"));
}
