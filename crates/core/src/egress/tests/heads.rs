//! Request heads as the proxy reads them: what is a tunnel, what is forwarded and how,
//! what is an address, and what could be read two ways.

use super::super::body::Body;
use super::super::request::{self, Host, Request, Target};

#[test]
fn heads_end_at_the_first_blank_line() {
    assert_eq!(
        request::head_end(b"GET / HTTP/1.1\r\n\r\nbody", 0),
        Some(18)
    );
    assert_eq!(request::head_end(b"GET / HTTP/1.1\n\nbody", 0), Some(16));
    assert_eq!(request::head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
    // Searching again from where the last search stopped still sees a split blank line.
    let head = b"GET / HTTP/1.1\r\n\r\n";
    assert_eq!(request::head_end(head, 16), Some(18));
    assert_eq!(request::head_end(head, 17), Some(18));
}

fn name(host: &str, port: u16) -> Target {
    Target {
        host: Host::Name(host.to_string()),
        port,
    }
}

#[test]
fn connect_and_absolute_requests_are_read() {
    assert_eq!(
        request::parse(b"CONNECT Example.com.:443 HTTP/1.1\r\nHost: whatever\r\n\r\n"),
        Ok(Request::Connect(name("example.com", 443)))
    );
    let forwarded = request::parse(
        b"POST http://Example.com:8080/a/b?c=d#frag HTTP/1.1\r\nHost: example.com:8080\r\n\
          Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\nConnection: \
          keep-alive, x-secret\r\nKeep-Alive: 5\r\nContent-Length: 3\r\nX-Secret: 1\r\n\r\n",
    );
    assert_eq!(
        forwarded,
        Ok(Request::Forward {
            target: name("example.com", 8080),
            head: b"POST /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\nContent-Length: 3\r\n\
                    X-Secret: 1\r\nConnection: close\r\n\r\n"
                .to_vec(),
            body: Body::Length(3),
        })
    );
    let no_host = request::parse(b"GET http://example.com?q HTTP/1.0\r\n\r\n");
    assert_eq!(
        no_host,
        Ok(Request::Forward {
            target: name("example.com", 80),
            head: b"GET /?q HTTP/1.0\r\nHost: example.com\r\nConnection: close\r\n\r\n".to_vec(),
            body: Body::Empty,
        })
    );
    let chunked =
        request::parse(b"PUT http://a.test/ HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n");
    assert!(matches!(
        chunked,
        Ok(Request::Forward {
            body: Body::Chunked,
            ..
        })
    ));
}

#[test]
fn addresses_in_any_form_are_seen_as_addresses() {
    for (target, host) in [
        ("127.0.0.1:80", "127.0.0.1"),
        ("[::1]:80", "[::1]"),
        ("[::ffff:127.0.0.1]:80", "[::ffff:127.0.0.1]"),
        ("2130706433:80", "2130706433"),
        ("0x7f.1:80", "0x7f.1"),
        ("0x7F000001:80", "0x7f000001"),
        ("017700000001:80", "017700000001"),
        ("127.1:80", "127.1"),
        ("127.0.0.1.:80", "127.0.0.1."),
    ] {
        let head = format!("CONNECT {target} HTTP/1.1\r\n\r\n");
        let Ok(Request::Connect(found)) = request::parse(head.as_bytes()) else {
            panic!("{target} does not parse");
        };
        assert_eq!(found.host, Host::Address(host.to_string()), "{target}");
    }
}

#[test]
fn requests_that_read_two_ways_are_malformed() {
    for (head, says, named) in [
        (
            "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
            "not a proxy request",
            false,
        ),
        ("GET https://a.test/ HTTP/1.1\r\n\r\n", "CONNECT", false),
        (
            "GET http://a.test@b.test/ HTTP/1.1\r\n\r\n",
            "user info",
            false,
        ),
        ("CONNECT a.test HTTP/1.1\r\n\r\n", "host:port", false),
        ("CONNECT a.test:0 HTTP/1.1\r\n\r\n", "1 to 65535", false),
        ("CONNECT a.test:99999 HTTP/1.1\r\n\r\n", "1 to 65535", false),
        ("CONNECT [::1 HTTP/1.1\r\n\r\n", "opens `[`", false),
        (
            "CONNECT a_b%2e.test:1 HTTP/1.1\r\n\r\n",
            "not a host name",
            true,
        ),
        (
            "\r\nGET http://a.test/ HTTP/1.1\r\n\r\n",
            "blank line",
            false,
        ),
        (
            "GET http://a.test/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "does not parse",
            false,
        ),
        (
            "GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n",
            "does not name the URL's host",
            true,
        ),
        (
            "GET http://a.test:8080/ HTTP/1.1\r\nHost: a.test:9090\r\n\r\n",
            "does not name",
            true,
        ),
        (
            "GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
            "more than one Host",
            true,
        ),
        (
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "both",
            true,
        ),
        (
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "Content-Length",
            true,
        ),
        (
            "POST http://a.test/ HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "Content-Length",
            true,
        ),
        (
            "POST http://a.test/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "chunked",
            true,
        ),
        (
            "POST http://a.test/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.0",
            true,
        ),
    ] {
        match request::parse(head.as_bytes()) {
            Ok(request) => panic!("{head:?} was read as {request:?}"),
            Err(malformed) => {
                assert!(malformed.problem.contains(says), "{head:?}: {malformed:?}");
                assert_eq!(malformed.named.is_some(), named, "{head:?}: {malformed:?}");
            }
        }
    }
}
