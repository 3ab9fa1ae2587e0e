//! Who may call what over TCP: bearer tokens with a role each, from `--token-file`. A token is
//! kept only as its SHA-256 digest and compared in constant time; it is never logged. Failed
//! attempts are logged with the peer's address and limited per peer: past the limit a wrong
//! token is refused without a log line, while a valid one still passes. A token file that
//! other users can read is refused. Streams opened with a token or session end once it no
//! longer holds (`revoke.rs`); `grpc_auth.rs` checks gRPC calls with the [`Guard`]. The Unix
//! socket is not checked here: its mode (0600, or 0660 with `--socket-group`) is its guard.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Every read: status, lists, summary, health, events, output, history, metrics.
    Read,
    /// Everything.
    Admin,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }
}

type Digest = [u8; 32];

fn sha256(bytes: &[u8]) -> Digest {
    let mut digest = [0; 32];
    digest.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    digest
}

/// Equal in time that does not depend on where they differ.
fn same(a: &Digest, b: &Digest) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tokens are at least this long, so none can be guessed.
const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Default)]
struct Tokens(Vec<(Digest, Role)>);

impl Tokens {
    /// One token per line, `TOKEN ROLE` or `sha256:HEX ROLE`; blank lines and `#` comments
    /// are skipped. Errors name the line, never the token.
    fn parse(text: &str) -> anyhow::Result<Tokens> {
        let mut tokens = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = || format!("line {}", number + 1);
            let mut words = line.split_whitespace();
            let (Some(token), Some(role), None) = (words.next(), words.next(), words.next()) else {
                bail!("{}: write `TOKEN ROLE` (ROLE is admin or read)", at());
            };
            let role = match role {
                "admin" => Role::Admin,
                "read" => Role::Read,
                _ => bail!("{}: the role must be admin or read", at()),
            };
            let digest = match token.strip_prefix("sha256:") {
                Some(hex) => parse_hex(hex)
                    .with_context(|| format!("{}: `sha256:` takes 64 hexadecimal digits", at()))?,
                None if token.len() < MIN_TOKEN_LEN => {
                    bail!("{}: a token has at least {MIN_TOKEN_LEN} characters", at())
                }
                None => sha256(token.as_bytes()),
            };
            tokens.push((digest, role));
        }
        Ok(Tokens(tokens))
    }

    /// The role of a presented token; every stored token is compared, whatever matches.
    fn role_of(&self, presented: &str) -> Option<Role> {
        let digest = sha256(presented.as_bytes());
        self.role_of_digest(&digest)
    }

    fn role_of_digest(&self, digest: &Digest) -> Option<Role> {
        let mut found = None;
        for (stored, role) in &self.0 {
            if same(stored, digest) {
                found = found.max(Some(*role));
            }
        }
        found
    }
}

fn parse_hex(hex: &str) -> anyhow::Result<Digest> {
    if hex.len() != 64 {
        bail!("not 64 digits");
    }
    let mut digest = [0; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)?;
    }
    Ok(digest)
}

/// Failed attempts a peer may make per window before it is refused without a check.
const FAILURES_ALLOWED: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a dashboard session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

struct Failures {
    since: Instant,
    count: u32,
}

struct Session {
    /// The token it was made from: removing that token from the file ends the session.
    token: Digest,
    expires: Instant,
}

/// The token file, reloaded on SIGHUP, and what it takes to check a request.
pub struct Guard {
    path: PathBuf,
    tokens: RwLock<Arc<Tokens>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
    sessions: Mutex<HashMap<Digest, Session>>,
    /// Cancelled (and replaced) whenever tokens or sessions may have ended: each open stream
    /// then checks that what opened it still holds.
    revoked: RwLock<CancellationToken>,
}

/// What an open stream was authenticated with, so it can be checked again later.
#[derive(Debug, Clone, Copy)]
pub enum Held {
    Token(Digest),
    Session(Digest),
}

impl Guard {
    pub fn load(path: &Path) -> anyhow::Result<Guard> {
        let guard = Guard {
            path: path.to_path_buf(),
            tokens: RwLock::new(Arc::default()),
            failures: Mutex::default(),
            sessions: Mutex::default(),
            revoked: RwLock::default(),
        };
        guard.reload()?;
        Ok(guard)
    }

    /// Reads the token file again; on an error the tokens in use stay. Returns how many
    /// tokens there are now. Streams opened with a token that left end.
    pub fn reload(&self) -> anyhow::Result<usize> {
        use std::os::unix::fs::PermissionsExt;
        let file = std::fs::File::open(&self.path)
            .with_context(|| format!("reading the token file `{}`", self.path.display()))?;
        let mode = file
            .metadata()
            .with_context(|| format!("reading the token file `{}`", self.path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            bail!(
                "the token file `{}` can be read or changed by other users (mode {:03o}): run                  `chmod 600 {}`",
                self.path.display(),
                mode & 0o777,
                self.path.display()
            );
        }
        let text = std::io::read_to_string(file)
            .with_context(|| format!("reading the token file `{}`", self.path.display()))?;
        let tokens = Tokens::parse(&text)
            .with_context(|| format!("in the token file `{}`", self.path.display()))?;
        if tokens.0.is_empty() {
            bail!("the token file `{}` holds no token", self.path.display());
        }
        let count = tokens.0.len();
        *self.tokens.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        self.revoke_streams();
        Ok(count)
    }

    /// Wakes every open stream to check its credential again.
    fn revoke_streams(&self) {
        let fresh = CancellationToken::new();
        let old = std::mem::replace(
            &mut *self.revoked.write().unwrap_or_else(|e| e.into_inner()),
            fresh,
        );
        old.cancel();
    }

    /// Cancelled when the streams opened now should check their credential again: take it
    /// before the check, so that no reload can fall between.
    pub fn revocation(&self) -> CancellationToken {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// What a request that passed `check` holds, for `still_valid` later.
    pub fn held(credential: Credential<'_>) -> Option<Held> {
        match credential {
            Credential::None => None,
            Credential::Bearer(token) => Some(Held::Token(sha256(token.as_bytes()))),
            Credential::Session(id) => Some(Held::Session(sha256(id.as_bytes()))),
        }
    }

    /// Whether the token or session still opens anything.
    pub fn still_valid(&self, held: &Held) -> bool {
        match held {
            Held::Token(digest) => self.tokens().role_of_digest(digest).is_some(),
            Held::Session(id) => self.session_role_of_digest(id).is_some(),
        }
    }

    fn tokens(&self) -> Arc<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Checks a request that needs `needs`, given its `Authorization` value (or session
    /// cookie) and its peer. `what` names the call for PERMISSION_DENIED.
    pub fn check(
        &self,
        credential: Credential<'_>,
        peer: Option<IpAddr>,
        needs: Role,
        what: &str,
    ) -> Result<Role, Status> {
        let role = match credential {
            Credential::None => None,
            Credential::Bearer(token) => self.tokens().role_of(token),
            Credential::Session(id) => self.session_role(id),
        };
        let Some(role) = role else {
            // Past the limit, failures are refused without being counted or logged; a valid
            // token from the same address is never held back by someone else's attempts.
            if let Some(peer) = peer
                && self.over_limit(peer)
            {
                return Err(crate::convert::exhausted(
                    format!(
                        "too many failed authentications from {peer}; try again within {}s",
                        FAILURE_WINDOW.as_secs()
                    ),
                    crate::convert::Exhausted::FailedAuthentications,
                ));
            }
            self.failed(peer, matches!(credential, Credential::None));
            return Err(Status::unauthenticated(match credential {
                Credential::None => "a bearer token is required: `authorization: Bearer TOKEN`",
                _ => "the token is not valid",
            }));
        };
        if role < needs {
            return Err(Status::permission_denied(format!(
                "a {} token may not call {what}",
                role.name()
            )));
        }
        Ok(role)
    }

    fn over_limit(&self, peer: IpAddr) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures
            .get(&peer)
            .is_some_and(|f| f.since.elapsed() < FAILURE_WINDOW && f.count >= FAILURES_ALLOWED)
    }

    /// Counts and logs a failed attempt: the first of each window, and the one that reaches
    /// the limit (so a flood does not flood the log).
    fn failed(&self, peer: Option<IpAddr>, missing: bool) {
        let Some(peer) = peer else { return };
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() > 10_000 {
            failures.retain(|_, f| f.since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(peer).or_insert(Failures {
            since: Instant::now(),
            count: 0,
        });
        if entry.since.elapsed() >= FAILURE_WINDOW {
            *entry = Failures {
                since: Instant::now(),
                count: 0,
            };
        }
        entry.count += 1;
        let why = if missing { "no token" } else { "a wrong token" };
        if entry.count == 1 {
            tracing::warn!(%peer, "refused a request with {why}");
        } else if entry.count == FAILURES_ALLOWED {
            tracing::warn!(
                %peer,
                "{FAILURES_ALLOWED} failed authentications within {}s: refusing this address until the window ends",
                FAILURE_WINDOW.as_secs()
            );
        }
    }

    /// A dashboard session for a valid token: its id goes into an HttpOnly cookie.
    pub fn open_session(&self, token: &str, peer: Option<IpAddr>) -> Result<String, Status> {
        self.check(Credential::Bearer(token), peer, Role::Read, "a session")?;
        let rng = ring::rand::SystemRandom::new();
        let mut id = [0u8; 32];
        ring::rand::SecureRandom::fill(&rng, &mut id)
            .map_err(|_| Status::internal("the system's random source failed"))?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, session| session.expires > Instant::now());
        sessions.insert(
            sha256(id.as_bytes()),
            Session {
                token: sha256(token.as_bytes()),
                expires: Instant::now() + SESSION_LIFETIME,
            },
        );
        Ok(id)
    }

    /// Ends a session (logout): its cookie opens nothing from now on, and its streams end.
    pub fn close_session(&self, id: &str) {
        let removed = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&sha256(id.as_bytes()));
        if removed.is_some() {
            self.revoke_streams();
        }
    }

    fn session_role(&self, id: &str) -> Option<Role> {
        self.session_role_of_digest(&sha256(id.as_bytes()))
    }

    fn session_role_of_digest(&self, id: &Digest) -> Option<Role> {
        let token = {
            let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let session = sessions.get(id)?;
            (session.expires > Instant::now()).then_some(session.token)?
        };
        self.tokens().role_of_digest(&token)
    }

    pub fn session_lifetime() -> Duration {
        SESSION_LIFETIME
    }
}

/// What a request presents.
#[derive(Clone, Copy)]
pub enum Credential<'a> {
    None,
    Bearer(&'a str),
    Session(&'a str),
}

impl<'a> Credential<'a> {
    /// From an `Authorization` header value: `Bearer TOKEN` (the scheme in any case).
    pub fn from_authorization(value: Option<&'a str>) -> Credential<'a> {
        match value.and_then(|v| v.split_once(' ')) {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
                Credential::Bearer(token.trim())
            }
            // Something, but not a bearer token: checked as a wrong token.
            _ if value.is_some() => Credential::Bearer(""),
            _ => Credential::None,
        }
    }
}

/// The role a gRPC method needs; `None` for the health service, which probes call without
/// a token.
pub fn grpc_role(path: &str) -> Option<Role> {
    const READS: [&str; 7] = [
        "Status",
        "ListAgents",
        "GetSummary",
        "CheckHealth",
        "WatchAgents",
        "StreamLogs",
        "GetAgentHistory",
    ];
    if path.starts_with("/grpc.health.v1.Health/") {
        return None;
    }
    if path.starts_with("/grpc.reflection.") {
        return Some(Role::Read);
    }
    match path.strip_prefix("/agentd.v1.AgentSupervisor/") {
        Some(method) if READS.contains(&method) => Some(Role::Read),
        _ => Some(Role::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_with_roles_and_digests_and_name_the_bad_line() {
        let digest: String = sha256(b"a-read-token-0123")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = format!("# ops\nadmin-token-0123456 admin\n\nsha256:{digest} read\n");
        let tokens = Tokens::parse(&text).expect("valid");
        assert_eq!(tokens.role_of("admin-token-0123456"), Some(Role::Admin));
        assert_eq!(tokens.role_of("a-read-token-0123"), Some(Role::Read));
        assert_eq!(tokens.role_of("admin-token-012345"), None);
        assert_eq!(tokens.role_of(""), None);

        for (bad, says) in [
            ("short admin", "line 1: a token has at least 16"),
            ("long-enough-token-1 root", "line 1: the role must be"),
            ("\nlong-enough-token-1", "line 2: write `TOKEN ROLE`"),
            ("sha256:abc read", "line 1: `sha256:` takes 64"),
        ] {
            let error = format!("{:#}", Tokens::parse(bad).expect_err(bad));
            assert!(error.contains(says), "{error}");
            assert!(
                !error.contains("long-enough-token-1"),
                "a token in an error: {error}"
            );
        }
    }

    #[test]
    fn roles_are_checked_and_failures_limited_per_peer() {
        let guard = Guard {
            path: PathBuf::new(),
            tokens: RwLock::new(Arc::new(
                Tokens::parse("reader-token-0123456 read\nadmin-token-0123456 admin").expect("ok"),
            )),
            failures: Mutex::default(),
            sessions: Mutex::default(),
            revoked: RwLock::default(),
        };
        let peer = Some("10.0.0.1".parse().expect("ip"));
        let read = Credential::Bearer("reader-token-0123456");
        assert_eq!(
            guard.check(read, peer, Role::Read, "Status").ok(),
            Some(Role::Read)
        );
        let denied = guard
            .check(read, peer, Role::Admin, "Spawn")
            .expect_err("read");
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        let missing = guard.check(Credential::None, peer, Role::Read, "Status");
        assert_eq!(
            missing.expect_err("none").code(),
            tonic::Code::Unauthenticated
        );
        for _ in 1..FAILURES_ALLOWED {
            let wrong = guard.check(Credential::Bearer("nope"), peer, Role::Read, "Status");
            assert_eq!(
                wrong.expect_err("wrong").code(),
                tonic::Code::Unauthenticated
            );
        }
        // The limit reached, wrong tokens from that peer are refused as too many; a good
        // token still passes, and other peers are not affected.
        let limited = guard
            .check(Credential::Bearer("nope"), peer, Role::Read, "Status")
            .expect_err("limited");
        assert_eq!(limited.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            guard.check(read, peer, Role::Read, "Status").ok(),
            Some(Role::Read)
        );
        let elsewhere = Some("10.0.0.2".parse().expect("ip"));
        assert!(guard.check(read, elsewhere, Role::Read, "Status").is_ok());

        let session = guard
            .open_session("admin-token-0123456", elsewhere)
            .expect("session");
        let by_cookie = guard.check(
            Credential::Session(&session),
            elsewhere,
            Role::Admin,
            "Spawn",
        );
        assert_eq!(by_cookie.ok(), Some(Role::Admin));
        *guard.tokens.write().expect("lock") =
            Arc::new(Tokens::parse("reader-token-0123456 read").expect("ok"));
        let revoked = guard.check(
            Credential::Session(&session),
            elsewhere,
            Role::Read,
            "Status",
        );
        assert_eq!(
            revoked.expect_err("revoked").code(),
            tonic::Code::Unauthenticated
        );

        // Logging out ends a session at once, and wakes the streams to check again.
        let session = guard
            .open_session("reader-token-0123456", elsewhere)
            .expect("session");
        let held = Guard::held(Credential::Session(&session)).expect("held");
        assert!(guard.still_valid(&held));
        let woken = guard.revocation();
        guard.close_session(&session);
        assert!(woken.is_cancelled());
        assert!(!guard.still_valid(&held));
        let closed = guard.check(
            Credential::Session(&session),
            elsewhere,
            Role::Read,
            "Status",
        );
        assert_eq!(
            closed.expect_err("closed").code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn grpc_methods_need_the_right_role() {
        assert_eq!(grpc_role("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            grpc_role("/agentd.v1.AgentSupervisor/WatchAgents"),
            Some(Role::Read)
        );
        assert_eq!(
            grpc_role("/agentd.v1.AgentSupervisor/Spawn"),
            Some(Role::Admin)
        );
        assert_eq!(
            grpc_role("/agentd.v1.AgentSupervisor/Nope"),
            Some(Role::Admin)
        );
        assert_eq!(
            grpc_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(Role::Read)
        );
    }
}
