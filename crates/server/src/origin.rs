//! What a web page may make agentd do. A browser attaches the dashboard's session cookie to
//! requests that any page of the same host makes (SameSite does not tell ports apart), and
//! with `--insecure-listen` any page may call the API, directly or through DNS rebinding.
//! So a state-changing request carried by the cookie needs the listener's own `Origin` and
//! a JSON body (which a page of another origin cannot send without a CORS preflight, which
//! agentd never grants); and a listener without tokens answers only its own loopback `Host`
//! names, and refuses a foreign `Origin` and a body that is not JSON. A browser never sends
//! a bearer token on its own, so requests with one are not checked here.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, Method, header};
use tonic::Status;

/// Anything but GET, HEAD and OPTIONS.
pub fn changes_state(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// With `--insecure-listen`: `host` (the `Host` header, or HTTP/2's `:authority`) must be
/// the listener's own loopback address or `localhost`, with its port.
pub fn check_loopback_host(host: Option<&str>, local: Option<SocketAddr>) -> Result<(), Status> {
    let Some(local) = local else {
        return Err(Status::internal("the listener's own address is not known"));
    };
    let ip = match local.ip() {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    let port = local.port();
    let Some(host) = host else {
        return Err(Status::permission_denied(format!(
            "a request without `Host` is refused on a listener without tokens (--insecure-listen), \
             against DNS rebinding: send `Host: {ip}:{port}` or `Host: localhost:{port}`"
        )));
    };
    let ours = split_host(host).is_some_and(|(name, named_port)| {
        let own_name =
            name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>() == Ok(local.ip());
        own_name && named_port.unwrap_or(80) == port
    });
    match ours {
        true => Ok(()),
        false => Err(Status::permission_denied(format!(
            "Host `{host}` is not this listener's ({ip}:{port} or localhost:{port}): refused \
             against DNS rebinding"
        ))),
    }
}

/// `NAME` and the port of `NAME:PORT`, `[V6]:PORT`, `NAME` or `[V6]`.
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = host.strip_prefix('[') {
        let (name, after) = rest.split_once(']')?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':')?.parse().ok()?),
        };
        return Some((name, port));
    }
    match host.rsplit_once(':') {
        Some((name, port)) => Some((name, Some(port.parse().ok()?))),
        None => Some((host, None)),
    }
}

/// Who a state-changing request may come from, as far as this module cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Authenticated by the session cookie, so possibly by a browser on a page's behalf: it
    /// must show the listener's own `Origin` and a JSON content type.
    Cookie,
    /// On a listener without tokens: a foreign `Origin` and a body that is not JSON are
    /// refused (curl without a body, or with `-H content-type:application/json`, passes).
    Anyone,
}

/// Checks a state-changing request's `Origin` and content type; `scheme` is `http` or
/// `https`, as this listener speaks.
pub fn check_state_change(headers: &HeaderMap, scheme: &str, caller: Caller) -> Result<(), Status> {
    let value = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let own = value(header::HOST).map(|host| format!("{scheme}://{host}"));
    match (value(header::ORIGIN), &own) {
        (Some(origin), Some(own)) if origin.eq_ignore_ascii_case(own) => {}
        (Some(origin), _) => {
            return Err(Status::permission_denied(format!(
                "Origin `{origin}` is not this listener's (`{}`): a page of another origin may \
                 not change anything here (cross-site request forgery)",
                own.as_deref().unwrap_or("a request without Host has none")
            )));
        }
        (None, _) if caller == Caller::Cookie => {
            return Err(Status::permission_denied(
                "a request that changes something with the session cookie needs the page's \
                 `Origin` header (browsers send it themselves); other clients send \
                 `authorization: Bearer TOKEN`",
            ));
        }
        (None, _) => {}
    }
    let has_body = value(header::TRANSFER_ENCODING).is_some()
        || value(header::CONTENT_LENGTH).is_some_and(|length| length.trim() != "0");
    let content_type = headers.get(header::CONTENT_TYPE);
    let json = content_type
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    let needs_json = caller == Caller::Cookie || has_body || content_type.is_some();
    if needs_json && !json {
        let says = match content_type {
            Some(v) => format!("this one says `{}`", String::from_utf8_lossy(v.as_bytes())),
            None => "this one has none".to_string(),
        };
        return Err(Status::permission_denied(format!(
            "a request that changes something takes `content-type: application/json` ({says}): \
             other types are refused, since any web page can send them"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_listeners_own_loopback_names_are_answered() {
        let local: SocketAddr = "127.0.0.1:8080".parse().expect("address");
        for good in ["127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080"] {
            assert!(
                check_loopback_host(Some(good), Some(local)).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "attacker.example",
            "attacker.example:8080",
            "127.0.0.1:9090",
            "127.0.0.2:8080",
            "localhost",
            "[::1]:8080",
            "localhost:8080:1",
        ] {
            let refused = check_loopback_host(Some(bad), Some(local)).expect_err(bad);
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
            assert!(refused.message().contains("DNS rebinding"), "{refused:?}");
        }
        let v6: SocketAddr = "[::1]:80".parse().expect("address");
        for good in ["[::1]:80", "[::1]", "localhost"] {
            assert!(check_loopback_host(Some(good), Some(v6)).is_ok(), "{good}");
        }
        assert!(check_loopback_host(None, Some(local)).is_err());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, value.parse().expect("value"));
        }
        headers
    }

    #[test]
    fn cookies_need_the_own_origin_and_json() {
        let own = [
            ("host", "127.0.0.1:8443"),
            ("origin", "https://127.0.0.1:8443"),
        ];
        let json = ("content-type", "application/json; charset=utf-8");
        let ok = headers(&[own[0], own[1], json]);
        assert!(check_state_change(&ok, "https", Caller::Cookie).is_ok());
        for bad in [
            headers(&[own[0], ("origin", "https://127.0.0.1:9999"), json]),
            headers(&[own[0], ("origin", "null"), json]),
            headers(&[own[0], json]),
            headers(&[own[0], own[1], ("content-type", "text/plain")]),
            headers(&[own[0], own[1]]),
        ] {
            let refused = check_state_change(&bad, "https", Caller::Cookie).expect_err("refused");
            assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        }
        // Without a cookie (no tokens at all): no Origin and no body is curl.
        let host = ("host", "localhost:8080");
        let curl = headers(&[host]);
        assert!(check_state_change(&curl, "http", Caller::Anyone).is_ok());
        let text = headers(&[
            host,
            ("content-type", "text/plain"),
            ("content-length", "9"),
        ]);
        assert!(check_state_change(&text, "http", Caller::Anyone).is_err());
        let form = headers(&[host, ("origin", "http://localhost:9999")]);
        assert!(check_state_change(&form, "http", Caller::Anyone).is_err());
        let untyped = headers(&[host, ("content-length", "9")]);
        assert!(check_state_change(&untyped, "http", Caller::Anyone).is_err());
    }
}
