//! `credstream-bench`: flags, the file-descriptor limit, and the run; the
//! work is in the library (`credstream_bench::run`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use credstream_bench::agent_http::sibling_binary;
use credstream_bench::peers::grpc::Sealing;
use credstream_bench::run::{self, BenchConfig, PeerKind};

/// Fans one credential out to N agents (each on its own connection) through
/// the credstream broker and through etcd, NATS, Redis and a minimal tonic
/// fan-out, all on 127.0.0.1; prints a table and writes JSON.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Numbers of agents, comma-separated.
    #[arg(
        long,
        env = "CREDSTREAM_BENCH_AGENTS",
        value_delimiter = ',',
        default_value = "100,1000,10000"
    )]
    agents: Vec<usize>,
    /// Measured publishes per N.
    #[arg(long, env = "CREDSTREAM_BENCH_PUBLISHES", default_value_t = 20)]
    publishes: usize,
    /// Unmeasured publishes before them.
    #[arg(long, env = "CREDSTREAM_BENCH_WARMUP", default_value_t = 3)]
    warmup: usize,
    /// Systems to measure, comma-separated.
    #[arg(
        long,
        env = "CREDSTREAM_BENCH_PEERS",
        value_enum,
        value_delimiter = ',',
        default_value = "credstream,floor,etcd,nats,redis"
    )]
    peers: Vec<PeerKind>,
    /// The broker binary (default: next to this one).
    #[arg(long, env = "CREDSTREAM_BENCH_BROKER_BIN")]
    broker_bin: Option<PathBuf>,
    /// The floor binary (default: next to this one).
    #[arg(long, env = "CREDSTREAM_BENCH_FLOOR_BIN")]
    floor_bin: Option<PathBuf>,
    /// The agent binary (default: next to this one, if it exists).
    #[arg(long, env = "CREDSTREAM_BENCH_AGENT_BIN")]
    agent_bin: Option<PathBuf>,
    /// Skip the agent endpoint measurement.
    #[arg(long, env = "CREDSTREAM_BENCH_NO_AGENT_HTTP")]
    no_agent_http: bool,
    /// Directory for logs and the key file (default: a new one under /tmp).
    #[arg(long, env = "CREDSTREAM_BENCH_WORK_DIR")]
    work_dir: Option<PathBuf>,
    /// First server port; servers use ports from here up (keep below 32768).
    #[arg(long, env = "CREDSTREAM_BENCH_BASE_PORT", default_value_t = 24100)]
    base_port: u16,
    /// Agents connecting at once.
    #[arg(
        long,
        env = "CREDSTREAM_BENCH_CONNECT_CONCURRENCY",
        default_value_t = 64
    )]
    connect_concurrency: usize,
    /// Pause between publishes: long enough that the acks of one round
    /// (sent 250–750 ms after receipt, as the agent does) land before the
    /// next, so each round measures the fan-out alone.
    #[arg(long, env = "CREDSTREAM_BENCH_GAP", default_value = "1s", value_parser = humantime::parse_duration)]
    gap: Duration,
    /// How long one publish may take to reach every agent.
    #[arg(long, env = "CREDSTREAM_BENCH_ROUND_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    round_timeout: Duration,
    /// Keep-alive connections loading the agent endpoint.
    #[arg(long, env = "CREDSTREAM_BENCH_HTTP_CONNECTIONS", default_value_t = 16)]
    http_connections: usize,
    /// How long to load the agent endpoint.
    #[arg(long, env = "CREDSTREAM_BENCH_HTTP_DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    http_duration: Duration,
    /// Every fan-out connection over TLS: one CA and a server certificate
    /// for 127.0.0.1 are generated, every server gets them and every client
    /// verifies them. Also runs the reconnect storms (see --storm).
    #[arg(long, env = "CREDSTREAM_BENCH_TLS")]
    tls: bool,
    /// Agents in the reconnect storms, plaintext then TLS, in this run
    /// (default: the largest --agents with --tls, none without; 0 for none).
    #[arg(long, env = "CREDSTREAM_BENCH_STORM")]
    storm: Option<usize>,
    /// Only the reconnect storms (plaintext then TLS, at --storm or the
    /// largest --agents): no fan-out, no other system, no agent endpoint.
    #[arg(long, env = "CREDSTREAM_BENCH_STORM_ONLY")]
    storm_only: bool,
    /// The storms' agents' reconnect backoff ceiling. The default is
    /// credstream-agent's; another value measures what a different agent
    /// backoff would do to the storm.
    #[arg(long, env = "CREDSTREAM_BENCH_STORM_BACKOFF_MAX", default_value = "30s", value_parser = humantime::parse_duration)]
    storm_backoff_max: Duration,
    /// How long the storms' agents get to converge.
    #[arg(long, env = "CREDSTREAM_BENCH_STORM_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    storm_timeout: Duration,
    /// Sealing off against on (issue 16) instead of the comparison with the
    /// other systems: credstream alone at the largest --agents, each fan-out
    /// a fresh broker and N fresh agents, --seal-rounds rounds of one
    /// fan-out per --seal-modes mode, the order rotating each round. Sealed,
    /// the publisher seals each version once; `on`, every agent opens it
    /// through the agent's own gate; `relay`, agents do not open (the cost
    /// of the sealed bytes alone). Also times one open and one seal in a
    /// tight loop.
    #[arg(long, env = "CREDSTREAM_BENCH_SEAL")]
    seal: bool,
    /// The modes compared by --seal.
    #[arg(
        long,
        env = "CREDSTREAM_BENCH_SEAL_MODES",
        value_enum,
        value_delimiter = ',',
        default_value = "off,relay,on"
    )]
    seal_modes: Vec<Sealing>,
    /// Rounds of --seal (each one fan-out per mode).
    #[arg(long, env = "CREDSTREAM_BENCH_SEAL_ROUNDS", default_value_t = 3)]
    seal_rounds: usize,
    /// Versions per mode in the tight-loop timing of one open (--seal).
    #[arg(
        long,
        env = "CREDSTREAM_BENCH_OPEN_ITERATIONS",
        default_value_t = 20_000
    )]
    open_iterations: usize,
    /// Write the JSON report here (it is also printed after the table).
    #[arg(long, env = "CREDSTREAM_BENCH_JSON")]
    json: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // docs/facts.md, fact 17: the hard limit is 20,000 here; 10,000 agents need the soft
    // limit raised. Child servers inherit it.
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raise RLIMIT_NOFILE")?;
    eprintln!("[bench] open file limit {limit}");
    let work_dir = cli.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("credstream-bench-{}", std::process::id()))
    });
    let shm = PathBuf::from("/dev/shm");
    let etcd_data_root = if shm.is_dir() {
        shm.join(format!("credstream-bench-{}", std::process::id()))
    } else {
        work_dir.join("etcd")
    };
    let agent_bin = match (cli.no_agent_http, cli.agent_bin) {
        (true, _) => None,
        (false, Some(path)) => Some(path),
        (false, None) => Some(sibling_binary("credstream-agent")).filter(|p| p.exists()),
    };
    let largest = cli.agents.iter().copied().max().unwrap_or_default();
    let storm = cli.storm.unwrap_or(if cli.tls || cli.storm_only {
        largest
    } else {
        0
    });
    let config = BenchConfig {
        seal: cli.seal,
        seal_modes: cli.seal_modes,
        seal_rounds: cli.seal_rounds,
        open_iterations: cli.open_iterations,
        tls: cli.tls,
        storm,
        storm_only: cli.storm_only,
        storm_backoff_max: cli.storm_backoff_max,
        storm_timeout: cli.storm_timeout,
        agents: cli.agents,
        publishes: cli.publishes,
        warmup: cli.warmup,
        peers: cli.peers,
        broker_bin: cli
            .broker_bin
            .unwrap_or_else(|| sibling_binary("credstream-broker")),
        floor_bin: cli
            .floor_bin
            .unwrap_or_else(|| sibling_binary("credstream-bench-floor")),
        agent_bin,
        work_dir,
        etcd_data_root: etcd_data_root.clone(),
        base_port: cli.base_port,
        connect_concurrency: cli.connect_concurrency,
        round_timeout: cli.round_timeout,
        gap: cli.gap,
        http_connections: cli.http_connections,
        http_duration: cli.http_duration,
    };
    let report = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(async {
            // On SIGINT/SIGTERM the run is dropped, and with it every server
            // process it started (each is killed by its PID on drop).
            use tokio::signal::unix::{SignalKind, signal};
            let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
            tokio::select! {
                report = run::run(&config) => report,
                _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted"),
                _ = term.recv() => anyhow::bail!("terminated"),
            }
        });
    let _ = std::fs::remove_dir_all(&etcd_data_root);
    let report = report?;
    let json = serde_json::to_string_pretty(&report)?;
    println!("{}", report.table());
    println!("{json}");
    if let Some(path) = &cli.json {
        std::fs::write(path, &json).with_context(|| format!("cannot write {}", path.display()))?;
    }
    eprintln!("[bench] logs in {}", config.work_dir.display());
    Ok(())
}
