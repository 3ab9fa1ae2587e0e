//! The words of egress policy: which host names are names at all, `allow_hosts` entries
//! ([`HostRule`]) and `--egress-resolve` ([`EgressResolve`]).
//!
//! A host is a DNS name whose last label starts with a letter. That one rule keeps out every
//! form of address that `getaddrinfo` would also accept as a name (`127.0.0.1`, `2130706433`,
//! `0x7f.1`, `017700000001`): each part of those is a number, and a number starts with a
//! digit.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// The longest host name DNS carries, in its text form without the trailing dot.
const MAX_NAME: usize = 253;
/// The longest label DNS carries.
const MAX_LABEL: usize = 63;

/// Why a text is not a host name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NameProblem {
    Empty,
    TooLong(usize),
    EmptyLabel,
    LongLabel(usize),
    BadChar(char),
    /// An IP address, or a number `getaddrinfo` reads as one.
    Address,
}

impl fmt::Display for NameProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameProblem::Empty => write!(f, "the host name is empty"),
            NameProblem::TooLong(length) => {
                write!(
                    f,
                    "the host name has {length} characters, at most {MAX_NAME} fit"
                )
            }
            NameProblem::EmptyLabel => {
                write!(
                    f,
                    "the host name has an empty label (two dots in a row, or a leading dot)"
                )
            }
            NameProblem::LongLabel(length) => write!(
                f,
                "a label of the host name has {length} characters, at most {MAX_LABEL} fit"
            ),
            NameProblem::BadChar(c) => write!(
                f,
                "{c:?} cannot be in a host name (letters, digits, `-` and `_`; write \
                 international names in their xn-- form)"
            ),
            NameProblem::Address => write!(f, "it is an address, not a host name"),
        }
    }
}

/// `text` as the host name agentd compares and resolves: lowercase, without its trailing
/// dot; or why it is none.
pub(super) fn host_name(text: &str) -> Result<String, NameProblem> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.starts_with('[') || name.contains(':') {
        return Err(NameProblem::Address);
    }
    check_name(&name)?;
    Ok(name)
}

/// Whether a lowercase `name` without a trailing dot is a host name.
fn check_name(name: &str) -> Result<(), NameProblem> {
    if name.is_empty() {
        return Err(NameProblem::Empty);
    }
    if let Some(c) = name
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '-' | '_' | '.'))
    {
        return Err(NameProblem::BadChar(c));
    }
    if name.len() > MAX_NAME {
        return Err(NameProblem::TooLong(name.len()));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(NameProblem::EmptyLabel);
        }
        if label.len() > MAX_LABEL {
            return Err(NameProblem::LongLabel(label.len()));
        }
    }
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(NameProblem::Address);
    }
    Ok(())
}

/// Whether `host` is a strict subdomain of `name` (`a.b.example.com` of `example.com`).
fn is_under(host: &str, name: &str) -> bool {
    host.len() > name.len() + 1
        && host.ends_with(name)
        && host.as_bytes()[host.len() - name.len() - 1] == b'.'
}

/// One entry of `allow_hosts`: `example.com`, or `*.example.com` (any subdomain, not the
/// apex), each with an optional `:PORT` (without one, any port). Stored and sent as its text.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostRule {
    /// The host itself, or for `*.NAME` the name every allowed host ends with.
    name: String,
    /// `*.NAME`: the hosts under `name`, never `name` itself.
    subdomains: bool,
    /// The one port allowed; `None` allows every port.
    port: Option<u16>,
}

impl HostRule {
    /// Reads one entry as a person wrote it (case and a trailing dot do not matter).
    pub fn parse(text: &str) -> Result<HostRule, String> {
        let entry = text.trim();
        let problem = |why: &dyn fmt::Display| format!("allow_hosts entry `{entry}`: {why}");
        if entry.is_empty() {
            return Err(
                "an allow_hosts entry is empty: name a host, such as `example.com` or \
                        `*.example.com:443`"
                    .to_string(),
            );
        }
        let lower = entry.to_ascii_lowercase();
        if lower.starts_with('[') || lower.matches(':').count() > 1 {
            return Err(problem(&"allow_hosts names hosts, not addresses"));
        }
        let (host, port) = match lower.rsplit_once(':') {
            Some((host, port)) => (host, Some(parse_port(port).map_err(|why| problem(&why))?)),
            None => (lower.as_str(), None),
        };
        if host == "*" {
            return Err(problem(
                &"`*` alone would allow every host: name the hosts, or `*.example.com` for \
                  the subdomains of one",
            ));
        }
        let (subdomains, name) = match host.strip_prefix("*.") {
            Some(name) => (true, name),
            None => (false, host),
        };
        if name.contains('*') {
            return Err(problem(
                &"a wildcard is only `*.` at the start, as in `*.example.com`",
            ));
        }
        let name = name.strip_suffix('.').unwrap_or(name);
        match check_name(name) {
            Ok(()) => {}
            Err(NameProblem::Address) => {
                return Err(problem(&"allow_hosts names hosts, not addresses"));
            }
            Err(why) => return Err(problem(&why)),
        }
        if subdomains && name.len() + 2 > MAX_NAME {
            return Err(problem(&NameProblem::TooLong(name.len() + 2)));
        }
        Ok(HostRule {
            name: name.to_string(),
            subdomains,
            port,
        })
    }

    /// Whether this entry lets an agent reach `host` (lowercase, no trailing dot) on `port`.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|only| only != port) {
            return false;
        }
        if self.subdomains {
            is_under(host, &self.name)
        } else {
            host == self.name
        }
    }

    /// Whether every host and port `other` allows, this entry allows too: a child agent's
    /// entries must each be covered by one of its parent's.
    pub fn covers(&self, other: &HostRule) -> bool {
        let ports = match (self.port, other.port) {
            (None, _) => true,
            (Some(mine), Some(theirs)) => mine == theirs,
            (Some(_), None) => false,
        };
        let hosts = match (self.subdomains, other.subdomains) {
            (false, false) => self.name == other.name,
            (false, true) => false,
            (true, false) => is_under(&other.name, &self.name),
            (true, true) => other.name == self.name || is_under(&other.name, &self.name),
        };
        ports && hosts
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    let out_of_range = || format!("port `{text}` is not a number from 1 to 65535");
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(out_of_range());
    }
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        _ => Err(out_of_range()),
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.subdomains {
            f.write_str("*.")?;
        }
        f.write_str(&self.name)?;
        match self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl TryFrom<String> for HostRule {
    type Error = String;

    fn try_from(text: String) -> Result<HostRule, String> {
        HostRule::parse(&text)
    }
}

impl From<HostRule> for String {
    fn from(rule: HostRule) -> String {
        rule.to_string()
    }
}

/// `agentd --egress-resolve NAME=ADDR` (repeatable): the proxy answers NAME with ADDR
/// without asking DNS, and ADDR may be loopback or private (a service on the host, a test
/// server). Agents still reach NAME only where their `allow_hosts` allow it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressResolve {
    addresses: BTreeMap<String, IpAddr>,
}

impl EgressResolve {
    pub fn parse(entries: &[String]) -> Result<EgressResolve, String> {
        let mut addresses = BTreeMap::new();
        for entry in entries {
            let problem = |why: &dyn fmt::Display| format!("--egress-resolve `{entry}`: {why}");
            let Some((name, address)) = entry.split_once('=') else {
                return Err(problem(
                    &"expected NAME=ADDR, such as `api.internal=10.0.0.5`",
                ));
            };
            let name = host_name(name.trim()).map_err(|why| problem(&why))?;
            let address = address.trim();
            let bare = address
                .strip_prefix('[')
                .and_then(|inner| inner.strip_suffix(']'))
                .unwrap_or(address);
            let address: IpAddr = bare.parse().map_err(|_| {
                problem(&format_args!("`{address}` is not an IPv4 or IPv6 address"))
            })?;
            if addresses.insert(name.clone(), address).is_some() {
                return Err(format!("--egress-resolve names `{name}` more than once"));
            }
        }
        Ok(EgressResolve { addresses })
    }

    /// The address `name` (lowercase, no trailing dot) is mapped to, if it is.
    pub fn address(&self, name: &str) -> Option<IpAddr> {
        self.addresses.get(name).copied()
    }
}
