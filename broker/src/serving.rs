//! Serving admitted connections: hyper's HTTP/2 server with every stream
//! of a connection polled in the connection's own task.
//!
//! tonic's `serve_with_incoming_shutdown` gives hyper tokio's executor, so
//! each HTTP/2 stream is a task of its own beside the connection's task:
//! a credential sent to an agent wakes the stream's task, which hands the
//! frame to h2 and wakes the connection's task, which writes it; an ack
//! wakes the connection's task, which wakes the stream's. Two task polls
//! per agent per event, and each poll of tonic's connection task also
//! polls its shutdown `watch`, whose waiter list is one lock for every
//! connection of the broker.
//!
//! Here hyper gets a `ConnectionExecutor` that queues each stream's
//! future in its connection, and `ConnectionDriver` polls the streams and
//! then the connection in one task, again while any of them was woken
//! during the poll (at most [`TURNS_PER_POLL`] times, then it yields). The
//! futures it polls are hyper's and tonic's own; only who polls them
//! changes. Shutdown is an atomic flag per connection and a wake-up, not a
//! shared waiter list.
//!
//! The HTTP/2 settings are those tonic 0.14 gave hyper, but for one: tonic
//! turned off hyper's limit on streams reset because the client broke the
//! protocol (1,024 per connection, then the connection is closed), the
//! defence against floods of malformed streams, and here it stays on, as
//! does the limit of 20 streams reset by the client before the server
//! accepted them.
//!
//! Per connection the service stack is tonic's (`serve_internal` in tonic
//! 0.14): the connection's [`ConnectionInfo`](crate::connections::ConnectionInfo) in each request's
//! extensions, [`RecoverErrorLayer`], at most [`CALLS_PER_CONNECTION`]
//! calls in progress, the `grpc-timeout` header (`GrpcTimeout`), then
//! the broker's gates and routes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures::stream::{FuturesUnordered, Stream, StreamExt};
use futures::task::AtomicWaker;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use slab::Slab;
use tokio::sync::mpsc;
use tonic::body::Body;
use tonic::service::RecoverErrorLayer;
use tonic::transport::server::Connected;
use tower::limit::ConcurrencyLimitLayer;
use tower::{Service, ServiceBuilder};

use crate::connections::Connection;

/// Calls in progress per connection, as tonic's
/// `concurrency_limit_per_connection` set before.
pub const CALLS_PER_CONNECTION: usize = 64;
/// HTTP/2 streams a client may open at once on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 64;
/// The largest request header block, in bytes.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Times one poll of a connection goes round its streams and the
/// connection while they wake each other, before it yields to the runtime.
pub const TURNS_PER_POLL: usize = 32;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves every connection `incoming` yields with `service` until `stop`
/// resolves, then asks each connection to close (HTTP/2 GOAWAY: streams in
/// progress go on) and returns once all have closed.
pub async fn serve<S, ResBody, I>(service: S, incoming: I, stop: impl Future<Output = ()>)
where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
    I: Stream<Item = std::io::Result<Connection>>,
{
    let shutdown = Arc::new(Shutdown::default());
    let (alive, mut all_closed) = mpsc::channel::<()>(1);
    // Admitted connections still waiting when serving stops are dropped
    // (closed) here, with the stream, before the drain.
    let mut incoming = Box::pin(incoming);
    let mut stop = std::pin::pin!(stop);
    loop {
        let connection = tokio::select! {
            () = &mut stop => break,
            next = incoming.next() => match next {
                Some(Ok(connection)) => connection,
                Some(Err(error)) => {
                    tracing::debug!(%error, "accepting a connection failed");
                    continue;
                }
                None => break,
            },
        };
        spawn_connection(connection, service.clone(), &shutdown, alive.clone());
    }
    drop(incoming);
    shutdown.begin();
    drop(alive);
    let _ = all_closed.recv().await;
}

fn spawn_connection<S, ResBody>(
    connection: Connection,
    service: S,
    shutdown: &Arc<Shutdown>,
    alive: mpsc::Sender<()>,
) where
    S: Service<Request<Body>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
{
    let info = connection.connect_info();
    let service = ServiceBuilder::new()
        .map_request(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(info.clone());
            request.map(Body::new)
        })
        .layer(RecoverErrorLayer::new())
        .layer(ConcurrencyLimitLayer::new(CALLS_PER_CONNECTION))
        .layer_fn(GrpcTimeout)
        .service(service);

    let executor = ConnectionExecutor::default();
    let mut http2 = hyper::server::conn::http2::Builder::new(executor.clone());
    http2
        .timer(TokioTimer::new())
        .initial_stream_window_size(None)
        .initial_connection_window_size(None)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .keep_alive_interval(None)
        .keep_alive_timeout(Duration::from_secs(20))
        .adaptive_window(false)
        .max_frame_size(None)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    let connection =
        http2.serve_connection(TokioIo::new(connection), TowerToHyperService::new(service));
    let driver = ConnectionDriver::new(connection, &executor);
    let registration = shutdown.register(driver.wake.clone());
    tokio::spawn(async move {
        if let Err(error) = driver.await {
            tracing::debug!(%error, "connection ended with an error");
        }
        drop(registration);
        drop(alive);
    });
}

/// hyper's executor for one connection's streams: it queues them for the
/// connection's [`ConnectionDriver`] instead of spawning tasks.
#[derive(Clone, Default)]
struct ConnectionExecutor {
    spawned: Arc<Mutex<Vec<StreamFuture>>>,
    wake: Arc<CoalescingWake>,
}

impl<F> hyper::rt::Executor<F> for ConnectionExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        self.spawned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Box::pin(future));
        self.wake.wake_by_ref_inner();
    }
}

/// The waker the connection and its streams see. While the driver polls,
/// a wake-up only marks that another turn is needed (the driver is running
/// already); otherwise it wakes the driver's task.
///
/// The driver stores `polling` before it looks at `woken` for the last
/// time and a waker stores `woken` before it looks at `polling`, both
/// sequentially consistent: a wake-up is seen by the driver's last look or
/// wakes the task.
#[derive(Default)]
struct CoalescingWake {
    polling: AtomicBool,
    woken: AtomicBool,
    closing: AtomicBool,
    task: AtomicWaker,
}

impl CoalescingWake {
    fn wake_by_ref_inner(&self) {
        self.woken.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.task.wake();
        }
    }
}

impl Wake for CoalescingWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref_inner();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wake_by_ref_inner();
    }
}

/// One connection and its streams, polled in one task.
struct ConnectionDriver<C> {
    connection: Pin<Box<C>>,
    streams: FuturesUnordered<StreamFuture>,
    spawned: Arc<Mutex<Vec<StreamFuture>>>,
    waker: Waker,
    wake: Arc<CoalescingWake>,
    closing: bool,
}

impl<C> ConnectionDriver<C> {
    /// The driver of `connection`, which hyper built with `executor`: the
    /// streams hyper hands that executor are polled here.
    fn new(connection: C, executor: &ConnectionExecutor) -> Self {
        Self {
            connection: Box::pin(connection),
            streams: FuturesUnordered::new(),
            spawned: executor.spawned.clone(),
            waker: Waker::from(executor.wake.clone()),
            wake: executor.wake.clone(),
            closing: false,
        }
    }
}

/// What every hyper HTTP/2 server connection can do that the driver needs.
trait GracefulConnection: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http2::Connection::graceful_shutdown(self);
    }
}

impl<C> Future for ConnectionDriver<C>
where
    C: GracefulConnection<Output = hyper::Result<()>>,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.wake.task.register(cx.waker());
        this.wake.polling.store(true, SeqCst);
        let mut inner = Context::from_waker(&this.waker);
        let mut result = Poll::Pending;
        for _ in 0..TURNS_PER_POLL {
            this.wake.woken.store(false, SeqCst);
            if !this.closing && this.wake.closing.load(SeqCst) {
                this.closing = true;
                this.connection.as_mut().graceful_shutdown();
            }
            let spawned = std::mem::take(
                &mut *this
                    .spawned
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
            this.streams.extend(spawned);
            while let Poll::Ready(Some(())) = this.streams.poll_next_unpin(&mut inner) {}
            if let Poll::Ready(done) = this.connection.as_mut().poll(&mut inner) {
                result = Poll::Ready(done);
                break;
            }
            if !this.wake.woken.load(SeqCst) {
                break;
            }
        }
        this.wake.polling.store(false, SeqCst);
        if result.is_pending() && this.wake.woken.load(SeqCst) {
            cx.waker().wake_by_ref();
        }
        result
    }
}

/// The broker's open connections, for shutdown.
#[derive(Default)]
struct Shutdown {
    stopping: AtomicBool,
    connections: Mutex<Slab<Arc<CoalescingWake>>>,
}

impl Shutdown {
    fn register(self: &Arc<Self>, wake: Arc<CoalescingWake>) -> Registration {
        let mut connections = self
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.stopping.load(SeqCst) {
            wake.closing.store(true, SeqCst);
        }
        Registration {
            shutdown: self.clone(),
            key: connections.insert(wake),
        }
    }

    fn begin(&self) {
        let connections = self
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.stopping.store(true, SeqCst);
        for (_, wake) in connections.iter() {
            wake.closing.store(true, SeqCst);
            wake.wake_by_ref_inner();
        }
    }
}

struct Registration {
    shutdown: Arc<Shutdown>,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shutdown
            .connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(self.key);
    }
}

/// The `grpc-timeout` request header, as tonic's server applies it: the
/// response (its headers, not a stream's messages) must come within the
/// client's timeout, or the call ends with tonic's `TimeoutExpired`, which
/// [`RecoverErrorLayer`] answers as gRPC status CANCELLED, "Timeout
/// expired", as tonic did. A header that does not parse is ignored.
#[derive(Clone, Debug)]
struct GrpcTimeout<S>(S);

impl<S, B> Service<Request<B>> for GrpcTimeout<S>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let timeout = parse_grpc_timeout(request.headers());
        let response = self.0.call(request);
        Box::pin(async move {
            match timeout {
                None => response.await.map_err(Into::into),
                Some(timeout) => match tokio::time::timeout(timeout, response).await {
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Err(tonic::TimeoutExpired(()).into()),
                },
            }
        })
    }
}

/// `grpc-timeout`: at most eight digits and a unit (H, M, S, m, u, n), as
/// the gRPC over HTTP/2 specification writes it.
fn parse_grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let digits = value.get(..value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match &value[digits.len()..] {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        parse_grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(timeout_of("3H"), Some(Duration::from_secs(3 * 3600)));
        assert_eq!(timeout_of("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            timeout_of("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
    }

    #[test]
    fn malformed_grpc_timeouts_are_ignored() {
        for value in ["", "S", "123456789S", "10x", "-1S", "1.5S", "+1S", " 1S"] {
            let mut headers = HeaderMap::new();
            if let Ok(value) = value.parse() {
                headers.insert("grpc-timeout", value);
            }
            assert_eq!(parse_grpc_timeout(&headers), None, "{value:?}");
        }
        assert_eq!(parse_grpc_timeout(&HeaderMap::new()), None);
    }

    /// Stands in for hyper's connection: counts its polls, wakes itself
    /// during the first `self_wakes` of them, can queue a stream through
    /// the connection's executor, and records a graceful shutdown.
    struct FakeConnection {
        polls: usize,
        self_wakes: usize,
        graceful: bool,
        spawn: Option<(ConnectionExecutor, Arc<AtomicBool>)>,
    }

    impl FakeConnection {
        fn waking_itself(self_wakes: usize) -> Self {
            Self {
                polls: 0,
                self_wakes,
                graceful: false,
                spawn: None,
            }
        }
    }

    impl Future for FakeConnection {
        type Output = hyper::Result<()>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.get_mut();
            this.polls += 1;
            if let Some((executor, ran)) = this.spawn.take() {
                hyper::rt::Executor::execute(&executor, async move { ran.store(true, SeqCst) });
            }
            if this.polls <= this.self_wakes {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        }
    }

    impl GracefulConnection for FakeConnection {
        fn graceful_shutdown(self: Pin<&mut Self>) {
            self.get_mut().graceful = true;
        }
    }

    /// The runtime's waker for the driver's task: counts wake-ups.
    #[derive(Default)]
    struct CountingWake(std::sync::atomic::AtomicUsize);

    impl Wake for CountingWake {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    impl CountingWake {
        fn count(&self) -> usize {
            self.0.load(SeqCst)
        }
    }

    fn driver(
        connection: FakeConnection,
    ) -> (ConnectionDriver<FakeConnection>, ConnectionExecutor) {
        let executor = ConnectionExecutor::default();
        (ConnectionDriver::new(connection, &executor), executor)
    }

    fn poll_once(driver: &mut ConnectionDriver<FakeConnection>, task: &Arc<CountingWake>) {
        let waker = Waker::from(task.clone());
        let pending = Pin::new(driver).poll(&mut Context::from_waker(&waker));
        assert!(pending.is_pending());
    }

    #[test]
    fn wake_ups_during_a_poll_are_more_turns_not_a_reschedule() {
        let (mut driver, _) = driver(FakeConnection::waking_itself(5));
        let task = Arc::new(CountingWake::default());
        poll_once(&mut driver, &task);
        assert_eq!(
            driver.connection.polls, 6,
            "five turns for five wake-ups, then one that found nothing"
        );
        assert_eq!(task.count(), 0, "the task was not woken: it was running");
    }

    #[test]
    fn a_connection_that_keeps_waking_itself_yields_after_the_turn_limit() {
        let (mut driver, _) = driver(FakeConnection::waking_itself(usize::MAX));
        let task = Arc::new(CountingWake::default());
        poll_once(&mut driver, &task);
        assert_eq!(driver.connection.polls, TURNS_PER_POLL);
        assert_eq!(
            task.count(),
            1,
            "woken once, to be polled again after the others"
        );
        poll_once(&mut driver, &task);
        assert_eq!(driver.connection.polls, 2 * TURNS_PER_POLL);
    }

    #[test]
    fn a_wake_up_between_polls_wakes_the_task() {
        let (mut driver, _) = driver(FakeConnection::waking_itself(0));
        let task = Arc::new(CountingWake::default());
        poll_once(&mut driver, &task);
        assert_eq!(task.count(), 0);
        driver.waker.wake_by_ref();
        assert_eq!(task.count(), 1);
    }

    #[test]
    fn a_stream_queued_during_the_connections_poll_runs_in_the_same_poll() {
        let (mut driver, executor) = driver(FakeConnection::waking_itself(0));
        let ran = Arc::new(AtomicBool::new(false));
        driver.connection.spawn = Some((executor, ran.clone()));
        let task = Arc::new(CountingWake::default());
        poll_once(&mut driver, &task);
        assert!(ran.load(SeqCst), "the stream was polled");
        assert!(driver.streams.is_empty(), "and, finished, dropped");
        assert_eq!(task.count(), 0);
    }

    #[test]
    fn shutdown_wakes_each_connection_which_then_closes_gracefully() {
        let shutdown = Arc::new(Shutdown::default());
        let (mut driver, _) = driver(FakeConnection::waking_itself(0));
        let registration = shutdown.register(driver.wake.clone());
        let task = Arc::new(CountingWake::default());
        poll_once(&mut driver, &task);
        assert!(!driver.connection.graceful);
        shutdown.begin();
        assert_eq!(task.count(), 1, "begin() woke the connection's task");
        poll_once(&mut driver, &task);
        assert!(driver.connection.graceful, "GOAWAY on the next poll");
        // A connection registered after shutdown began closes too.
        let (mut late, _) = self::driver(FakeConnection::waking_itself(0));
        let _late_registration = shutdown.register(late.wake.clone());
        poll_once(&mut late, &task);
        assert!(late.connection.graceful);
        drop(registration);
        assert_eq!(shutdown.connections.lock().unwrap().len(), 1);
    }

    /// A response slower than the client's `grpc-timeout` becomes tonic's
    /// answer, CANCELLED "Timeout expired"; one within it passes through.
    #[tokio::test(start_paused = true)]
    async fn a_response_later_than_grpc_timeout_is_cancelled() {
        let slow = tower::service_fn(|request: Request<()>| async move {
            let delay: u64 = request.headers()["x-delay-ms"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(delay)).await;
            Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
        });
        let mut service = ServiceBuilder::new()
            .layer(RecoverErrorLayer::new())
            .layer_fn(GrpcTimeout)
            .service(slow);
        use tower::ServiceExt;
        let mut status_of = async |delay: &str, timeout: &str| {
            let mut request = Request::new(());
            let headers = request.headers_mut();
            headers.insert("x-delay-ms", delay.parse().unwrap());
            headers.insert("grpc-timeout", timeout.parse().unwrap());
            let response = service.ready().await.unwrap().call(request);
            tonic::Status::from_header_map(response.await.unwrap().headers())
        };
        let late = status_of("200", "100m").await.expect("a gRPC status");
        assert_eq!(late.code(), tonic::Code::Cancelled);
        assert_eq!(late.message(), "Timeout expired");

        assert!(status_of("50", "100m").await.is_none());
        assert!(status_of("5000", "bogus").await.is_none());
    }
}
