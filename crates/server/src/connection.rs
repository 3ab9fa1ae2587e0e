//! What one TCP connection may hold, and for how long. A connection takes a place under
//! `--max-connections` and one of its address's places under `--max-connections-per-peer`
//! (so one address cannot take every place), gets `HANDSHAKE_TIMEOUT` for its TLS handshake
//! and `FIRST_REQUEST_TIMEOUT` for its first complete request, and is closed once it has had
//! no request in flight for `--idle-timeout`. A request is in flight until its answer's body
//! ends, so an open event stream (WatchAgents, `/v1/events`, followed output) keeps its
//! connection however quiet it is; HTTP/2 keepalive pings find the peers that vanished.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{Extensions, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tokio_rustls::server::TlsStream;

use crate::tls::{Protocol, Tls};

/// A TLS handshake that takes longer is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection whose first request is not complete by then (after the handshake) is closed,
/// unless `--idle-timeout` is shorter.
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections a listener holds, and how long an idle one stays.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections per listener (`--max-connections`).
    pub max_connections: usize,
    /// Open connections per peer address (`--max-connections-per-peer`).
    pub max_per_peer: usize,
    /// How long a connection with no request in flight stays open (`--idle-timeout`).
    pub idle_timeout: Duration,
}

/// One accepted connection: plain TCP or TLS over it, holding its places until it closes.
pub struct Conn {
    stream: Stream,
    peer: Peer,
    /// Fires at the idle deadline; looked at whenever the server reads.
    idle: Pin<Box<Sleep>>,
    _places: (OwnedSemaphorePermit, PeerPlace),
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Who is at the other end, for every request of a connection (tonic's and axum's connect
/// info): the address checked by `auth` and `origin`, and the activity that keeps the
/// connection open.
#[derive(Debug, Clone)]
pub struct Peer {
    pub remote: SocketAddr,
    pub local: Option<SocketAddr>,
    activity: Arc<Activity>,
}

/// The peer of a request, from tonic's extension or axum's `ConnectInfo`.
pub fn peer_of(extensions: &Extensions) -> Option<&Peer> {
    extensions
        .get::<Peer>()
        .or_else(|| extensions.get::<ConnectInfo<Peer>>().map(|info| &info.0))
}

/// A connection's requests in flight, and since when it has had none.
#[derive(Debug)]
struct Activity {
    quiet: Mutex<Quiet>,
    idle_timeout: Duration,
}

#[derive(Debug)]
struct Quiet {
    in_flight: usize,
    since: Instant,
    /// The first request's deadline until one came, then the idle timeout.
    allowed: Duration,
}

impl Activity {
    /// When the connection is to close if nothing starts before; `None` while a request is
    /// in flight.
    fn deadline(&self) -> Option<Instant> {
        let quiet = self.quiet.lock().unwrap_or_else(|e| e.into_inner());
        (quiet.in_flight == 0).then(|| quiet.since + quiet.allowed)
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.quiet
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_flight += 1;
        Busy(self.clone())
    }
}

/// A request in flight: its connection stays open until this is dropped with the answer's
/// body.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut quiet = self.0.quiet.lock().unwrap_or_else(|e| e.into_inner());
        quiet.in_flight = quiet.in_flight.saturating_sub(1);
        if quiet.in_flight == 0 {
            quiet.since = Instant::now();
            quiet.allowed = self.0.idle_timeout;
        }
    }
}

/// Open connections per peer address.
struct Peers {
    open: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
}

impl Peers {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<PeerPlace> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PeerPlace {
            peers: self.clone(),
            ip,
        })
    }
}

/// One of a peer address's places, given back on drop.
struct PeerPlace {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Drop for PeerPlace {
    fn drop(&mut self) {
        let mut open = self.peers.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Conn {
    pub fn remote(&self) -> SocketAddr {
        self.peer.remote
    }

    /// Whether the idle deadline passed with nothing in flight; else the timer is set to
    /// wake this connection's task at the next deadline.
    fn idle_passed(&mut self, cx: &mut Context<'_>) -> bool {
        while self.idle.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.peer.activity.deadline() {
                Some(deadline) if deadline <= now => return true,
                Some(deadline) => self.idle.as_mut().reset(deadline),
                None => self
                    .idle
                    .as_mut()
                    .reset(now + self.peer.activity.idle_timeout),
            }
        }
        false
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.idle_passed(cx) {
            tracing::debug!(remote = %this.peer.remote, "closing a connection with no request in flight");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no request in flight for the idle timeout (or no first request in time)",
            )));
        }
        match &mut this.stream {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// Accepts on `listener` for ever: each connection within the limits (others are closed at
/// once), through a TLS handshake when `tls` is set, comes out of the channel.
pub fn accept(
    listener: TcpListener,
    tls: Option<(Arc<Tls>, Protocol)>,
    limits: Limits,
) -> mpsc::Receiver<Conn> {
    let (conns, incoming) = mpsc::channel(64);
    let limit = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let peers = Arc::new(Peers {
        open: Mutex::default(),
        max: limits.max_per_peer.max(1),
    });
    tokio::spawn(async move {
        loop {
            // Once the server is gone (shutdown), stop accepting and close the port.
            let accepted = tokio::select! {
                () = conns.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before accept: go on.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::warn!(%remote, "refused a connection: --max-connections reached");
                continue;
            };
            let Some(peer_place) = peers.take(remote.ip()) else {
                tracing::warn!(
                    %remote,
                    "refused a connection: --max-connections-per-peer reached for {}",
                    remote.ip()
                );
                continue;
            };
            let _ = stream.set_nodelay(true);
            let local = stream.local_addr().ok();
            let conns = conns.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let stream = match tls {
                    None => Stream::Plain(stream),
                    Some((tls, protocol)) => {
                        let handshake = tls.acceptor(protocol).accept(stream);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                            Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
                            Ok(Err(error)) => {
                                tracing::debug!(%remote, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                let first = FIRST_REQUEST_TIMEOUT.min(limits.idle_timeout);
                let now = Instant::now();
                let activity = Arc::new(Activity {
                    quiet: Mutex::new(Quiet {
                        in_flight: 0,
                        since: now,
                        allowed: first,
                    }),
                    idle_timeout: limits.idle_timeout,
                });
                let conn = Conn {
                    stream,
                    peer: Peer {
                        remote,
                        local,
                        activity,
                    },
                    idle: Box::pin(tokio::time::sleep_until(now + first)),
                    _places: (permit, peer_place),
                };
                let _ = conns.send(conn).await;
            });
        }
    });
    incoming
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Peer {
        stream.io().peer.clone()
    }
}

/// The accepted connections as axum's listener.
pub struct Incoming {
    pub conns: mpsc::Receiver<Conn>,
    pub local: SocketAddr,
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        match self.conns.recv().await {
            Some(conn) => {
                let remote = conn.remote();
                (conn, remote)
            }
            // The accepting task never ends while the listener is open.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Marks each request in flight on its connection until its answer's body ends.
#[derive(Debug, Clone, Copy)]
pub struct InFlightLayer;

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> InFlight<S> {
        InFlight { inner }
    }
}

#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<Request<B>> for InFlight<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<InFlightBody<R>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let busy = peer_of(request.extensions()).map(|peer| peer.activity.begin());
        let answer = self.inner.call(request);
        Box::pin(async move { Ok(answer.await?.map(|body| InFlightBody { body, _busy: busy })) })
    }
}

/// An answer's body that keeps its request in flight until it ends or is dropped.
pub struct InFlightBody<B> {
    body: B,
    _busy: Option<Busy>,
}

impl<B: http_body::Body + Unpin> http_body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
