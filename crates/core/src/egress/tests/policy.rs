//! `allow_hosts` entries, `--egress-resolve` and the addresses refused, as tables.

use std::net::IpAddr;

use super::super::address::refusal;
use super::super::{EgressResolve, HostRule};
use super::rules;

#[test]
fn rules_are_read_and_written_back() {
    for (text, written) in [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        (" api.example.com:443 ", "api.example.com:443"),
        ("*.example.com", "*.example.com"),
        ("*.Example.com:8080", "*.example.com:8080"),
        ("localhost", "localhost"),
        ("my_host-1.internal", "my_host-1.internal"),
        ("*.com", "*.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ] {
        let rule = HostRule::parse(text).unwrap_or_else(|error| panic!("{text}: {error}"));
        assert_eq!(rule.to_string(), written);
        let json = serde_json::to_string(&rule).expect("serializes");
        assert_eq!(json, format!("\"{written}\""));
        assert_eq!(serde_json::from_str::<HostRule>(&json).ok(), Some(rule));
    }
}

#[test]
fn rules_that_cannot_be_meant_are_refused_with_a_reason() {
    let long_label = format!("{}.com", "a".repeat(64));
    let long_name = format!("{}.com", "abcdefghi.".repeat(26));
    for (text, says) in [
        ("", "is empty"),
        ("127.0.0.1", "not addresses"),
        ("127.0.0.1:443", "not addresses"),
        ("[::1]", "not addresses"),
        ("::1", "not addresses"),
        ("2130706433", "not addresses"),
        ("0x7f.1", "not addresses"),
        ("*.10.0.0", "not addresses"),
        ("*", "`*` alone"),
        ("*:443", "`*` alone"),
        ("foo.*.com", "only `*.` at the start"),
        ("*foo.com", "only `*.` at the start"),
        ("*.*.com", "only `*.` at the start"),
        ("a..com", "empty label"),
        (".com", "empty label"),
        ("exa mple.com", "' '"),
        ("bücher.example", "xn--"),
        ("example.com/path", "'/'"),
        ("example.com:0", "1 to 65535"),
        ("example.com:65536", "1 to 65535"),
        ("example.com:", "1 to 65535"),
        ("example.com:http", "1 to 65535"),
        (&long_label, "at most 63"),
        (&long_name, "at most 253"),
    ] {
        match HostRule::parse(text) {
            Ok(rule) => panic!("{text:?} was read as {rule}"),
            Err(message) => assert!(message.contains(says), "{text:?}: {message}"),
        }
    }
    let stored = serde_json::from_str::<HostRule>("\"10.0.0.1\"");
    assert!(stored.is_err(), "a stored rule is checked as it loads");
}

#[test]
fn rules_allow_their_hosts_and_ports() {
    for (rule, host, port, allowed) in [
        ("example.com", "example.com", 443, true),
        ("example.com", "example.com", 1, true),
        ("example.com", "api.example.com", 443, false),
        ("example.com", "notexample.com", 443, false),
        ("example.com:443", "example.com", 443, true),
        ("example.com:443", "example.com", 80, false),
        ("*.example.com", "api.example.com", 443, true),
        ("*.example.com", "a.b.example.com", 443, true),
        ("*.example.com", "example.com", 443, false),
        ("*.example.com", "badexample.com", 443, false),
        ("*.example.com", "example.com.evil.net", 443, false),
        ("*.example.com:443", "api.example.com", 8443, false),
    ] {
        assert_eq!(
            rules(&[rule])[0].allows(host, port),
            allowed,
            "{rule} allows {host}:{port}"
        );
    }
}

#[test]
fn rules_cover_what_they_allow_entirely() {
    for (parent, child, covered) in [
        ("example.com", "example.com", true),
        ("example.com", "example.com:443", true),
        ("example.com:443", "example.com", false),
        ("example.com:443", "example.com:443", true),
        ("example.com:443", "example.com:80", false),
        ("example.com", "*.example.com", false),
        ("example.com", "api.example.com", false),
        ("*.example.com", "api.example.com", true),
        ("*.example.com", "example.com", false),
        ("*.example.com", "*.example.com", true),
        ("*.example.com", "*.api.example.com:443", true),
        ("*.api.example.com", "*.example.com", false),
        ("*.example.com:443", "api.example.com", false),
        ("*.example.com", "api.example.org", false),
        ("*.example.com", "badexample.com", false),
    ] {
        let (parent_rule, child_rule) = (&rules(&[parent])[0], &rules(&[child])[0]);
        assert_eq!(
            parent_rule.covers(child_rule),
            covered,
            "{parent} covers {child}"
        );
    }
}

#[test]
fn resolve_entries_map_names_to_addresses() {
    let entries: Vec<String> = [
        "Api.Internal.=10.0.0.5",
        "v6.test=[::1]",
        "plain.test = ::2",
    ]
    .map(String::from)
    .into();
    let resolve = EgressResolve::parse(&entries).expect("valid entries");
    assert_eq!(
        resolve.address("api.internal"),
        Some(IpAddr::from([10, 0, 0, 5]))
    );
    assert_eq!(resolve.address("v6.test"), Some("::1".parse().expect("ip")));
    assert_eq!(
        resolve.address("plain.test"),
        Some("::2".parse().expect("ip"))
    );
    assert_eq!(resolve.address("other.test"), None);
    for (entry, says) in [
        ("api.internal", "NAME=ADDR"),
        ("api.internal=somewhere", "not an IPv4 or IPv6 address"),
        ("10.0.0.1=10.0.0.1", "an address, not a host name"),
        ("*.internal=10.0.0.1", "'*'"),
    ] {
        let error = EgressResolve::parse(&[entry.to_string()]).expect_err(entry);
        assert!(error.contains(says), "{entry}: {error}");
    }
    let twice = ["a.test=10.0.0.1".to_string(), "A.test=10.0.0.2".to_string()];
    let error = EgressResolve::parse(&twice).expect_err("a name twice");
    assert!(error.contains("more than once"), "{error}");
}

#[test]
fn addresses_that_lead_inward_are_refused() {
    for (address, kind) in [
        ("127.0.0.1", Some("loopback")),
        ("127.255.0.9", Some("loopback")),
        ("10.1.2.3", Some("private")),
        ("172.16.0.1", Some("private")),
        ("172.31.255.255", Some("private")),
        ("192.168.1.1", Some("private")),
        ("169.254.169.254", Some("link-local")),
        ("100.64.0.1", Some("CGNAT")),
        ("100.127.255.255", Some("CGNAT")),
        ("0.0.0.0", Some("unspecified")),
        ("255.255.255.255", Some("broadcast")),
        ("224.0.0.1", Some("multicast")),
        ("240.0.0.1", Some("reserved")),
        ("::1", Some("loopback")),
        ("::", Some("unspecified")),
        ("fc00::1", Some("unique local")),
        ("fd12:3456::1", Some("unique local")),
        ("fe80::1", Some("link-local")),
        ("ff02::1", Some("multicast")),
        ("::ffff:127.0.0.1", Some("loopback")),
        ("::ffff:10.0.0.1", Some("private")),
        ("::127.0.0.1", Some("reserved")),
        ("64:ff9b::7f00:1", Some("loopback")),
        ("64:ff9b::a9fe:a9fe", Some("link-local")),
        ("64:ff9b:1::1", Some("reserved")),
        ("2002:7f00:1::1", Some("loopback")),
        ("8.8.8.8", None),
        ("100.63.255.255", None),
        ("100.128.0.1", None),
        ("172.32.0.1", None),
        ("1.1.1.1", None),
        ("2606:4700:4700::1111", None),
        ("::ffff:8.8.8.8", None),
        ("64:ff9b::808:808", None),
    ] {
        let ip: IpAddr = address.parse().expect("an address");
        let found = refusal(ip);
        match kind {
            Some(kind) => assert!(
                found.is_some_and(|found| found.contains(kind)),
                "{address}: {found:?}"
            ),
            None => assert_eq!(found, None, "{address}"),
        }
    }
}
