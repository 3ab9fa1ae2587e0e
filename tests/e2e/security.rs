//! TCP listeners are safe to expose: refused at start without TLS and tokens, TLS (reloaded
//! on SIGHUP, mTLS), bearer tokens with roles over gRPC and HTTP, session cookies for the
//! dashboard, and the Unix socket's group.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use agentd_proto::v1 as pb;
use hyper_util::rt::TokioIo;
use pb::agent_supervisor_client::AgentSupervisorClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::Code;
use tonic::transport::Endpoint;

use crate::harness::*;

pub(crate) const ADMIN: &str = "admin-token-7f3a9c1e55";
pub(crate) const READER: &str = "reader-token-2b8d4e6f90";

/// A CA with a server certificate for localhost and 127.0.0.1, and a client certificate,
/// written as PEM files.
pub(crate) struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub(crate) fn new(dir: &Path, name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("agentd test CA {name}"));
        let ca =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA");
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("pki dir");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write CA");
        Pki { dir, ca }
    }

    /// Writes `NAME.pem` and `NAME.key`; `expired` makes one that ended in 2021.
    pub(crate) fn issue(&self, name: &str, expired: bool) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".into()])
            .expect("params");
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let (cert_path, key_path) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    pub(crate) fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
}

pub(crate) fn tls_client(
    ca: &Path,
    client: Option<(&Path, &Path)>,
    alpn: &[u8],
) -> tokio_rustls::TlsConnector {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("certs"),
                PrivateKeyDer::from_pem_file(key).expect("key"),
            )
            .expect("client cert"),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A channel over TLS to `address` (HOST:PORT), or the error connecting.
pub(crate) async fn tls_channel(
    address: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let connector = tls_client(ca, client, b"h2");
    let address = address.to_string();
    Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, address) = (connector.clone(), address.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&address).await?;
                let name = ServerName::try_from("localhost").expect("name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

/// A gRPC client over TLS to `address` (HOST:PORT), or the error connecting.
pub(crate) async fn grpc_over_tls(
    address: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Client, tonic::transport::Error> {
    Ok(AgentSupervisorClient::new(
        tls_channel(address, ca, client).await?,
    ))
}

/// A daemon with TLS (a certificate from `pki`) and the two tokens, listening as `listen`
/// says (`--listen` or `--http-listen`), with `extra` options.
pub(crate) async fn secured(dir: &Path, pki: &Pki, listen: &str, extra: &[&str]) -> Daemon {
    let (cert, key) = pki.issue("server", false);
    let tokens = token_file(dir, &format!("{ADMIN} admin\n{READER} read\n"));
    let mut options = vec![
        listen,
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().expect("path"),
        "--tls-key",
        key.to_str().expect("path"),
        "--token-file",
        tokens.to_str().expect("path"),
    ];
    options.extend(extra);
    Daemon::builder().options(&options).start().await
}

pub(crate) fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    request
}

pub(crate) fn address(daemon: &Daemon) -> String {
    daemon
        .grpc_address
        .clone()
        .expect("gRPC over TCP")
        .trim_start_matches("http://")
        .to_string()
}

pub(crate) fn token_file(dir: &Path, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("tokens");
    std::fs::write(&path, text).expect("token file");
    // agentd refuses a token file that other users can read.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// One HTTP/1.1 request over TLS: (status, headers, body).
pub(crate) async fn https(
    address: &str,
    ca: &Path,
    request: hyper::Request<String>,
) -> (u16, hyper::HeaderMap, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let tls = tls_client(ca, None, b"http/1.1")
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS");
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP handshake");
    tokio::spawn(connection);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into())
}

fn get(path: &str, authorization: Option<&str>, cookie: Option<&str>) -> hyper::Request<String> {
    let mut request = hyper::Request::get(path).header("host", "localhost");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    if let Some(value) = cookie {
        request = request.header("cookie", value);
    }
    request.body(String::new()).expect("request")
}

#[test]
fn a_tcp_listener_without_tls_and_tokens_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let (cert, key) = pki.issue("server", false);
    let refused = |args: &[&str], says: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_agentd"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("agentd");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(
            processes_under(&dir.path().join("data")).is_empty(),
            "refused before starting anything"
        );
    };
    refused(
        &["--listen", "0.0.0.0:0"],
        "--tls-cert CERT.pem --tls-key KEY.pem",
    );
    refused(&["--http-listen", "127.0.0.1:0"], "without TLS or tokens");
    let (cert, key) = (cert.to_str().expect("path"), key.to_str().expect("path"));
    refused(
        &[
            "--listen",
            "0.0.0.0:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ],
        "without tokens",
    );
    refused(
        &["--listen", "0.0.0.0:0", "--insecure-listen"],
        "is not a loopback address",
    );
    let bad_tokens = token_file(dir.path(), "short admin\n");
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--token-file",
        ]
        .into_iter()
        .chain([bad_tokens.to_str().expect("path")])
        .collect::<Vec<_>>(),
        "line 1: a token has at least 16 characters",
    );
}

#[tokio::test]
async fn grpc_over_tls_checks_tokens_and_roles() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(dir.path(), &pki, "--listen", &[]).await;
    let address = address(&daemon);
    let mut client = grpc_over_tls(&address, &pki.ca_path(), None)
        .await
        .expect("TLS connection");

    let summary = || pb::GetSummaryRequest {};
    let none = client.get_summary(summary()).await.expect_err("no token");
    assert_eq!(none.code(), Code::Unauthenticated, "{none:?}");
    let wrong = client
        .get_summary(with_token(summary(), "not-a-token-at-all-0"))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated, "{wrong:?}");
    assert!(!wrong.message().contains("not-a-token"), "{wrong:?}");

    // A read token reads and watches, and may not spawn.
    client
        .get_summary(with_token(summary(), READER))
        .await
        .expect("read token reads");
    client
        .watch_agents(with_token(
            pb::WatchAgentsRequest {
                include_snapshot: true,
                ..Default::default()
            },
            READER,
        ))
        .await
        .expect("read token watches");
    let denied = client
        .spawn(with_token(spawn_request("nope", sh("sleep 30")), READER))
        .await
        .expect_err("read token spawns");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains("Spawn"), "{denied:?}");

    // An admin token spawns; the health service answers probes without one.
    let spawned = client
        .spawn(with_token(spawn_request("over-tls", sh("sleep 30")), ADMIN))
        .await
        .expect("admin spawns")
        .into_inner();
    assert_eq!(spawned.status.expect("status").agent_id, "over-tls");
    let channel = tls_channel(&address, &pki.ca_path(), None)
        .await
        .expect("channel");
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health without a token");
    assert_eq!(health.into_inner().status, 1, "SERVING");

    // Plaintext to the TLS port is never served.
    let plaintext = async {
        match Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect()
            .await
        {
            Err(_) => true,
            Ok(channel) => AgentSupervisorClient::new(channel)
                .get_summary(with_token(summary(), ADMIN))
                .await
                .is_err(),
        }
    };
    let refused = tokio::time::timeout(DEADLINE, plaintext).await;
    assert_eq!(
        refused.ok(),
        Some(true),
        "plaintext gRPC was answered on the TLS port"
    );
    let mut local = daemon.client().await;
    assert_eq!(status(&mut local, "over-tls").await.agent_id, "over-tls");
    assert!(!daemon.log().contains(ADMIN) && !daemon.log().contains(READER));
    kill_all(&mut local).await;
}

#[tokio::test]
async fn mtls_expired_certificates_and_a_reload_on_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = Pki::new(dir.path(), "first");
    let clients = Pki::new(dir.path(), "clients");
    let (cert, key) = first.issue("server", false);
    let live_cert = dir.path().join("live.pem");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&cert, &live_cert).expect("copy");
    std::fs::copy(&key, &live_key).expect("copy");
    let tokens = token_file(dir.path(), &format!("{ADMIN} admin\n{READER} read\n"));
    let daemon = Daemon::builder()
        .options(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            live_cert.to_str().expect("path"),
            "--tls-key",
            live_key.to_str().expect("path"),
            "--tls-client-ca",
            clients.ca_path().to_str().expect("path"),
            "--token-file",
            tokens.to_str().expect("path"),
        ])
        .start()
        .await;
    let address = address(&daemon);
    let summary = || with_token(pb::GetSummaryRequest {}, ADMIN);
    let answers = |client: Result<Client, tonic::transport::Error>| async move {
        match client {
            Err(_) => false,
            Ok(mut client) => client.get_summary(summary()).await.is_ok(),
        }
    };

    // mTLS: no client certificate, or one from another CA, is turned away.
    assert!(!answers(grpc_over_tls(&address, &first.ca_path(), None).await).await);
    let (stranger, stranger_key) = first.issue("stranger", false);
    assert!(
        !answers(grpc_over_tls(&address, &first.ca_path(), Some((&stranger, &stranger_key))).await)
            .await
    );
    let (expired, expired_key) = clients.issue("expired-client", true);
    assert!(
        !answers(grpc_over_tls(&address, &first.ca_path(), Some((&expired, &expired_key))).await)
            .await,
        "an expired client certificate"
    );
    let (client_cert, client_key) = clients.issue("client", false);
    let mut kept = grpc_over_tls(
        &address,
        &first.ca_path(),
        Some((&client_cert, &client_key)),
    )
    .await
    .expect("mTLS");
    kept.get_summary(summary())
        .await
        .expect("mTLS with a token");
    let mut watch = kept
        .watch_agents(with_token(pb::WatchAgentsRequest::default(), READER))
        .await
        .expect("watch")
        .into_inner();
    let mut revoked_watch = kept
        .watch_agents(with_token(pb::WatchAgentsRequest::default(), ADMIN))
        .await
        .expect("watch")
        .into_inner();

    // SIGHUP: a new certificate (from another CA) and a new token file. New connections get
    // them; the open connection and the stream whose token stays go on, the stream whose
    // token left ends.
    let second = Pki::new(dir.path(), "second");
    let (cert, key) = second.issue("server", false);
    std::fs::copy(&cert, &live_cert).expect("copy");
    std::fs::copy(&key, &live_key).expect("copy");
    token_file(dir.path(), &format!("{READER} admin\n"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    let client = Some((client_cert.as_path(), client_key.as_path()));
    let mut reloaded = eventually("the new certificate serves", async || {
        grpc_over_tls(&address, &second.ca_path(), client).await
    })
    .await;
    assert!(
        !answers(grpc_over_tls(&address, &first.ca_path(), client).await).await,
        "the old certificate is still served"
    );
    let old = reloaded
        .get_summary(summary())
        .await
        .expect_err("old token");
    assert_eq!(old.code(), Code::Unauthenticated, "{old:?}");
    reloaded
        .get_summary(with_token(pb::GetSummaryRequest {}, READER))
        .await
        .expect("the new token");
    let mut local = daemon.client().await;
    spawn(&mut local, "after-reload", sh("exit 0")).await;
    let seen = next_event(&mut watch).await;
    assert_eq!(
        seen.agent_id, "after-reload",
        "the stream opened before the reload goes on"
    );
    let ended = tokio::time::timeout(DEADLINE, revoked_watch.message())
        .await
        .expect("the revoked stream ends in time")
        .expect_err("the revoked stream ends with a status");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(
        daemon
            .log()
            .contains("SIGHUP: TLS certificate and key reloaded")
    );

    // A broken file on reload keeps what is in use.
    std::fs::write(&live_key, "not a key").expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    eventually("the failed reload is logged", async || {
        daemon.log().contains("TLS files not reloaded")
    })
    .await;
    let mut still = grpc_over_tls(&address, &second.ca_path(), client)
        .await
        .expect("the certificate in use stays");
    still
        .get_summary(with_token(pb::GetSummaryRequest {}, READER))
        .await
        .expect("served as before");
    kill_all(&mut local).await;
}

#[tokio::test]
async fn an_expired_server_certificate_is_refused_by_clients() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let (cert, key) = pki.issue("server", true);
    let tokens = token_file(dir.path(), &format!("{ADMIN} admin\n"));
    let daemon = Daemon::builder()
        .options(&[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().expect("path"),
            "--tls-key",
            key.to_str().expect("path"),
            "--token-file",
            tokens.to_str().expect("path"),
        ])
        .start()
        .await;
    let connected = grpc_over_tls(&address(&daemon), &pki.ca_path(), None).await;
    let error = match connected {
        Err(error) => format!("{error:?}"),
        Ok(mut client) => format!(
            "{:?}",
            client
                .get_summary(with_token(pb::GetSummaryRequest {}, ADMIN))
                .await
                .expect_err("an expired certificate")
        ),
    };
    assert!(
        error.contains("Expired") || error.contains("expired"),
        "{error}"
    );
}

#[tokio::test]
async fn the_http_api_takes_tokens_and_session_cookies() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(dir.path(), &pki, "--http-listen", &[]).await;
    let address = daemon.http_address.clone().expect("HTTP address");
    let ca = pki.ca_path();
    let bearer = |token: &str| format!("Bearer {token}");

    let (status, headers, body) = https(&address, &ca, get("/v1/summary", None, None)).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        headers.get("www-authenticate").map(|v| v.as_bytes()),
        Some(&b"Bearer"[..])
    );
    assert!(body.contains("UNAUTHENTICATED"), "{body}");
    let (status, _, body) = https(
        &address,
        &ca,
        get("/v1/summary", Some(&bearer(READER)), None),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let spawn_body = r#"{"agentId": "h", "command": ["sleep", "30"]}"#;
    let post = |token: &str| {
        hyper::Request::post("/v1/agents")
            .header("host", "localhost")
            .header("authorization", bearer(token))
            .body(spawn_body.to_string())
            .expect("request")
    };
    let (status, _, body) = https(&address, &ca, post(READER)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("PERMISSION_DENIED"), "{body}");
    let (status, _, body) = https(&address, &ca, post(ADMIN)).await;
    assert_eq!(status, 201, "{body}");
    // The page and the probes need nothing.
    for open in ["/", "/dashboard/app.js", "/healthz", "/readyz"] {
        let (status, _, _) = https(&address, &ca, get(open, None, None)).await;
        assert_eq!(status, 200, "{open}");
    }

    // The dashboard's way: a token for a cookie, HttpOnly, SameSite=Strict, Secure.
    let login = hyper::Request::post("/v1/session")
        .header("host", "localhost")
        .body(format!(r#"{{"token": "{READER}"}}"#))
        .expect("request");
    let (status, headers, body) = https(&address, &ca, login).await;
    assert_eq!(status, 200, "{body}");
    let set_cookie = headers
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .expect("a cookie")
        .to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().expect("name=value");
    let (status, _, body) = https(&address, &ca, get("/v1/agents/h", None, Some(cookie))).await;
    assert_eq!(status, 200, "{body}");
    let forged = "agentd_session=00";
    let (status, _, _) = https(&address, &ca, get("/v1/agents/h", None, Some(forged))).await;
    assert_eq!(status, 401);
    let bad_login = hyper::Request::post("/v1/session")
        .header("host", "localhost")
        .body(r#"{"token": "wrong-token-123456789"}"#.to_string())
        .expect("request");
    let (status, _, _) = https(&address, &ca, bad_login).await;
    assert_eq!(status, 401);
    let mut local = daemon.client().await;
    kill_all(&mut local).await;
}

#[tokio::test]
async fn the_socket_can_belong_to_a_group() {
    let daemon = Daemon::builder()
        .options(&["--socket-group", "nogroup"])
        .start()
        .await;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&daemon.socket).expect("socket");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    let group = nix::unistd::Group::from_name("nogroup")
        .expect("lookup")
        .expect("nogroup exists");
    assert_eq!(meta.gid(), group.gid.as_raw());
}

#[tokio::test]
async fn agentctl_grpcurl_and_python_over_tls_with_a_token() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new(dir.path(), "a");
    let daemon = secured(dir.path(), &pki, "--listen", &[]).await;
    let address = address(&daemon);
    let ca = pki.ca_path();

    // agentctl: --addr https://, --ca-cert, the token from the environment.
    let agentctl = |token: &str, args: &[&str]| {
        Command::new(agentctl_path())
            .args(["--addr", &format!("https://{address}"), "--ca-cert"])
            .arg(&ca)
            .env("AGENTD_TOKEN", token)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("agentctl")
    };
    let spawned = agentctl(ADMIN, &["spawn", "--id", "tls-a", "--", "sleep", "30"]);
    assert!(
        spawned.status.success(),
        "{}",
        String::from_utf8_lossy(&spawned.stderr)
    );
    let denied = agentctl(READER, &["stop", "tls-a"]);
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && stderr.contains("PermissionDenied"),
        "{stderr}"
    );
    let listed = agentctl(READER, &["list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("tls-a"));

    if requires_in_part("the grpcurl part", Need::Grpcurl) {
        // grpcurl, as the README shows it.
        let grpcurl = |token: &str| {
            Command::new("grpcurl")
                .arg("-cacert")
                .arg(&ca)
                .args(["-H", &format!("authorization: Bearer {token}"), &address])
                .args(["agentd.v1.AgentSupervisor/GetSummary"])
                .output()
                .expect("grpcurl (tests/setup.sh installs it)")
        };
        let summary = grpcurl(READER);
        assert!(
            summary.status.success()
                && String::from_utf8_lossy(&summary.stdout).contains("\"total\": 1"),
            "{}{}",
            String::from_utf8_lossy(&summary.stdout),
            String::from_utf8_lossy(&summary.stderr)
        );
        let refused = grpcurl("wrong-token-0123456789");
        assert!(!refused.status.success());
        assert!(String::from_utf8_lossy(&refused.stderr).contains("Unauthenticated"));
    }

    if requires_in_part("the Python part", Need::Python("grpc")) {
        // Python's grpcio over TLS with the token as metadata.
        let script = r#"
import sys, grpc
address, ca, token = sys.argv[1:4]
channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(open(ca, "rb").read()))
summary = channel.unary_unary("/agentd.v1.AgentSupervisor/GetSummary",
                              request_serializer=lambda b: b, response_deserializer=lambda b: b)
assert len(summary(b"", metadata=[("authorization", "Bearer " + token)], timeout=10)) > 0
try:
    summary(b"", timeout=10)
    sys.exit("answered without a token")
except grpc.RpcError as error:
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
print("python over tls ok")
"#;
        let python = Command::new("python3")
            .args(["-c", script, &address])
            .arg(&ca)
            .arg(READER)
            .output()
            .expect("python3");
        assert!(
            String::from_utf8_lossy(&python.stdout).contains("python over tls ok"),
            "{}",
            String::from_utf8_lossy(&python.stderr)
        );
    }
    let mut local = daemon.client().await;
    kill_all(&mut local).await;
}

#[tokio::test]
async fn limits_answer_resource_exhausted_with_a_reason_and_fields_are_named() {
    let daemon = Daemon::builder()
        .options(&["--max-watchers", "2"])
        .start()
        .await;
    let mut client = daemon.client().await;
    spawn(&mut client, "kept", sh("sleep 30")).await;

    // A 64 MiB spawn: RESOURCE_EXHAUSTED, as the gRPC specification says, and nothing lost.
    let huge = pb::SpawnRequest {
        prompt: "x".repeat(64 << 20),
        ..spawn_request("huge", sh("true"))
    };
    let refused = client.spawn(huge).await.expect_err("64 MiB");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(reason(&refused).as_deref(), Some("REQUEST_TOO_LARGE"));
    assert!(
        refused.message().contains("--max-request-bytes"),
        "{refused:?}"
    );
    assert_eq!(
        status(&mut client, "kept").await.state,
        pb::AgentState::Running as i32
    );
    let missing = client
        .status(pb::StatusRequest {
            agent_id: "huge".into(),
        })
        .await
        .expect_err("never stored");
    assert_eq!(missing.code(), Code::NotFound);

    // The watcher cap.
    let watch = |client: &mut Client| {
        let mut client = client.clone();
        async move {
            client
                .watch_agents(pb::WatchAgentsRequest::default())
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = watch(&mut client).await.expect("first watcher");
    let _second = watch(&mut client).await.expect("second watcher");
    let third = watch(&mut client).await.expect_err("over --max-watchers");
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert_eq!(reason(&third).as_deref(), Some("TOO_MANY_WATCHERS"));
    drop(first);
    eventually("a closed watcher's place comes back", async || {
        watch(&mut client).await
    })
    .await;

    // A rejected field is named in google.rpc.BadRequest, not only in the message.
    let bad = client
        .spawn(spawn_request("bad id!", sh("true")))
        .await
        .expect_err("bad id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = bad
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    assert_eq!(fields, ["agent_id"], "{bad:?}");
    kill_all(&mut client).await;
}

#[tokio::test]
async fn connections_over_the_limit_are_closed() {
    let daemon = Daemon::builder()
        .options(&["--listen", "127.0.0.1:0", "--max-connections", "1"])
        .start()
        .await;
    let address = address(&daemon);
    // One connection holds the only place.
    let mut first = AgentSupervisorClient::new(
        Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect()
            .await
            .expect("the first connection"),
    );
    first
        .get_summary(pb::GetSummaryRequest {})
        .await
        .expect("served");
    let second = async {
        match Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect()
            .await
        {
            Err(_) => true,
            Ok(channel) => AgentSupervisorClient::new(channel)
                .get_summary(pb::GetSummaryRequest {})
                .await
                .is_err(),
        }
    };
    let refused = tokio::time::timeout(DEADLINE, second).await;
    assert_eq!(refused.ok(), Some(true), "a second connection was served");
    eventually("the refusal is logged", async || {
        daemon.log().contains("--max-connections reached")
    })
    .await;
    // Once the first closes, its place is free again.
    drop(first);
    eventually(
        "the place comes back",
        async || match Endpoint::from_shared(format!("http://{address}"))
            .expect("endpoint")
            .connect()
            .await
        {
            Ok(channel) => AgentSupervisorClient::new(channel)
                .get_summary(pb::GetSummaryRequest {})
                .await
                .is_ok(),
            Err(_) => false,
        },
    )
    .await;
}

#[tokio::test]
async fn the_health_listener_answers_probes_and_nothing_else() {
    let daemon = Daemon::builder()
        .options(&["--health-listen", "127.0.0.1:0"])
        .start()
        .await;
    let address = daemon.health_address.clone().expect("health address");
    let channel = Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("plaintext, no token");
    let health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a probe")
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");
    let spawn = AgentSupervisorClient::new(channel)
        .spawn(spawn_request("nope", sh("true")))
        .await
        .expect_err("only health is served here");
    assert_eq!(spawn.code(), Code::Unimplemented, "{spawn:?}");
}
