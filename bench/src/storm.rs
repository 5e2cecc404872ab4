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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::peers::grpc::{AgentDialer, GrpcPeer, run_stream};
use crate::procstat::ProcStats;
use crate::recorder::Recorder;
use crate::report::StormResult;
use crate::servers::ServerProcess;

/// `credstream_agent::subscription`'s reconnect backoff, copied: the
/// bench does not link the agent.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const STABLE_AFTER: Duration = Duration::from_secs(10);

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
}

impl Counters {
    fn opened_now(&self) {
        self.opened.fetch_add(1, Ordering::AcqRel);
        self.last_open_ns
            .fetch_max(self.base.elapsed().as_nanos() as u64, Ordering::AcqRel);
    }
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
        let opened = dialer.open(index).await;
        drop(permit);
        let mut snapshot_at = None;
        match opened {
            Ok(open) => {
                counters.opened_now();
                for round in &open.snapshot_rounds {
                    recorder.record(index, *round);
                }
                snapshot_at = Some(Instant::now());
                run_stream(index, open, recorder.clone()).await;
            }
            Err(_) => {
                counters.failed.fetch_add(1, Ordering::AcqRel);
            }
        }
        if snapshot_at.is_some_and(|at| at.elapsed() >= STABLE_AFTER) {
            failures = 0;
        }
        let ceiling = BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(16))
            .min(BACKOFF_MAX);
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
