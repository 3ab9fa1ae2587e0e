//! The proxy through real sockets on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::super::{Denial, Egress, EgressCounts, EgressResolve, MAX_CONNECTIONS, serve};
use super::{WAIT, rules};

/// A proxy serving one agent, `a1`, on a port of its own; aborted when dropped.
struct TestProxy {
    address: SocketAddr,
    egress: Arc<Egress>,
    denials: UnboundedReceiver<Denial>,
    task: JoinHandle<()>,
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn start(allow: &[&str], resolve: &[&str]) -> TestProxy {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
    let address = listener.local_addr().expect("its address");
    let egress = Egress::within(rules(allow), None);
    let resolve: Vec<String> = resolve.iter().map(|entry| entry.to_string()).collect();
    let resolve = EgressResolve::parse(&resolve).expect("valid resolve entries");
    let (sender, denials) = unbounded_channel();
    let task = serve(
        listener,
        "a1".into(),
        egress.clone(),
        Arc::new(resolve),
        sender,
    )
    .expect("serving");
    TestProxy {
        address,
        egress,
        denials,
        task,
    }
}

/// What a client of the proxy got back: the status code, the head's text, and the
/// connection, positioned just after the head.
struct Answer {
    status: u16,
    head: String,
    stream: TcpStream,
}

impl Answer {
    async fn rest(mut self) -> String {
        let mut rest = Vec::new();
        timeout(WAIT, self.stream.read_to_end(&mut rest))
            .await
            .expect("the connection closes")
            .expect("reading the rest");
        String::from_utf8_lossy(&rest).into_owned()
    }
}

impl TestProxy {
    /// Sends `head` on a new connection and reads the head of the answer.
    async fn send(&self, head: &str) -> Answer {
        let mut stream = TcpStream::connect(self.address)
            .await
            .expect("connecting to the proxy");
        stream.write_all(head.as_bytes()).await.expect("sending");
        read_answer(stream).await
    }

    async fn connect(&self, target: &str) -> Answer {
        self.send(&format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"
        ))
        .await
    }

    async fn denial(&mut self) -> Denial {
        timeout(WAIT, self.denials.recv())
            .await
            .expect("a denial in time")
            .expect("the proxy still runs")
    }

    /// Asserts that nothing was reported: a denial is sent before the answer is written.
    fn no_denial(&mut self) {
        if let Ok(denial) = self.denials.try_recv() {
            panic!("unexpected {denial:?}");
        }
    }

    /// Waits until the counts are `expected` (bytes are counted as they pass, so a
    /// moment after the client saw them).
    async fn counts_become(&self, expected: EgressCounts) {
        let deadline = Instant::now() + WAIT;
        while self.egress.counts() != expected {
            assert!(
                Instant::now() < deadline,
                "counts are {:?}, not {expected:?}",
                self.egress.counts()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Reads an answer's head one byte at a time, so nothing after it is taken.
async fn read_answer(mut stream: TcpStream) -> Answer {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = timeout(WAIT, stream.read_u8())
            .await
            .expect("an answer in time")
            .unwrap_or_else(|error| {
                panic!(
                    "the answer ends after {:?}: {error}",
                    String::from_utf8_lossy(&head)
                )
            });
        head.push(byte);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    Answer {
        status,
        head,
        stream,
    }
}

/// A server that echoes every connection back; its port.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut from, mut to) = stream.split();
                let _ = tokio::io::copy(&mut from, &mut to).await;
            });
        }
    });
    port
}

/// An HTTP server for one request: once what it received ends with `request_end`, it
/// answers 200 with `body` and closes; then it reports every byte it ever received.
async fn origin(
    request_end: &'static str,
    body: &'static str,
) -> (u16, oneshot::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
    let port = listener.local_addr().expect("its address").port();
    let (report, received) = oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        while !got.ends_with(request_end.as_bytes()) {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(read) => got.extend_from_slice(&buf[..read]),
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        let _ = stream.read_to_end(&mut got).await;
        let _ = report.send(got);
    });
    (port, received)
}

async fn received(report: oneshot::Receiver<Vec<u8>>) -> String {
    let got = timeout(WAIT, report)
        .await
        .expect("the origin reports in time")
        .expect("the origin reports");
    String::from_utf8_lossy(&got).into_owned()
}

/// A port on 127.0.0.1 that nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding");
    listener.local_addr().expect("its address").port()
}

#[tokio::test]
async fn connect_tunnels_to_an_allowed_host_and_counts_bytes() {
    let echo = echo_server().await;
    let proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    // The first bytes ride with the head, as a client that does not wait for 200 sends them.
    let mut answer = proxy
        .send(&format!(
            "CONNECT allowed.test:{echo} HTTP/1.1\r\n\r\nfirst"
        ))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.head, "HTTP/1.1 200 Connection established\r\n\r\n");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut from, mut to) = answer.stream.split();
    let mut echoed = vec![0; 5 + payload.len()];
    let (sent, read) = tokio::join!(
        to.write_all(&payload),
        timeout(WAIT, from.read_exact(&mut echoed)),
    );
    sent.expect("sending through the tunnel");
    read.expect("the echo in time").expect("reading the echo");
    assert_eq!(&echoed[..5], b"first");
    assert_eq!(&echoed[5..], &payload[..]);
    // Counted as the bytes pass, while the tunnel is still open.
    let moved = 5 + payload.len() as u64;
    let counts = EgressCounts {
        allowed: 1,
        denied: 0,
        bytes_up: moved,
        bytes_down: moved,
    };
    proxy.counts_become(counts).await;
    // The client's end reaches the server, whose end comes back.
    to.shutdown().await.expect("ending the tunnel");
    let mut end = Vec::new();
    timeout(WAIT, from.read_to_end(&mut end))
        .await
        .expect("the tunnel ends in time")
        .expect("the end of the tunnel");
    assert!(end.is_empty());
    assert_eq!(proxy.egress.counts(), counts);
}

#[tokio::test]
async fn a_head_that_never_ends_is_refused() {
    let proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let filler = "X-Filler: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789\r\n";
    let head = format!(
        "GET http://allowed.test/ HTTP/1.1\r\n{}",
        filler.repeat(1100)
    );
    let answer = proxy.send(&head).await;
    assert_eq!(answer.status, 431);
    assert_eq!(proxy.egress.counts(), EgressCounts::default());
}

#[tokio::test]
async fn a_host_not_allowed_is_denied_and_reported() {
    let mut proxy = start(&["allowed.test"], &["other.test=127.0.0.1"]);
    let answer = proxy.connect("other.test:443").await;
    assert_eq!(answer.status, 403);
    let text = answer.rest().await;
    assert!(text.contains("other.test:443 is not allowed"), "{text}");
    let denial = proxy.denial().await;
    assert_eq!(
        (&*denial.agent_id, &*denial.host, denial.port),
        ("a1", "other.test", 443)
    );
    assert!(denial.reason.contains("allow_hosts"), "{}", denial.reason);
    assert_eq!(
        proxy.egress.counts(),
        EgressCounts {
            denied: 1,
            ..EgressCounts::default()
        }
    );
}

#[tokio::test]
async fn a_port_rule_allows_its_port_only() {
    let echo = echo_server().await;
    let other_port = if echo == 1 { 2 } else { 1 };
    let (exact, wildcard) = (
        format!("allowed.test:{echo}"),
        format!("*.allowed.test:{other_port}"),
    );
    let mut proxy = start(
        &[&exact, &wildcard],
        &["allowed.test=127.0.0.1", "api.allowed.test=127.0.0.1"],
    );
    assert_eq!(
        proxy.connect(&format!("allowed.test:{echo}")).await.status,
        200
    );
    assert_eq!(
        proxy
            .connect(&format!("allowed.test:{other_port}"))
            .await
            .status,
        403
    );
    assert_eq!(proxy.denial().await.port, other_port);
    assert_eq!(
        proxy
            .connect(&format!("api.allowed.test:{echo}"))
            .await
            .status,
        403
    );
    assert_eq!(proxy.denial().await.host, "api.allowed.test");
}

#[tokio::test]
async fn a_wildcard_allows_subdomains_not_the_apex() {
    let echo = echo_server().await;
    let mut proxy = start(
        &["*.allowed.test"],
        &[
            "allowed.test=127.0.0.1",
            "api.allowed.test=127.0.0.1",
            "a.b.allowed.test=127.0.0.1",
        ],
    );
    assert_eq!(
        proxy
            .connect(&format!("api.allowed.test:{echo}"))
            .await
            .status,
        200
    );
    assert_eq!(
        proxy
            .connect(&format!("A.B.Allowed.Test.:{echo}"))
            .await
            .status,
        200
    );
    assert_eq!(
        proxy.connect(&format!("allowed.test:{echo}")).await.status,
        403
    );
    assert_eq!(proxy.denial().await.host, "allowed.test");
}

#[tokio::test]
async fn addresses_are_refused_in_every_form() {
    let echo = echo_server().await;
    let mut proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    for host in [
        "127.0.0.1",
        "[::1]",
        "2130706433",
        "0x7f.1",
        "0x7f000001",
        "127.1",
    ] {
        let answer = proxy.connect(&format!("{host}:{echo}")).await;
        assert_eq!(answer.status, 403, "{host}");
        let denial = proxy.denial().await;
        assert_eq!((&*denial.host, denial.port), (host, echo));
        assert!(denial.reason.contains("an address"), "{}", denial.reason);
    }
    let answer = proxy
        .send(&format!("GET http://127.0.0.1:{echo}/ HTTP/1.1\r\n\r\n"))
        .await;
    assert_eq!(answer.status, 403);
    assert_eq!(proxy.denial().await.host, "127.0.0.1");
    assert_eq!(proxy.egress.counts().denied, 7);
    assert_eq!(proxy.egress.counts().allowed, 0);
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_refused() {
    let echo = echo_server().await;
    let mut proxy = start(&["localhost"], &[]);
    let answer = proxy.connect(&format!("localhost:{echo}")).await;
    assert_eq!(answer.status, 403);
    let denial = proxy.denial().await;
    assert_eq!(denial.host, "localhost");
    assert!(denial.reason.contains("loopback"), "{}", denial.reason);
}

#[tokio::test]
async fn plain_http_is_forwarded_in_origin_form_with_connection_close() {
    let (port, report) = origin("\r\n\r\n", "hello from origin").await;
    let proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let answer = proxy
        .send(&format!(
            "GET http://allowed.test:{port}/path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\n\
             Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic c2VjcmV0\r\n\
             Connection: keep-alive\r\nAccept: */*\r\n\r\n"
        ))
        .await;
    assert_eq!(answer.status, 200, "{}", answer.head);
    assert_eq!(answer.rest().await, "hello from origin");
    let expected = format!(
        "GET /path?q=1 HTTP/1.1\r\nHost: allowed.test:{port}\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n"
    );
    assert_eq!(received(report).await, expected);
    let answer_len = "HTTP/1.1 200 OK\r\nContent-Length: 17\r\nConnection: close\r\n\r\n".len()
        + "hello from origin".len();
    proxy
        .counts_become(EgressCounts {
            allowed: 1,
            denied: 0,
            bytes_up: expected.len() as u64,
            bytes_down: answer_len as u64,
        })
        .await;
}

#[tokio::test]
async fn a_body_is_forwarded_and_nothing_after_it() {
    let proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let smuggled = "GET http://other.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n";
    for (framing, body) in [
        ("Content-Length: 5", "hello"),
        ("Transfer-Encoding: chunked", "5\r\nhello\r\n0\r\n\r\n"),
    ] {
        let (port, report) = origin(body, "ok").await;
        let answer = proxy
            .send(&format!(
                "POST http://allowed.test:{port}/ HTTP/1.1\r\nHost: allowed.test:{port}\r\n\
                 {framing}\r\n\r\n{body}{smuggled}"
            ))
            .await;
        assert_eq!(answer.status, 200, "{framing}");
        assert_eq!(answer.rest().await, "ok");
        assert_eq!(
            received(report).await,
            format!(
                "POST / HTTP/1.1\r\nHost: allowed.test:{port}\r\n{framing}\r\n\
                 Connection: close\r\n\r\n{body}"
            )
        );
    }
}

#[tokio::test]
async fn a_host_header_for_another_host_is_refused() {
    let (port, report) = origin("\r\n\r\n", "never").await;
    let mut proxy = start(
        &["allowed.test", "other.test"],
        &["allowed.test=127.0.0.1", "other.test=127.0.0.1"],
    );
    let answer = proxy
        .send(&format!(
            "GET http://allowed.test:{port}/ HTTP/1.1\r\nHost: other.test\r\n\r\n"
        ))
        .await;
    assert_eq!(answer.status, 400);
    let denial = proxy.denial().await;
    assert_eq!((&*denial.host, denial.port), ("allowed.test", port));
    assert!(denial.reason.contains("Host header"), "{}", denial.reason);
    // Refused before any connection was made.
    assert_eq!(
        proxy.egress.counts(),
        EgressCounts {
            denied: 1,
            ..EgressCounts::default()
        }
    );
    drop(report);
}

#[tokio::test]
async fn requests_that_are_not_for_a_proxy_are_400_and_not_counted() {
    let mut proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    for head in [
        "GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
        "GET https://allowed.test/ HTTP/1.1\r\n\r\n",
        "NOT HTTP AT ALL\r\n\r\n",
    ] {
        let answer = proxy.send(head).await;
        assert_eq!(answer.status, 400, "{head:?}");
        assert!(answer.rest().await.contains("bad request"));
    }
    proxy.no_denial();
    assert_eq!(proxy.egress.counts(), EgressCounts::default());
}

#[tokio::test]
async fn an_upstream_that_refuses_is_502_and_not_counted() {
    let port = closed_port();
    let mut proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let answer = proxy.connect(&format!("allowed.test:{port}")).await;
    assert_eq!(answer.status, 502);
    assert!(answer.rest().await.contains("cannot reach"));
    proxy.no_denial();
    assert_eq!(proxy.egress.counts(), EgressCounts::default());
}

#[tokio::test]
async fn new_rules_apply_to_the_next_connection() {
    let echo = echo_server().await;
    let mut proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let mut open = proxy.connect(&format!("allowed.test:{echo}")).await;
    assert_eq!(open.status, 200);
    // A connection whose head has not arrived yet is judged by the rules it arrives under.
    let mut waiting = TcpStream::connect(proxy.address).await.expect("connecting");
    proxy.egress.set_rules(rules(&["other.test"]));
    waiting
        .write_all(format!("CONNECT allowed.test:{echo} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .expect("sending");
    assert_eq!(read_answer(waiting).await.status, 403);
    assert_eq!(proxy.denial().await.host, "allowed.test");
    // The tunnel opened before the change still works.
    open.stream.write_all(b"still").await.expect("sending");
    let mut echoed = [0; 5];
    timeout(WAIT, open.stream.read_exact(&mut echoed))
        .await
        .expect("in time")
        .expect("the echo");
    assert_eq!(&echoed, b"still");
    proxy.egress.set_rules(rules(&["allowed.test"]));
    assert_eq!(
        proxy.connect(&format!("allowed.test:{echo}")).await.status,
        200
    );
}

#[tokio::test]
async fn aborting_the_proxy_ends_open_tunnels() {
    let echo = echo_server().await;
    let proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let mut tunnel = proxy.connect(&format!("allowed.test:{echo}")).await;
    assert_eq!(tunnel.status, 200);
    tunnel.stream.write_all(b"ping").await.expect("sending");
    let mut echoed = [0; 4];
    tunnel
        .stream
        .read_exact(&mut echoed)
        .await
        .expect("the echo");
    proxy.task.abort();
    // EOF, or a reset: either way the tunnel is gone, with nothing more on it.
    let mut rest = Vec::new();
    let _ = timeout(WAIT, tunnel.stream.read_to_end(&mut rest))
        .await
        .expect("the tunnel ends in time");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        TcpStream::connect(proxy.address).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let echo = echo_server().await;
    let proxy = start(&["allowed.test"], &["allowed.test=127.0.0.1"]);
    let mut waiting = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        waiting.push(TcpStream::connect(proxy.address).await.expect("connecting"));
    }
    let refused = read_answer(TcpStream::connect(proxy.address).await.expect("connecting")).await;
    assert_eq!(refused.status, 503);
    // A place given back is taken by a later connection.
    drop(waiting.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = proxy.connect(&format!("allowed.test:{echo}")).await;
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.status, 503);
        assert!(Instant::now() < deadline, "no place came back");
        tokio::task::yield_now().await;
    }
}
