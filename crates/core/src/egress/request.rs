//! A proxy request's head, read without I/O: where it ends, what it asks for
//! (`CONNECT host:port`, or one `http://` request to forward), and the head the upstream
//! server gets instead (origin-form request line, hop-by-hop headers gone,
//! `Connection: close`).

use std::io::Write;

use super::body::Body;
use super::rules::{NameProblem, host_name};

/// The longest request head the proxy reads.
pub(super) const MAX_HEAD: usize = 64 * 1024;
/// The most headers a request may have.
const MAX_HEADERS: usize = 128;
/// Headers for the proxy alone, or for the one connection between client and proxy: never
/// forwarded. `Connection: close` replaces the client's `Connection`. Other headers its
/// `Connection` names pass on: dropping one (`Content-Length`, say) could make the server
/// read the body otherwise than the proxy did.
const DROPPED: [&str; 5] = [
    "connection",
    "proxy-connection",
    "proxy-authorization",
    "keep-alive",
    "upgrade",
];

/// The host a request names, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Host {
    /// A host name: lowercase, without its trailing dot.
    Name(String),
    /// An IP address, or a number a resolver reads as one, as written (lowercase).
    Address(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub host: Host,
    pub port: u16,
}

impl Target {
    pub fn host_text(&self) -> &str {
        match &self.host {
            Host::Name(name) | Host::Address(name) => name,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Request {
    /// `CONNECT host:port`: a tunnel.
    Connect(Target),
    /// `METHOD http://host[:port]/path`: one request, forwarded with `head`, whose body
    /// is framed as `body`.
    Forward {
        target: Target,
        head: Vec<u8>,
        body: Body,
    },
}

/// A request the proxy cannot serve as written (400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Malformed {
    pub problem: String,
    /// The host and port it named, if it got that far: such a request counts as denied.
    pub named: Option<(String, u16)>,
}

impl Malformed {
    fn new(problem: impl Into<String>) -> Malformed {
        Malformed {
            problem: problem.into(),
            named: None,
        }
    }

    fn naming(target: &Target, problem: impl Into<String>) -> Malformed {
        Malformed {
            problem: problem.into(),
            named: Some((target.host_text().to_string(), target.port)),
        }
    }
}

/// Where the head ends in `buf` (just past its blank line), looking at bytes from `from` on
/// (a caller that read more passes the length it had already searched).
pub(super) fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let mut at = from.saturating_sub(2);
    while let Some(offset) = buf[at..].iter().position(|&b| b == b'\n') {
        let newline = at + offset;
        match (buf.get(newline + 1), buf.get(newline + 2)) {
            (Some(b'\n'), _) => return Some(newline + 2),
            (Some(b'\r'), Some(b'\n')) => return Some(newline + 3),
            _ => at = newline + 1,
        }
    }
    None
}

/// Reads one head, which `head_end` found complete.
pub(super) fn parse(head: &[u8]) -> Result<Request, Malformed> {
    if head.starts_with(b"\r") || head.starts_with(b"\n") {
        return Err(Malformed::new("the request starts with a blank line"));
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        // The parser ends the head where `head_end` did; anything else would leave the
        // two disagreeing about where the body starts.
        Ok(httparse::Status::Complete(end)) if end == head.len() => {}
        Ok(_) => return Err(Malformed::new("the request head is incomplete")),
        Err(error) => {
            return Err(Malformed::new(format!(
                "the request head does not parse: {error}"
            )));
        }
    }
    let (Some(method), Some(uri), Some(version)) = (request.method, request.path, request.version)
    else {
        return Err(Malformed::new("the request head is incomplete"));
    };
    if method == "CONNECT" {
        let (host, port) = split_authority(uri)?;
        let port = port.ok_or_else(|| {
            Malformed::new(format!("CONNECT names `host:port`, not `{}`", shown(uri)))
        })?;
        return Ok(Request::Connect(target(host, port)?));
    }
    let Some((scheme, rest)) = uri.split_once("://") else {
        return Err(Malformed::new(
            "not a proxy request: agentd's egress proxy takes `CONNECT host:port` or a \
             request for an absolute `http://` URL",
        ));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(Malformed::new(format!(
            "only http:// URLs are forwarded, not {}://; reach https:// with CONNECT",
            shown(scheme)
        )));
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.contains('@') {
        return Err(Malformed::new(
            "a URL with user info (`user@host`) is not forwarded",
        ));
    }
    let (host, port) = split_authority(authority)?;
    let target = target(host, port.unwrap_or(80))?;
    check_host_header(request.headers, &target)?;
    let body = framing(request.headers, version).map_err(|why| Malformed::naming(&target, why))?;
    let path = path.split('#').next().unwrap_or_default();
    let head = forwarded_head(method, path, version, request.headers, &target);
    Ok(Request::Forward { target, head, body })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`: the host as written, and the port if any.
fn split_authority(text: &str) -> Result<(&str, Option<u16>), Malformed> {
    let bad_port = |port: &str| {
        Malformed::new(format!(
            "port `{}` is not a number from 1 to 65535",
            shown(port)
        ))
    };
    let (host, port) = if text.starts_with('[') {
        let Some(close) = text.find(']') else {
            return Err(Malformed::new(format!(
                "`{}` opens `[` without closing it",
                shown(text)
            )));
        };
        let (host, rest) = text.split_at(close + 1);
        match rest {
            "" => (host, None),
            _ => match rest.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(bad_port(rest)),
            },
        }
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(Malformed::new("the request names no host"));
    }
    let port = match port {
        None => None,
        Some(port) => {
            let valid =
                !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
            match port.parse::<u32>() {
                Ok(number @ 1..=65535) if valid => Some(number as u16),
                _ => return Err(bad_port(port)),
            }
        }
    };
    Ok((host, port))
}

fn target(host: &str, port: u16) -> Result<Target, Malformed> {
    if host.starts_with('[') || host.contains(':') {
        return Ok(Target {
            host: Host::Address(shown(&host.to_ascii_lowercase())),
            port,
        });
    }
    match host_name(host) {
        Ok(name) => Ok(Target {
            host: Host::Name(name),
            port,
        }),
        Err(NameProblem::Address) => Ok(Target {
            host: Host::Address(shown(&host.to_ascii_lowercase())),
            port,
        }),
        Err(why) => Err(Malformed {
            problem: format!("`{}` is not a host name: {why}", shown(host)),
            named: Some((shown(host), port)),
        }),
    }
}

/// The `Host` header, when there is one, names the host of the URL (and its port, if it
/// names one): an agent must not reach one host under another's name.
fn check_host_header(headers: &[httparse::Header], target: &Target) -> Result<(), Malformed> {
    let mut hosts = headers
        .iter()
        .filter(|header| header.name.eq_ignore_ascii_case("host"));
    let Some(header) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err(Malformed::naming(
            target,
            "the request has more than one Host header",
        ));
    }
    let mismatch = || {
        Malformed::naming(
            target,
            format!(
                "the Host header `{}` does not name the URL's host `{}:{}`",
                shown(&String::from_utf8_lossy(header.value)),
                target.host_text(),
                target.port
            ),
        )
    };
    let value = std::str::from_utf8(header.value).map_err(|_| mismatch())?;
    let (host, port) = split_authority(value.trim()).map_err(|_| mismatch())?;
    let same_host = matches!(
        (&target.host, host_name(host)),
        (Host::Name(name), Ok(named)) if *name == named
    );
    if !same_host || port.is_some_and(|port| port != target.port) {
        return Err(mismatch());
    }
    Ok(())
}

/// How the body is framed: one `Transfer-Encoding: chunked` (HTTP/1.1 only), or
/// `Content-Length` (repeats must agree), or none. Anything else could be read two ways.
fn framing(headers: &[httparse::Header], version: u8) -> Result<Body, String> {
    let values = |name: &str| -> Vec<&[u8]> {
        headers
            .iter()
            .filter(|header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value.trim_ascii())
            .collect()
    };
    let encodings = values("transfer-encoding");
    let lengths = values("content-length");
    if !encodings.is_empty() {
        if !lengths.is_empty() {
            return Err("the request has both Transfer-Encoding and Content-Length".into());
        }
        if version == 0 {
            return Err("an HTTP/1.0 request has Transfer-Encoding".into());
        }
        if encodings.len() != 1 || !encodings[0].eq_ignore_ascii_case(b"chunked") {
            return Err("Transfer-Encoding other than one `chunked` is not forwarded".into());
        }
        return Ok(Body::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(Body::Empty);
    };
    let length = std::str::from_utf8(first)
        .ok()
        .filter(|text| {
            !text.is_empty() && text.len() <= 19 && text.bytes().all(|b| b.is_ascii_digit())
        })
        .and_then(|text| text.parse::<u64>().ok());
    match length {
        Some(length) if lengths.iter().all(|other| other == first) => Ok(Body::Length(length)),
        _ => Err("the request's Content-Length is not one number".into()),
    }
}

/// The head the upstream server gets: origin-form request line, the client's headers but
/// the hop-by-hop ones, a `Host` if the client sent none, and `Connection: close`.
fn forwarded_head(
    method: &str,
    path: &str,
    version: u8,
    headers: &[httparse::Header],
    target: &Target,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(512);
    let slash = if path.starts_with('/') { "" } else { "/" };
    // Writes to a Vec cannot fail.
    let _ = write!(head, "{method} {slash}{path} HTTP/1.{version}\r\n");
    let mut has_host = false;
    for header in headers {
        if DROPPED
            .iter()
            .any(|dropped| header.name.eq_ignore_ascii_case(dropped))
        {
            continue;
        }
        has_host |= header.name.eq_ignore_ascii_case("host");
        head.extend_from_slice(header.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(header.value);
        head.extend_from_slice(b"\r\n");
    }
    if !has_host {
        let _ = match target.port {
            80 => write!(head, "Host: {}\r\n", target.host_text()),
            port => write!(head, "Host: {}:{port}\r\n", target.host_text()),
        };
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    head
}

/// Text an agent chose, cut to a length fit for a message.
pub(super) fn shown(text: &str) -> String {
    text.chars().take(253).collect()
}
