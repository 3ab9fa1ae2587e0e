//! One client connection, carried out: read the head (30 s, 64 KiB at most), let
//! `request` and the policy decide, then tunnel or forward, counting bytes as they pass.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{Instant, timeout, timeout_at};

use super::address::refusal;
use super::body::BodyReader;
use super::relay::{relay, relay_some, write_all};
use super::request::{self, Host, MAX_HEAD, Malformed, Request, Target};
use super::{Denial, Egress, EgressResolve, MAX_CONNECTIONS};

/// How long a client has to send its whole request head.
const HEAD_DEADLINE: Duration = Duration::from_secs(30);
/// How long resolving a name may take.
const RESOLVE_DEADLINE: Duration = Duration::from_secs(10);
/// How long one connection attempt to an upstream address may take, and all of them.
const CONNECT_ATTEMPT_DEADLINE: Duration = Duration::from_secs(10);
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long writing a refusal may take.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// After a refusal, what the client still sends is read and dropped for this long (at most
/// `LINGER_BYTES`) before closing, so that closing with unread bytes does not reset the
/// connection before the client has read the answer.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;
/// How much of a head is read at a time (the head grows to `MAX_HEAD` at most).
const HEAD_READ: usize = 8 * 1024;

pub(super) const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// What one agent's connections share.
pub(super) struct Proxy {
    pub agent_id: Arc<str>,
    pub egress: Arc<Egress>,
    pub resolve: Arc<EgressResolve>,
    pub denials: UnboundedSender<Denial>,
}

/// Why a request reaches no one.
enum Refusal {
    /// Policy says no: 403, counted as denied and reported.
    Denied {
        host: String,
        port: u16,
        reason: String,
    },
    /// 400; counted and reported as a denial when it named a host.
    Malformed(Malformed),
    /// The name did not resolve, or no address took the connection: 502, not counted.
    Unreachable {
        host: String,
        port: u16,
        problem: String,
    },
    /// No complete head in time: 408.
    SlowHead,
    /// A head longer than `MAX_HEAD`: 431.
    LongHead,
}

/// The answer to a client agentd turns away, with a line of text saying why.
pub(super) fn answer(status: &str, text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{text}\n",
        text.len() + 1
    )
    .into_bytes()
}

/// The answer to a connection beyond `MAX_CONNECTIONS`.
pub(super) fn too_many() -> Vec<u8> {
    answer(
        "503 Service Unavailable",
        &format!("agentd egress: this agent already has {MAX_CONNECTIONS} connections open"),
    )
}

impl Proxy {
    pub async fn serve_connection(&self, mut client: TcpStream) {
        let _ = client.set_nodelay(true);
        let (buf, head_len) = match read_head(&mut client).await {
            Ok(Some(read)) => read,
            Ok(None) => return,
            Err(refusal) => return self.refuse(client, refusal).await,
        };
        let request = match request::parse(&buf[..head_len]) {
            Ok(request) => request,
            Err(malformed) => return self.refuse(client, Refusal::Malformed(malformed)).await,
        };
        let (Request::Connect(target) | Request::Forward { target, .. }) = &request;
        let upstream = match self.reach(target).await {
            Ok(upstream) => upstream,
            Err(refusal) => return self.refuse(client, refusal).await,
        };
        self.egress.allowed.fetch_add(1, Ordering::Relaxed);
        let early = &buf[head_len..];
        let carried = match request {
            Request::Connect(_) => self.tunnel(client, upstream, early).await,
            Request::Forward { head, body, .. } => {
                self.forward(client, upstream, head, BodyReader::new(body), early)
                    .await
            }
        };
        if let Err(error) = carried {
            tracing::debug!(%error, agent_id = %self.agent_id, "egress proxy: a connection ended");
        }
    }

    /// The policy, then a connection to one of the addresses it checked.
    async fn reach(&self, target: &Target) -> Result<TcpStream, Refusal> {
        let port = target.port;
        let name = match &target.host {
            Host::Address(address) => {
                return Err(Refusal::Denied {
                    host: address.clone(),
                    port,
                    reason: "an address: agents reach hosts by name, as allow_hosts names them"
                        .to_string(),
                });
            }
            Host::Name(name) => name,
        };
        let denied = |reason: String| Refusal::Denied {
            host: name.clone(),
            port,
            reason,
        };
        let unreachable = |problem: String| Refusal::Unreachable {
            host: name.clone(),
            port,
            problem,
        };
        if !self.egress.allows(name, port) {
            return Err(denied(format!("no allow_hosts entry allows {name}:{port}")));
        }
        let addresses: Vec<SocketAddr> = match self.resolve.address(name) {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => {
                let found = timeout(
                    RESOLVE_DEADLINE,
                    tokio::net::lookup_host((name.as_str(), port)),
                )
                .await
                .map_err(|_| {
                    unreachable(format!("resolving {name} took over {RESOLVE_DEADLINE:?}"))
                })?
                .map_err(|error| unreachable(format!("resolving {name}: {error}")))?;
                let addresses: Vec<SocketAddr> = found.collect();
                if let Some((ip, kind)) = addresses
                    .iter()
                    .find_map(|address| refusal(address.ip()).map(|kind| (address.ip(), kind)))
                {
                    return Err(denied(format!("{name} resolves to {ip}, a {kind} address")));
                }
                addresses
            }
        };
        if addresses.is_empty() {
            return Err(unreachable(format!("{name} has no address")));
        }
        let mut last_problem = String::new();
        let deadline = Instant::now() + CONNECT_DEADLINE;
        for address in addresses {
            let attempt = timeout(CONNECT_ATTEMPT_DEADLINE, TcpStream::connect(address));
            match timeout_at(deadline, attempt).await {
                Ok(Ok(Ok(upstream))) => {
                    let _ = upstream.set_nodelay(true);
                    return Ok(upstream);
                }
                Ok(Ok(Err(error))) => last_problem = format!("connecting to {address}: {error}"),
                Ok(Err(_)) => {
                    last_problem =
                        format!("connecting to {address} took over {CONNECT_ATTEMPT_DEADLINE:?}")
                }
                Err(_) => {
                    last_problem = format!("connecting took over {CONNECT_DEADLINE:?}");
                    break;
                }
            }
        }
        Err(unreachable(last_problem))
    }

    async fn refuse(&self, mut client: TcpStream, refusal: Refusal) {
        let answer = match refusal {
            Refusal::Denied { host, port, reason } => {
                let text = format!("agentd egress: {host}:{port} is not allowed: {reason}");
                self.deny(host, port, reason);
                answer("403 Forbidden", &text)
            }
            Refusal::Malformed(Malformed { problem, named }) => {
                let text = format!("agentd egress: bad request: {problem}");
                if let Some((host, port)) = named {
                    self.deny(host, port, problem);
                }
                answer("400 Bad Request", &text)
            }
            Refusal::Unreachable {
                host,
                port,
                problem,
            } => answer(
                "502 Bad Gateway",
                &format!("agentd egress: cannot reach {host}:{port}: {problem}"),
            ),
            Refusal::SlowHead => answer(
                "408 Request Timeout",
                &format!("agentd egress: no complete request head within {HEAD_DEADLINE:?}"),
            ),
            Refusal::LongHead => answer(
                "431 Request Header Fields Too Large",
                &format!("agentd egress: the request head is over {MAX_HEAD} bytes"),
            ),
        };
        let answered = timeout(ANSWER_DEADLINE, async {
            client.write_all(&answer).await?;
            client.shutdown().await
        });
        if let Ok(Ok(())) = answered.await {
            let _ = timeout(LINGER, drain(&mut client)).await;
        }
    }

    fn deny(&self, host: String, port: u16, reason: String) {
        self.egress.denied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(agent_id = %self.agent_id, %host, port, %reason, "egress denied");
        // A supervisor that went away no longer needs to hear of it.
        let _ = self.denials.send(Denial {
            agent_id: self.agent_id.clone(),
            host,
            port,
            reason,
        });
    }

    /// `CONNECT`: 200, then bytes both ways until both sides are done.
    async fn tunnel(&self, client: TcpStream, upstream: TcpStream, early: &[u8]) -> io::Result<()> {
        write_all(&client, ESTABLISHED).await?;
        if !early.is_empty() {
            write_all(&upstream, early).await?;
            self.egress
                .bytes_up
                .fetch_add(early.len() as u64, Ordering::Relaxed);
        }
        tokio::try_join!(
            relay(&client, &upstream, &self.egress.bytes_up),
            relay(&upstream, &client, &self.egress.bytes_down),
        )?;
        Ok(())
    }

    /// One `http://` request: the rewritten head and the body it announced go up, the
    /// answer comes down until the upstream server closes.
    async fn forward(
        &self,
        client: TcpStream,
        upstream: TcpStream,
        mut head: Vec<u8>,
        mut body: BodyReader,
        early: &[u8],
    ) -> io::Result<()> {
        let early_body = body.take(early).map_err(io::Error::other)?;
        head.extend_from_slice(&early[..early_body]);
        write_all(&upstream, &head).await?;
        self.egress
            .bytes_up
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        let response = relay(&upstream, &client, &self.egress.bytes_down);
        if body.is_done() {
            return response.await;
        }
        let request = relay_some(&client, &upstream, &self.egress.bytes_up, |piece| {
            let taken = body.take(piece).map_err(io::Error::other)?;
            Ok((taken, body.is_done()))
        });
        tokio::pin!(request, response);
        tokio::select! {
            answered = &mut response => answered,
            sent = &mut request => {
                sent?;
                response.await
            }
        }
    }
}

/// Reads up to the end of the head: the bytes read (perhaps more than the head) and the
/// head's length; `None` if the client closed first.
async fn read_head(client: &mut TcpStream) -> Result<Option<(Vec<u8>, usize)>, Refusal> {
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = Vec::new();
    let mut piece = vec![0; HEAD_READ];
    loop {
        let room = HEAD_READ.min(MAX_HEAD - buf.len());
        if room == 0 {
            return Err(Refusal::LongHead);
        }
        let read = match timeout_at(deadline, client.read(&mut piece[..room])).await {
            Err(_) => return Err(Refusal::SlowHead),
            Ok(Err(_) | Ok(0)) => return Ok(None),
            Ok(Ok(read)) => read,
        };
        let searched = buf.len();
        buf.extend_from_slice(&piece[..read]);
        if let Some(end) = request::head_end(&buf, searched) {
            return Ok(Some((buf, end)));
        }
    }
}

/// Reads and drops what the client still sends, up to `LINGER_BYTES`, until it closes.
async fn drain(client: &mut TcpStream) {
    let mut buf = [0; 4096];
    let mut total = 0;
    while total < LINGER_BYTES {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(read) => total += read,
        }
    }
}
