//! Which addresses an agent may never reach by name: those that lead back into the host, its
//! private networks or nowhere in particular. IPv6 forms that carry an IPv4 address
//! (IPv4-mapped, NAT64, 6to4) are judged by the address they carry.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What kind of address `ip` is, when agents may not reach it ("loopback", "private"...).
pub(super) fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) => refusal_v4(ip),
        IpAddr::V6(ip) => refusal_v6(ip),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let kind = match (a, b, c) {
        (0, _, _) => "unspecified (0.0.0.0/8)",
        (10, _, _) => "private (10.0.0.0/8)",
        (100, 64..=127, _) => "shared (CGNAT, 100.64.0.0/10)",
        (127, _, _) => "loopback",
        (169, 254, _) => "link-local",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 0, 0) => "reserved (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (192, 168, _) => "private (192.168.0.0/16)",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (255, 255, 255) if ip == Ipv4Addr::BROADCAST => "broadcast",
        (240..=255, _, _) => "reserved (240.0.0.0/4)",
        _ => return None,
    };
    Some(kind)
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    let embedded = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // ::ffff:a.b.c.d, IPv4-mapped: a dual-stack socket reaches a.b.c.d itself.
    if s[..5] == [0; 5] && s[5] == 0xffff {
        return refusal_v4(embedded(s[6], s[7]));
    }
    // 64:ff9b::a.b.c.d, NAT64: the translator reaches a.b.c.d.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return refusal_v4(embedded(s[6], s[7]));
    }
    // 2002:aabb:ccdd::/48, 6to4: a relay reaches a.b.c.d.
    if s[0] == 0x2002 {
        return refusal_v4(embedded(s[1], s[2]));
    }
    let kind = match s[0] {
        // ::/8 holds the IPv4-compatible (::a.b.c.d) and translated forms, and local-use
        // NAT64 (64:ff9b:1::/48), whose IPv4 address may sit anywhere; none is for agents.
        0x0000..=0x00ff => "reserved (::/8)",
        0x0100 if s[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        0x2001 if s[1] == 0x0db8 => "documentation",
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local",
        0xfec0..=0xfeff => "site-local (fec0::/10)",
        0xff00..=0xffff => "multicast",
        _ => return None,
    };
    Some(kind)
}
