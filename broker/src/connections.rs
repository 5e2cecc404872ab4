//! Admission of connections: the broker's own accept loop in front of
//! the HTTP/2 server ([`serving`](crate::serving)), so that connections which never speak cannot exhaust it.
//!
//! - **File descriptors.** [`raise_fd_limit`] lifts the soft
//!   `RLIMIT_NOFILE` to the hard limit at start (systemd's default soft
//!   limit is 1,024); [`ConnectionLimits::for_fd_limit`] sizes the
//!   connection cap from it, keeping [`RESERVED_FDS`] for everything else.
//! - **A cap.** At most `max_connections` connections are open. A new one
//!   beyond the cap first evicts the oldest connection still in its
//!   handshake (a legitimate client finishes it in milliseconds, so those
//!   are the idle ones); if every open connection has finished it, the new
//!   one is closed at once.
//! - **A handshake deadline.** A connection must finish TLS (when on) and
//!   send the HTTP/2 client preface within `handshake_timeout` (over TLS,
//!   twice over: see the next point), or it is closed. Only then is it
//!   handed to the HTTP/2 server; the preface bytes read to check it are replayed to
//!   hyper.
//! - **TLS handshakes take turns.** At most `max_handshakes` TLS
//!   handshakes are in progress; a connection whose ClientHello has arrived
//!   (read by rustls' `Acceptor`, which costs no cryptography) waits for a
//!   turn, first come first served, and keeps it until TLS is done. In a
//!   reconnect storm thousands of handshakes otherwise all progress
//!   together, each slower than the deadline allows, and the broker closes
//!   them with their work done and their agents backing off (2,398 to
//!   6,678 attempts in three 10,000-agent storms, which took 20.8 to
//!   34.4 s; README "Over TLS"). In turns they finish in order at the rate
//!   the cores allow: none closed, 16.7 to 19.5 s in six storms on the
//!   same loaded machine.
//!
//!   The deadline is therefore split. Accept to ClientHello: within
//!   `handshake_timeout`, so that a connection that never speaks is closed
//!   as before and never takes a turn. Waiting for a turn: no deadline,
//!   because the client has spoken and is waiting on the broker, not the
//!   other way round; a deadline here would close, in a storm, exactly the
//!   connections the broker was about to serve. The wait is bounded by the
//!   connection cap (a waiting connection is still "handshaking": at the
//!   cap the oldest is evicted like any other) and costs a socket, a task
//!   and the ClientHello buffer. A client that gave up while waiting costs
//!   one server flight when its turn comes, which its reset then ends. Admission to preface: `handshake_timeout` again, so that a
//!   client that stalls mid-handshake gives its turn up at that deadline;
//!   `max_handshakes` such clients could hold every turn for one deadline
//!   at a time, which is what a larger limit makes expensive.
//!   [`ConnectionLimits::default_max_handshakes`] says how the default was
//!   chosen.
//! - **Back-off on exhaustion.** `accept` failing with `EMFILE`, `ENFILE`,
//!   `ENOBUFS` or `ENOMEM` evicts the oldest pending connection and sleeps
//!   (10 ms doubling to 1 s) instead of spinning; a warning says so.
//!
//! Each admitted [`Connection`] carries a [`ConnectionInfo`] that the server
//! puts in every request's extensions: an id and the connection's own bucket for
//! the per-connection call limit (see [`rate_limit`](crate::rate_limit)).

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::rustls::server::Acceptor;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::rate_limit::{Bucket, CallRate};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 GOAWAY frame (RFC 9113 §6.8): length 8, type 7, no flags,
/// stream 0; last stream 0, error PROTOCOL_ERROR (1).
const GOAWAY_PROTOCOL_ERROR: [u8; 17] = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// File descriptors kept for what is not a connection (the listener, the
/// metrics endpoint, the key file, log files, the runtime).
pub const RESERVED_FDS: u64 = 64;

/// Idle time before the kernel probes a silent connection.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Time between probes.
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is dropped.
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// The listen backlog asked of the kernel (it caps it at
/// `net.core.somaxconn`, 4,096 by default). tokio binds with 1,024; a
/// broker restarted under 10,000 agents overflowed that (the kernel's
/// `ListenOverflows` counted 6,833 in one storm), and every dropped SYN
/// costs its agent a 1 s, then 3 s, retransmission.
const LISTEN_BACKLOG: i32 = 4096;

/// Encrypted bytes rustls may hold for one connection beyond what the
/// socket took: one full TLS record. rustls' default (64 KiB) would let an
/// agent that stops reading pin 64 KiB in the broker; with this, a full
/// socket pushes back on HTTP/2 as it does in plaintext, and h2's flow
/// control bounds the rest.
const TLS_SEND_BUFFER_LIMIT: usize = 16 * 1024;

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Exhaustion is warned about at most this often.
const EXHAUSTION_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// How many connections, and how long a handshake may take.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionLimits {
    /// Connections open at most (handshaking or established).
    pub max_connections: usize,
    /// Time allowed for the ClientHello (TLS) or the HTTP/2 preface
    /// (plaintext) to arrive, and again, once a TLS handshake is admitted,
    /// for the rest of TLS and the preface.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at most; more wait, in the order their
    /// ClientHello arrived (see the module documentation).
    pub max_handshakes: usize,
    /// New calls per connection.
    pub call_rate: CallRate,
}

impl ConnectionLimits {
    /// The default handshake deadline.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

    /// Default TLS handshakes in progress per core (see
    /// [`default_max_handshakes`](Self::default_max_handshakes)).
    pub const HANDSHAKES_PER_CORE: usize = 64;

    /// The default limit of TLS handshakes in progress:
    /// [`HANDSHAKES_PER_CORE`](Self::HANDSHAKES_PER_CORE) per core the
    /// process may run on.
    ///
    /// A turn lasts from the broker's answer to the ClientHello until the
    /// client's Finished: one round trip plus the client's own work. A full
    /// handshake costs the broker about 0.5 ms of CPU (0.12 ms of it
    /// cryptography), so a core serves about 2,000 a second, and keeping it
    /// busy over a 30 ms round trip takes about 60 turns per core. Smaller
    /// limits only help on loopback: in the 10,000-agent storm (README
    /// "Over TLS") 32, 128 and 1,024 on 2 cores converged in 16.9, 16.7 and
    /// 17.6 s (without a limit: 20.8–34.4 s, with 2,400–6,700 handshakes
    /// closed at the deadline); 1,024 made each handshake slower (median
    /// open 9.0 s against 5.8–6.1 s) because more share the cores at once.
    pub fn default_max_handshakes() -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_mul(Self::HANDSHAKES_PER_CORE)
    }

    /// The default cap for a soft file descriptor limit of `fd_limit`:
    /// all but [`RESERVED_FDS`] of it, and at least 16.
    pub fn default_max_connections(fd_limit: u64) -> usize {
        usize::try_from(fd_limit.saturating_sub(RESERVED_FDS).max(16)).unwrap_or(usize::MAX)
    }

    /// Defaults for a process whose soft descriptor limit is `fd_limit`.
    pub fn for_fd_limit(fd_limit: u64) -> Self {
        Self {
            max_connections: Self::default_max_connections(fd_limit),
            handshake_timeout: Self::HANDSHAKE_TIMEOUT,
            max_handshakes: Self::default_max_handshakes(),
            call_rate: CallRate::CONNECTION,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self::for_fd_limit(fd_limit())
    }
}

/// The soft `RLIMIT_NOFILE` (1,024 if it cannot be read).
pub fn fd_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limit
/// before and after.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if soft < hard {
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard)?;
    }
    Ok((soft, fd_limit()))
}

/// What the server puts in each request's extensions about its connection.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// Unique within this broker process.
    pub id: u64,
    /// The peer's address.
    pub peer: Option<SocketAddr>,
    /// The connection's bucket of new calls.
    pub(crate) calls: Arc<Mutex<Bucket>>,
}

impl ConnectionInfo {
    fn new(id: u64, peer: Option<SocketAddr>, rate: CallRate) -> Self {
        Self {
            id,
            peer,
            calls: Arc::new(Mutex::new(Bucket::full(rate, tokio::time::Instant::now()))),
        }
    }

    #[cfg(test)]
    pub(crate) fn for_tests(id: u64) -> Self {
        Self::new(
            id,
            None,
            crate::rate_limit::CallRate {
                per_second: 1.0,
                burst: 2.0,
            },
        )
    }
}

/// Counts of what the accept loop did, for logs and tests.
#[derive(Debug, Default)]
pub struct AdmissionCounts {
    /// Connections refused at once because the cap was reached.
    pub refused: AtomicU64,
    /// Handshaking connections closed to make room.
    pub evicted: AtomicU64,
    /// Connections closed for missing the handshake deadline.
    pub timed_out: AtomicU64,
    /// TLS handshakes that had to wait for admission.
    pub handshakes_queued: AtomicU64,
    /// Now: TLS connections whose ClientHello arrived, waiting for
    /// admission.
    pub handshakes_waiting: AtomicUsize,
    /// Now: TLS handshakes admitted and not yet finished (at most
    /// `max_handshakes`).
    pub handshakes_in_progress: AtomicUsize,
}

/// Counts one in a gauge while it lives.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(gauge: &'a AtomicUsize) -> Self {
        gauge.fetch_add(1, Ordering::AcqRel);
        Self(gauge)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug)]
struct Registry {
    limit: usize,
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Connections still handshaking, oldest first, with the sender that
    /// closes each.
    pending: Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
    /// Permits for TLS handshakes in progress (`max_handshakes`); tokio's
    /// semaphore hands them out first come, first served.
    handshakes: Semaphore,
    counts: Arc<AdmissionCounts>,
}

impl Registry {
    fn evict_oldest_pending(&self) -> bool {
        let oldest = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_first();
        match oldest {
            Some((_, close)) => {
                let _ = close.send(());
                self.counts.evicted.fetch_add(1, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    fn admit(self: &Arc<Self>) -> Option<Slot> {
        if self.open.load(Ordering::Acquire) >= self.limit && !self.evict_oldest_pending() {
            let refused = self.counts.refused.fetch_add(1, Ordering::Relaxed) + 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    max_connections = self.limit,
                    refused,
                    "connection cap reached: refusing new connections (raise --max-connections or the file descriptor limit)"
                );
            }
            return None;
        }
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Slot(self.clone()))
    }
}

/// One open connection's place under the cap.
#[derive(Debug)]
struct Slot(Arc<Registry>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection that finished its handshake, as the server serves it.
pub struct Connection {
    io: Io,
    /// The preface bytes read to check it, replayed before the rest.
    replay: usize,
    info: ConnectionInfo,
    _slot: Slot,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.info.id)
            .field("peer", &self.info.peer)
            .field("tls", &matches!(self.io, Io::Tls(_)))
            .finish()
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

macro_rules! io_call {
    ($self:ident, $io:ident => $call:expr) => {
        match &mut $self.get_mut().io {
            Io::Plain($io) => {
                let $io = Pin::new($io);
                $call
            }
            Io::Tls($io) => {
                let $io = Pin::new($io.as_mut());
                $call
            }
        }
    };
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay < PREFACE.len() {
            let rest = &PREFACE[self.replay..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            self.replay += n;
            return Poll::Ready(Ok(()));
        }
        io_call!(self, io => io.poll_read(cx, buf))
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        io_call!(self, io => io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        io_call!(self, io => io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(io) => io.is_write_vectored(),
            Io::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        io_call!(self, io => io.poll_shutdown(cx))
    }
}

/// The accept loop's output for the server, and the loop itself.
#[derive(Debug)]
pub struct Incoming {
    /// Admitted connections, for [`serving::serve`](crate::serving::serve).
    pub connections: ReceiverStream<io::Result<Connection>>,
    /// The accept loop: abort it to stop accepting (the listener closes).
    pub accept_loop: JoinHandle<()>,
    /// What the loop refused, evicted and timed out.
    pub counts: Arc<AdmissionCounts>,
}

/// Starts accepting on `listener` under `limits`, with TLS when `tls` is
/// set.
pub fn incoming(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
) -> Incoming {
    let counts = Arc::new(AdmissionCounts::default());
    let registry = Arc::new(Registry {
        limit: limits.max_connections.max(1),
        open: AtomicUsize::new(0),
        next_id: AtomicU64::new(1),
        pending: Mutex::new(BTreeMap::new()),
        handshakes: Semaphore::new(limits.max_handshakes.clamp(1, Semaphore::MAX_PERMITS)),
        counts: counts.clone(),
    });
    // Room for every connection a burst of handshakes may finish while
    // the server is busy; a full channel only delays the handshake tasks.
    let (tx, rx) = mpsc::channel(1024);
    if let Err(error) = socket2::SockRef::from(&listener).listen(LISTEN_BACKLOG) {
        tracing::debug!(%error, "cannot raise the listen backlog");
    }
    // Unconstrained: the loop accepts until the kernel's queue is empty
    // instead of yielding to the runtime after tokio's cooperative budget,
    // which in a reconnect storm put it behind thousands of runnable
    // handshake and connection tasks while the queue overflowed. Each
    // accept only admits, configures and spawns, so a full queue of 4,096
    // costs the worker a few milliseconds.
    let accept_loop = tokio::spawn(tokio::task::unconstrained(accept_loop(
        listener, tls, limits, registry, tx,
    )));
    Incoming {
        connections: ReceiverStream::new(rx),
        accept_loop,
        counts,
    }
}

fn is_resource_exhaustion(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ConnectionLimits,
    registry: Arc<Registry>,
    tx: mpsc::Sender<io::Result<Connection>>,
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut last_warned: Option<std::time::Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(error) if is_resource_exhaustion(&error) => {
                if last_warned.is_none_or(|at| at.elapsed() >= EXHAUSTION_WARN_INTERVAL) {
                    last_warned = Some(std::time::Instant::now());
                    tracing::warn!(%error, fd_limit = fd_limit(),
                        "cannot accept connections: out of file descriptors or memory; closing handshaking connections and backing off");
                }
                registry.evict_oldest_pending();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
            // A connection that failed between the kernel's accept and
            // ours (ECONNABORTED, ...): nothing to do for the next one.
            Err(error) => {
                tracing::debug!(%error, "accept failed");
                continue;
            }
        };
        if tx.is_closed() {
            return;
        }
        let Some(slot) = registry.admit() else {
            drop(stream);
            continue;
        };
        configure_socket(&stream);
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        registry
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, close);
        let info = ConnectionInfo::new(id, Some(peer), limits.call_rate);
        tokio::spawn(handshake(
            stream,
            tls.clone(),
            info,
            slot,
            closed,
            limits.handshake_timeout,
            tx.clone(),
        ));
    }
}

fn configure_socket(stream: &TcpStream) {
    // Dead peers are found by the kernel's TCP keepalive (30 s idle, then
    // 3 probes 10 s apart) rather than HTTP/2 PINGs: a PING timer is one
    // more thing to poll on every wake-up of every connection, and with
    // thousands of mostly idle agent connections that showed in profiles.
    // Agents still send their own HTTP/2 PINGs.
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Why a handshake did not produce a connection.
enum Failed {
    /// A deadline passed (see the module documentation for which).
    Deadline,
    Io(io::Error),
}

impl From<io::Error> for Failed {
    fn from(error: io::Error) -> Self {
        Self::Io(error)
    }
}

async fn within<T>(
    deadline: Instant,
    work: impl Future<Output = io::Result<T>>,
) -> Result<T, Failed> {
    match tokio::time::timeout_at(deadline, work).await {
        Ok(done) => Ok(done?),
        Err(_) => Err(Failed::Deadline),
    }
}

/// TLS: the ClientHello within `deadline` of the accept; then a turn among
/// the `max_handshakes` (no deadline while waiting: the client has spoken
/// and waits on the broker); then the rest of TLS and the HTTP/2 preface
/// within `deadline` of the admission. The permit is returned as soon as
/// TLS is done, before the preface.
async fn tls_handshake(
    stream: TcpStream,
    acceptor: &TlsAcceptor,
    registry: &Registry,
    deadline: Duration,
) -> Result<Io, Failed> {
    let hello = within(
        Instant::now() + deadline,
        LazyConfigAcceptor::new(Acceptor::default(), stream),
    )
    .await?;
    let permit = {
        let _waiting = Gauge::up(&registry.counts.handshakes_waiting);
        match registry.handshakes.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                registry
                    .counts
                    .handshakes_queued
                    .fetch_add(1, Ordering::Relaxed);
                registry
                    .handshakes
                    .acquire()
                    .await
                    .map_err(|_| io::Error::other("the broker is stopping"))?
            }
        }
    };
    let admitted = Instant::now() + deadline;
    let in_progress = Gauge::up(&registry.counts.handshakes_in_progress);
    let mut tls = within(
        admitted,
        hello.into_stream_with(acceptor.config().clone(), |tls| {
            tls.set_buffer_limit(Some(TLS_SEND_BUFFER_LIMIT));
        }),
    )
    .await?;
    drop(in_progress);
    drop(permit);
    let mut preface = [0u8; PREFACE.len()];
    within(admitted, tls.read_exact(&mut preface)).await?;
    check_preface(&preface)?;
    Ok(Io::Tls(Box::new(tls)))
}

/// Plaintext: the HTTP/2 preface within `deadline` of the accept.
async fn plain_handshake(mut stream: TcpStream, deadline: Duration) -> Result<Io, Failed> {
    let mut preface = [0u8; PREFACE.len()];
    within(Instant::now() + deadline, stream.read_exact(&mut preface)).await?;
    if let Err(error) = check_preface(&preface) {
        // Answer as an HTTP/2 server does, so that a TLS client reaching
        // this plaintext port reads a non-TLS record and can say "use
        // http://" instead of "connection reset".
        use tokio::io::AsyncWriteExt;
        let _ = stream.write_all(&GOAWAY_PROTOCOL_ERROR).await;
        return Err(error.into());
    }
    Ok(Io::Plain(stream))
}

fn check_preface(preface: &[u8; PREFACE.len()]) -> io::Result<()> {
    if preface == PREFACE {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 client preface (the broker speaks gRPC over HTTP/2 only)",
        ))
    }
}

async fn handshake(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    info: ConnectionInfo,
    slot: Slot,
    closed: oneshot::Receiver<()>,
    deadline: Duration,
    tx: mpsc::Sender<io::Result<Connection>>,
) {
    let registry = slot.0.clone();
    let id = info.id;
    let work = async {
        match &tls {
            Some(acceptor) => tls_handshake(stream, acceptor, &registry, deadline).await,
            None => plain_handshake(stream, deadline).await,
        }
    };
    let outcome = tokio::select! {
        done = work => Some(done),
        _ = closed => None,
    };
    registry
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    match outcome {
        Some(Ok(io)) => {
            let connection = Connection {
                io,
                replay: 0,
                info,
                _slot: slot,
            };
            let _ = tx.send(Ok(connection)).await;
        }
        Some(Err(Failed::Io(error))) => {
            tracing::debug!(connection = id, peer = ?info.peer, %error, "connection closed during its handshake");
        }
        Some(Err(Failed::Deadline)) => {
            registry.counts.timed_out.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(connection = id, peer = ?info.peer, ?deadline,
                "connection closed: no TLS handshake and HTTP/2 preface within the deadline");
        }
        None => {
            tracing::debug!(connection = id, peer = ?info.peer, "handshaking connection closed to make room for a new one");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;
    use tokio_rustls::rustls;

    use crate::test_pki::{Pki, pki};

    use super::*;

    async fn pair(limits: ConnectionLimits) -> (SocketAddr, Incoming) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, incoming(listener, None, limits))
    }

    fn limits(max: usize, handshake: Duration) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            handshake_timeout: handshake,
            max_handshakes: 64,
            call_rate: CallRate::CONNECTION,
        }
    }

    async fn closed_by_peer(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(20), stream.read(&mut byte)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn a_connection_is_handed_over_with_its_preface_replayed() {
        let (addr, mut incoming) = pair(limits(4, Duration::from_secs(5))).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        client.write_all(b"rest").await.unwrap();
        let mut connection = tokio_stream::StreamExt::next(&mut incoming.connections)
            .await
            .unwrap()
            .unwrap();
        let mut read = vec![0u8; PREFACE.len() + 4];
        connection.read_exact(&mut read).await.unwrap();
        assert_eq!(&read[..PREFACE.len()], PREFACE);
        assert_eq!(&read[PREFACE.len()..], b"rest");
    }

    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_deadline() {
        let (addr, incoming) = pair(limits(4, Duration::from_millis(200))).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_peer(&mut silent).await);
        assert_eq!(incoming.counts.timed_out.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn at_the_cap_the_oldest_handshaking_connection_makes_room() {
        let (addr, mut incoming) = pair(limits(2, Duration::from_secs(60))).await;
        let mut idle_one = TcpStream::connect(addr).await.unwrap();
        let _idle_two = TcpStream::connect(addr).await.unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(PREFACE).await.unwrap();
        // The oldest idle connection is closed and the speaking one served.
        assert!(closed_by_peer(&mut idle_one).await);
        let served = tokio_stream::StreamExt::next(&mut incoming.connections)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(served.info.id, 3);
        assert_eq!(incoming.counts.evicted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn at_the_cap_of_established_connections_new_ones_are_refused_at_once() {
        let (addr, mut incoming) = pair(limits(1, Duration::from_secs(60))).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(PREFACE).await.unwrap();
        let _held = tokio_stream::StreamExt::next(&mut incoming.connections)
            .await
            .unwrap()
            .unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_peer(&mut second).await);
        assert_eq!(incoming.counts.refused.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn what_is_not_http2_is_closed() {
        let (addr, incoming) = pair(limits(4, Duration::from_secs(60))).await;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let _ =
            tokio::time::timeout(Duration::from_secs(20), client.read_to_end(&mut answer)).await;
        assert_eq!(answer, GOAWAY_PROTOCOL_ERROR, "a GOAWAY, then the close");
        assert_eq!(incoming.counts.timed_out.load(Ordering::Relaxed), 0);
    }

    /// A TLS client driven step by step: its ClientHello first, the rest
    /// of the handshake (and the HTTP/2 preface) only when told.
    struct StepClient {
        tcp: TcpStream,
        tls: rustls::ClientConnection,
    }

    impl StepClient {
        async fn hello(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Self {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let mut client = Self {
                tcp: TcpStream::connect(addr).await.unwrap(),
                tls: rustls::ClientConnection::new(config.clone(), name).unwrap(),
            };
            client.send().await.unwrap();
            client
        }

        async fn send(&mut self) -> io::Result<()> {
            let mut out = Vec::new();
            while self.tls.wants_write() {
                self.tls.write_tls(&mut out)?;
            }
            self.tcp.write_all(&out).await
        }

        /// Completes the handshake and sends the preface (panics after
        /// 20 s).
        async fn finish(&mut self) -> io::Result<()> {
            tokio::time::timeout(Duration::from_secs(20), self.finish_handshake())
                .await
                .expect("the handshake completes in time")
        }

        async fn finish_handshake(&mut self) -> io::Result<()> {
            while self.tls.is_handshaking() {
                let mut buf = [0u8; 16 * 1024];
                let n = self.tcp.read(&mut buf).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    self.tls.read_tls(&mut rest)?;
                    self.tls.process_new_packets().map_err(io::Error::other)?;
                }
                self.send().await?;
            }
            std::io::Write::write_all(&mut self.tls.writer(), PREFACE)?;
            self.send().await
        }
    }

    async fn tls_pair(limits: ConnectionLimits, pki: &Pki) -> (SocketAddr, Incoming) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, incoming(listener, Some(pki.acceptor.clone()), limits))
    }

    /// Polls `done` until it holds (panics after 20 s).
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn next(incoming: &mut Incoming) -> Connection {
        tokio::time::timeout(
            Duration::from_secs(20),
            tokio_stream::StreamExt::next(&mut incoming.connections),
        )
        .await
        .expect("a connection in time")
        .unwrap()
        .unwrap()
    }

    #[tokio::test]
    async fn a_tls_handshake_beyond_the_limit_waits_for_its_turn() {
        let pki = pki();
        let mut one_at_a_time = limits(4, Duration::from_secs(60));
        one_at_a_time.max_handshakes = 1;
        let (addr, mut incoming) = tls_pair(one_at_a_time, &pki).await;
        let counts = incoming.counts.clone();
        let mut first = StepClient::hello(addr, &pki.client).await;
        until("the first handshake is admitted", || {
            counts.handshakes_in_progress.load(Ordering::Acquire) == 1
        })
        .await;
        let mut second = StepClient::hello(addr, &pki.client).await;
        until("the second ClientHello waits", || {
            counts.handshakes_waiting.load(Ordering::Acquire) == 1
        })
        .await;
        // Not started: the broker has sent the second client nothing.
        let mut byte = [0u8; 1];
        assert_eq!(
            second.tcp.try_read(&mut byte).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(counts.handshakes_in_progress.load(Ordering::Acquire), 1);

        first.finish().await.unwrap();
        assert_eq!(next(&mut incoming).await.info.id, 1);
        second.finish().await.unwrap();
        assert_eq!(next(&mut incoming).await.info.id, 2);
        assert_eq!(counts.handshakes_queued.load(Ordering::Relaxed), 1);
        assert_eq!(counts.handshakes_waiting.load(Ordering::Acquire), 0);
        assert_eq!(counts.handshakes_in_progress.load(Ordering::Acquire), 0);
        assert_eq!(counts.timed_out.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_stalled_tls_handshake_gives_up_its_turn_at_the_deadline() {
        let pki = pki();
        let mut one_at_a_time = limits(4, Duration::from_secs(2));
        one_at_a_time.max_handshakes = 1;
        let (addr, mut incoming) = tls_pair(one_at_a_time, &pki).await;
        let counts = incoming.counts.clone();
        // Sends its ClientHello, is admitted, and never answers.
        let mut stalled = StepClient::hello(addr, &pki.client).await;
        until("the stalled handshake is admitted", || {
            counts.handshakes_in_progress.load(Ordering::Acquire) == 1
        })
        .await;
        let mut second = StepClient::hello(addr, &pki.client).await;
        // Completes only once the stalled one's deadline gave the turn up.
        second.finish().await.unwrap();
        assert_eq!(next(&mut incoming).await.info.id, 2);
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(20), stalled.tcp.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(_) | Err(_))),
            "the stalled client is closed"
        );
        assert_eq!(counts.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(counts.handshakes_in_progress.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_silent_tls_connection_is_closed_at_the_deadline() {
        let pki = pki();
        let (addr, incoming) = tls_pair(limits(4, Duration::from_millis(200)), &pki).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_by_peer(&mut silent).await);
        assert_eq!(incoming.counts.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(
            incoming.counts.handshakes_waiting.load(Ordering::Acquire),
            0
        );
    }

    #[test]
    fn the_default_cap_leaves_room_for_other_descriptors() {
        assert_eq!(ConnectionLimits::default_max_connections(1024), 960);
        assert_eq!(ConnectionLimits::default_max_connections(20), 16);
    }
}
