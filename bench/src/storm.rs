//! The reconnect storm: N agent streams, each on a connection of its own
//! (TLS or plaintext), all holding the credential; then the broker is
//! restarted (SIGTERM, at most 5 s to drain, SIGKILL; a new broker process
//! on the same port at once) and the publisher reconnects and publishes the
//! next credential. Measured: the time from the restart until every agent
//! is subscribed again and holds that credential, the new broker's CPU up
//! to then (handshakes included), its peak RSS against the old broker's
//! steady state, and how fast connections were established.
//!
//! Every agent reconnects as `credstream-agent` does: after a lost stream
//! it waits a random time up to a ceiling that starts at 250 ms and doubles
//! per failure up to 30 s (full jitter), reset only by a stream that stayed
//! up 10 s; it never gives up. The agents share this one load process.
//!
//! Every attempt is logged (start, end, outcome), so that the report can
//! say why attempts failed ([`Cause`], told apart by the types in the
//! error, not its text), how long successful connections took to open,
//! and when each agent first tried the new broker: the last of those is
//! what the agents' own backoff allows, whatever the broker does.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::peers::grpc::{AgentDialer, GrpcPeer, run_stream};
use crate::procstat::ProcStats;
use crate::recorder::Recorder;
use crate::report::{StormFailures, StormResult};
use crate::servers::ServerProcess;

/// `credstream_agent::subscription`'s reconnect backoff, copied: the
/// bench does not link the agent.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The agent's ceiling, the storm's default (`--storm-backoff-max` to ask
/// what another would do).
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Why a stream attempt failed, as the agent saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// TCP connect refused: nothing listening (the old broker gone, the
    /// new one not yet up).
    Refused,
    /// TCP connect did not complete within the client's 10 s connect
    /// timeout (SYNs dropped: a full listen queue). The timeout covers the
    /// TCP connect only; tonic sets none on the TLS handshake.
    ConnectTimeout,
    /// Connected, then the broker closed or reset the connection before
    /// the TLS handshake (in plaintext: HTTP/2's) completed: its handshake
    /// deadline, an eviction at the connection cap, or a broker going away.
    HandshakeClosed,
    /// The TLS handshake failed with a TLS error (an alert, a certificate).
    HandshakeError,
    /// The connection was up, then the Subscribe call failed or ended
    /// before its snapshot (UNAVAILABLE from a draining broker, a reset, no
    /// snapshot in time).
    Stream,
}

/// The cause of `error`, an [`AgentDialer::open`] failure: a
/// `tonic::transport::Error` is a failure to connect (TCP, TLS, HTTP/2),
/// told apart by the `io::Error` kinds and `rustls::Error` in its source
/// chain; anything else happened once connected.
pub fn cause(error: &anyhow::Error) -> Cause {
    let Some(transport) = error.downcast_ref::<tonic::transport::Error>() else {
        return Cause::Stream;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(transport);
    let mut io_kind = None;
    while let Some(error) = source {
        if error.is::<tokio_rustls::rustls::Error>() {
            return Cause::HandshakeError;
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            // tokio-rustls reports a TLS error as an io::Error whose inner
            // error is the rustls::Error.
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<tokio_rustls::rustls::Error>())
            {
                return Cause::HandshakeError;
            }
            io_kind.get_or_insert(io.kind());
        }
        source = error.source();
    }
    match io_kind {
        Some(std::io::ErrorKind::ConnectionRefused) => Cause::Refused,
        Some(std::io::ErrorKind::TimedOut) => Cause::ConnectTimeout,
        _ => Cause::HandshakeClosed,
    }
}

/// One stream attempt: ns since [`Counters::base`] at its start and end,
/// and how it ended (`None`: it delivered its snapshot).
#[derive(Clone, Copy, Debug)]
struct Attempt {
    agent: usize,
    start_ns: u64,
    end_ns: u64,
    failed: Option<Cause>,
}

/// What the agents did, across the run.
#[derive(Debug)]
struct Counters {
    base: Instant,
    /// Stream attempts that failed (connect, TLS, call or snapshot).
    failed: AtomicU64,
    /// Streams that delivered their snapshot.
    opened: AtomicU64,
    /// When the last one did, in ns since `base`.
    last_open_ns: AtomicU64,
    /// Every attempt, in the order they ended.
    attempts: Mutex<Vec<Attempt>>,
}

impl Counters {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn ended(&self, agent: usize, start_ns: u64, failed: Option<Cause>) {
        let end_ns = self.now_ns();
        match failed {
            None => {
                self.opened.fetch_add(1, Ordering::AcqRel);
                self.last_open_ns.fetch_max(end_ns, Ordering::AcqRel);
            }
            Some(_) => {
                self.failed.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Attempt {
                agent,
                start_ns,
                end_ns,
                failed,
            });
    }
}

/// The seconds at fraction `q` of sorted `ns` (`None` if empty).
fn quantile_seconds(sorted_ns: &[u64], q: f64) -> Option<f64> {
    let last = sorted_ns.len().checked_sub(1)?;
    let at = ((last as f64) * q).round() as usize;
    Some(sorted_ns[at.min(last)] as f64 / 1e9)
}

/// What the attempt log says about the storm: attempts that ended after
/// `restart_ns` by cause, how long the successful ones took, and when each
/// agent first tried once the new broker was listening (`listening_ns`).
fn failures(
    attempts: &[Attempt],
    agents: usize,
    restart_ns: u64,
    listening_ns: u64,
) -> StormFailures {
    let mut out = StormFailures::default();
    let mut open_ns = Vec::new();
    let mut first_try: Vec<Option<u64>> = vec![None; agents];
    for attempt in attempts.iter().filter(|a| a.end_ns >= restart_ns) {
        match attempt.failed {
            None => open_ns.push(attempt.end_ns - attempt.start_ns),
            Some(Cause::Refused) => out.refused += 1,
            Some(Cause::ConnectTimeout) => out.connect_timeout += 1,
            Some(Cause::HandshakeClosed) => out.handshake_closed += 1,
            Some(Cause::HandshakeError) => out.handshake_error += 1,
            Some(Cause::Stream) => out.stream += 1,
        }
        if attempt.start_ns >= listening_ns
            && let Some(first) = first_try.get_mut(attempt.agent)
        {
            let since = attempt.start_ns - restart_ns;
            *first = Some(first.map_or(since, |f: u64| f.min(since)));
        }
    }
    open_ns.sort_unstable();
    out.open_p50_seconds = quantile_seconds(&open_ns, 0.5);
    out.open_p99_seconds = quantile_seconds(&open_ns, 0.99);
    out.open_max_seconds = open_ns.last().map(|ns| *ns as f64 / 1e9);
    let mut first: Vec<u64> = first_try.into_iter().flatten().collect();
    first.sort_unstable();
    out.first_try_median_seconds = quantile_seconds(&first, 0.5);
    out.first_try_last_seconds = first.last().map(|ns| *ns as f64 / 1e9);
    out
}

/// One reconnecting agent: opens its stream (the first time under
/// `initial`, so that the first connection of N agents is orderly), runs
/// it until it ends, backs off, and opens it again, forever.
async fn agent(
    index: usize,
    dialer: AgentDialer,
    recorder: Arc<Recorder>,
    counters: Arc<Counters>,
    initial: Arc<Semaphore>,
    backoff_max: Duration,
) {
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        let permit = if first {
            initial.clone().acquire_owned().await.ok()
        } else {
            None
        };
        first = false;
        let start_ns = counters.now_ns();
        let opened = dialer.open(index).await;
        drop(permit);
        let mut snapshot_at = None;
        match opened {
            Ok(open) => {
                counters.ended(index, start_ns, None);
                for round in &open.snapshot_rounds {
                    recorder.record(index, *round);
                }
                snapshot_at = Some(Instant::now());
                run_stream(index, open, recorder.clone()).await;
            }
            Err(error) => counters.ended(index, start_ns, Some(cause(&error))),
        }
        if snapshot_at.is_some_and(|at| at.elapsed() >= STABLE_AFTER) {
            failures = 0;
        }
        let ceiling = BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(16))
            .min(backoff_max);
        failures = failures.saturating_add(1);
        tokio::time::sleep(ceiling.mul_f64(rand::random::<f64>())).await;
    }
}

/// What the storm needs from the run: how to start a broker on the port,
/// and the tokens.
pub struct StormSetup<'a, F> {
    /// `plaintext` or `TLS`.
    pub transport: &'static str,
    /// `http://127.0.0.1:PORT` or `https://…`.
    pub url: String,
    /// The CA file clients verify against (TLS only).
    pub ca: Option<PathBuf>,
    /// The cluster.
    pub cluster: &'a str,
    /// Publisher token.
    pub publisher_token: &'a str,
    /// Agent token.
    pub agent_token: &'a str,
    /// Starts a broker on the storm's port.
    pub start: F,
    /// Agents connecting at once for the first connection.
    pub connect_concurrency: usize,
    /// How long the agents get to converge, first and after the restart.
    pub timeout: Duration,
    /// The agents' backoff ceiling ([`BACKOFF_MAX`], as the agent's).
    pub backoff_max: Duration,
}

struct Tasks(Vec<JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

async fn publisher<F>(
    setup: &StormSetup<'_, F>,
    round: u64,
    deadline: Instant,
) -> Result<GrpcPeer> {
    loop {
        match GrpcPeer::connect(
            &setup.url,
            setup.cluster,
            setup.publisher_token,
            setup.agent_token,
            setup.ca.clone(),
            round,
        )
        .await
        {
            Ok(peer) => return Ok(peer),
            Err(error) if Instant::now() >= deadline => {
                return Err(error.context("the publisher cannot reconnect"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Runs the storm with `n` agents.
pub async fn run<F, Fut>(setup: StormSetup<'_, F>, n: usize) -> Result<StormResult>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<ServerProcess>>,
{
    eprintln!("[bench] reconnect storm, {}, {n} agents", setup.transport);
    let server = (setup.start)().await?;
    let deadline = Instant::now() + setup.timeout;
    let first_publisher = publisher(&setup, 1, deadline).await?;
    let dialer = first_publisher.dialer().clone();
    let recorder = Arc::new(Recorder::new(n));
    let counters = Arc::new(Counters {
        base: Instant::now(),
        failed: AtomicU64::new(0),
        opened: AtomicU64::new(0),
        last_open_ns: AtomicU64::new(0),
        attempts: Mutex::new(Vec::new()),
    });
    let initial = Arc::new(Semaphore::new(setup.connect_concurrency.max(1)));
    let t0 = recorder.begin(1);
    let _tasks = Tasks(
        (0..n)
            .map(|index| {
                tokio::spawn(agent(
                    index,
                    dialer.clone(),
                    recorder.clone(),
                    counters.clone(),
                    initial.clone(),
                    setup.backoff_max,
                ))
            })
            .collect(),
    );
    let connected = recorder.finish(t0, setup.timeout).await;
    if connected.lost > 0 {
        bail!(
            "only {} of {n} agents subscribed before the restart",
            n - connected.lost
        );
    }
    // Let the snapshot acks land, then read the broker at rest.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let steady = ProcStats::read(server.pid())?;

    let opened_before = counters.opened.load(Ordering::Acquire);
    let failed_before = counters.failed.load(Ordering::Acquire);
    let load_before = ProcStats::read(std::process::id())?;
    let t_restart = recorder.begin(2);
    let restart = Instant::now();
    server.stop().await;
    drop(first_publisher);
    let old_exited = restart.elapsed();
    let server = (setup.start)().await?;
    let listening = restart.elapsed();
    let pid = server.pid();
    let _publisher = publisher(&setup, 2, restart + setup.timeout).await?;
    let publisher_at = restart.elapsed();
    let result = recorder.finish(t_restart, setup.timeout).await;
    let at_convergence = ProcStats::read(pid)?;
    let load_after = ProcStats::read(std::process::id())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ProcStats::read(pid)?;
    let opened = counters.opened.load(Ordering::Acquire) - opened_before;
    let failed = counters.failed.load(Ordering::Acquire) - failed_before;
    let last_open = Duration::from_nanos(counters.last_open_ns.load(Ordering::Acquire));
    let restart_since_base = restart.duration_since(counters.base);
    let failures = failures(
        &counters.attempts.lock().unwrap_or_else(|e| e.into_inner()),
        n,
        restart_since_base.as_nanos() as u64,
        (restart_since_base + listening).as_nanos() as u64,
    );
    let accepting_for = last_open
        .saturating_sub(restart_since_base)
        .saturating_sub(listening);
    let mut latencies = result.latencies_ns.clone();
    latencies.sort_unstable();
    let converged = (result.lost == 0)
        .then(|| latencies.last().map(|ns| *ns as f64 / 1e9))
        .flatten();
    let median = latencies
        .get(latencies.len() / 2)
        .map(|ns| *ns as f64 / 1e9);
    server.stop().await;
    Ok(StormResult {
        transport: setup.transport.into(),
        agents: n,
        connect_seconds: connected
            .latencies_ns
            .iter()
            .max()
            .map_or(0.0, |ns| *ns as f64 / 1e9),
        old_broker_exit_seconds: old_exited.as_secs_f64(),
        new_broker_listening_seconds: listening.as_secs_f64(),
        publisher_reconnected_seconds: publisher_at.as_secs_f64(),
        converged_seconds: converged,
        median_seconds: median,
        not_converged: result.lost,
        streams_opened: opened,
        failed_attempts: failed,
        failures,
        handshakes_per_second: if accepting_for.is_zero() {
            0.0
        } else {
            opened as f64 / accepting_for.as_secs_f64()
        },
        broker_cpu_seconds: at_convergence.cpu_seconds,
        broker_system_seconds: at_convergence.system_seconds,
        load_cpu_seconds: load_after.cpu_seconds - load_before.cpu_seconds,
        steady_rss_bytes: steady.rss_bytes,
        peak_rss_bytes: after.peak_rss_bytes.max(at_convergence.peak_rss_bytes),
        rss_after_bytes: after.rss_bytes,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use credstream_proto::connect::BrokerAddress;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::tls::TlsMaterial;

    fn dialer(url: String, ca: Option<PathBuf>) -> AgentDialer {
        AgentDialer::new(&BrokerAddress {
            url,
            token: "t".into(),
            cluster_id: "c".into(),
            ca_cert: ca,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        })
        .unwrap()
    }

    /// A CA file in a directory of its own (removed by the caller).
    fn ca() -> (PathBuf, PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("credstream-storm-test-{}", std::process::id()));
        let ca = TlsMaterial::generate(&dir).unwrap().ca;
        (dir, ca)
    }

    /// A listener that reads what the client sends first, then `answer`s
    /// (or closes when `answer` is empty).
    async fn server(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut hello = [0u8; 64];
                let _ = socket.read(&mut hello).await;
                let _ = socket.write_all(answer).await;
                drop(socket);
            }
        });
        format!("https://{addr}")
    }

    #[tokio::test]
    async fn nothing_listening_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let error = dialer(format!("http://{addr}"), None)
            .open(0)
            .await
            .err()
            .unwrap();
        assert_eq!(cause(&error), Cause::Refused, "{error:#}");
    }

    #[tokio::test]
    async fn a_close_during_the_tls_handshake_is_told_from_a_tls_error() {
        let (dir, ca) = ca();
        let closed = server(b"").await;
        let error = dialer(closed, Some(ca.clone()))
            .open(0)
            .await
            .err()
            .unwrap();
        assert_eq!(cause(&error), Cause::HandshakeClosed, "{error:#}");

        // Not a TLS record: rustls fails the handshake itself.
        let garbage = server(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        let error = dialer(garbage, Some(ca)).open(0).await.err().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(cause(&error), Cause::HandshakeError, "{error:#}");
    }

    #[test]
    fn attempts_are_counted_by_cause_after_the_restart_only() {
        let s = 1_000_000_000;
        let attempt = |agent, start_ns, end_ns, failed| Attempt {
            agent,
            start_ns,
            end_ns,
            failed,
        };
        let log = [
            // Before the restart (at 10 s): not counted.
            attempt(0, 0, s, Some(Cause::Stream)),
            attempt(0, 10 * s, 11 * s, Some(Cause::Refused)),
            attempt(1, 10 * s, 12 * s, Some(Cause::Refused)),
            // The new broker listens at 12 s.
            attempt(0, 13 * s, 14 * s, Some(Cause::HandshakeClosed)),
            attempt(0, 15 * s, 15 * s + s / 2, None),
            attempt(1, 17 * s, 18 * s, None),
        ];
        let f = failures(&log, 2, 10 * s, 12 * s);
        assert_eq!(
            (
                f.refused,
                f.handshake_closed,
                f.stream,
                f.handshake_error,
                f.connect_timeout
            ),
            (2, 1, 0, 0, 0)
        );
        assert_eq!(f.open_max_seconds, Some(1.0));
        assert_eq!(f.open_p50_seconds, Some(1.0));
        // Agent 0 first tried the new broker 3 s after the restart, agent 1 7 s.
        assert_eq!(f.first_try_last_seconds, Some(7.0));
    }
}
