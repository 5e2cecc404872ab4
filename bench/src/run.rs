//! The whole benchmark: for each N, for each peer, start its server as its
//! own process, connect N agents, publish, measure, disconnect, stop the
//! server by PID. Then the hint storm (at the largest N, on the broker), the
//! reconnect storms (plaintext and TLS) and the agent's HTTP endpoint.
//!
//! With [`BenchConfig::tls`] every fan-out connection is TLS: one CA and one
//! server certificate for 127.0.0.1 ([`crate::tls`]) that every server is
//! given and every client verifies.
//!
//! With [`BenchConfig::seal`] the run is the sealing comparison instead
//! ([`crate::sealing`]): credstream alone at the largest N, sealing off and
//! on, alternating.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use credstream_broker::auth::{Role, TokenKey};

use crate::agent_http::{self, AgentHttpConfig};
use crate::peers::etcd::EtcdPeer;
use crate::peers::grpc::GrpcPeer;
use crate::peers::nats::NatsPeer;
use crate::peers::redis::RedisPeer;
use crate::peers::{Agents, Peer, connect_all};
use crate::procstat::ProcStats;
use crate::recorder::Recorder;
use crate::report::{FanoutResult, HintResult, Latency, Report, StormResult};
use crate::servers::{ServerProcess, version_of};
use crate::storm::{self, StormSetup};
use crate::tls::TlsMaterial;

pub(crate) const CLUSTER: &str = "bench";

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PeerKind {
    /// The credstream broker.
    Credstream,
    /// The minimal tonic fan-out (`credstream-bench-floor`).
    Floor,
    /// etcd watch.
    Etcd,
    /// NATS core pub/sub.
    Nats,
    /// Redis pub/sub.
    Redis,
}

impl PeerKind {
    fn label(self) -> &'static str {
        match self {
            PeerKind::Credstream => "credstream",
            PeerKind::Floor => "tonic-floor",
            PeerKind::Etcd => "etcd",
            PeerKind::Nats => "nats",
            PeerKind::Redis => "redis",
        }
    }

    fn slot(self) -> u16 {
        match self {
            PeerKind::Credstream => 0,
            PeerKind::Floor => 1,
            PeerKind::Etcd => 2, // and 3 for its peer port
            PeerKind::Nats => 4,
            PeerKind::Redis => 5,
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// The numbers of agents, in order.
    pub agents: Vec<usize>,
    /// Measured publishes per N.
    pub publishes: usize,
    /// Unmeasured publishes before them.
    pub warmup: usize,
    /// The systems to measure.
    pub peers: Vec<PeerKind>,
    /// `credstream-broker`.
    pub broker_bin: PathBuf,
    /// `credstream-bench-floor`.
    pub floor_bin: PathBuf,
    /// `credstream-agent`; the endpoint is not measured without it.
    pub agent_bin: Option<PathBuf>,
    /// Logs, the key file.
    pub work_dir: PathBuf,
    /// Where etcd keeps its data (a tmpfs).
    pub etcd_data_root: PathBuf,
    /// The first server port (all stay below 32768).
    pub base_port: u16,
    /// Agents connecting at once.
    pub connect_concurrency: usize,
    /// How long one publish may take to reach every agent.
    pub round_timeout: Duration,
    /// Pause between publishes.
    pub gap: Duration,
    /// Keep-alive connections loading the agent endpoint.
    pub http_connections: usize,
    /// How long to load it.
    pub http_duration: Duration,
    /// Run the fan-out over TLS on every system.
    pub tls: bool,
    /// Agents in the reconnect storms (plaintext, then TLS); 0 for none.
    pub storm: usize,
    /// Run the reconnect storms alone (no fan-out, no agent endpoint).
    pub storm_only: bool,
    /// The storm agents' backoff ceiling (the agent's is 30 s).
    pub storm_backoff_max: Duration,
    /// How long the storm's agents get to converge.
    pub storm_timeout: Duration,
    /// Run the sealing comparison (issue 16) instead of the fan-out against
    /// the other systems: credstream only, at the largest N.
    pub seal: bool,
    /// The modes of the sealing comparison, in the order of its first round.
    pub seal_modes: Vec<crate::peers::grpc::Sealing>,
    /// Rounds of the sealing comparison (one fan-out per mode each).
    pub seal_rounds: usize,
    /// Versions per mode in the tight-loop measurement of one open.
    pub open_iterations: usize,
}

pub(crate) fn port(config: &BenchConfig, step: usize, slot: u16) -> u16 {
    config.base_port + (step as u16) * 8 + slot
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn machine() -> BTreeMap<String, String> {
    let mut machine = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(model) = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
    {
        machine.insert("cpu".into(), model);
    }
    machine.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    if let Some(total) = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
    {
        machine.insert("memory".into(), format!("{} GiB", total / 1024 / 1024));
    }
    if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        machine.insert("kernel".into(), kernel.trim().to_owned());
    }
    machine
}

/// Runs the benchmark.
pub async fn run(config: &BenchConfig) -> Result<Report> {
    std::fs::create_dir_all(&config.work_dir)?;
    let key_file = config.work_dir.join("token.key");
    std::fs::write(&key_file, rand::random::<[u8; 32]>())?;
    let key = TokenKey::from_file(&key_file)?;
    let ttl = Duration::from_secs(12 * 3600);
    let tokens = Tokens {
        publisher: key.issue(Role::Publisher, Some(CLUSTER), ttl)?,
        agent: key.issue(Role::Agent, Some(CLUSTER), ttl)?,
        key_file,
    };

    let material = if config.tls || config.storm > 0 {
        Some(TlsMaterial::generate(&config.work_dir.join("tls"))?)
    } else {
        None
    };
    let fanout_tls = material.as_ref().filter(|_| config.tls);

    let mut report = Report {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        machine: machine(),
        tls: config.tls,
        ..Report::default()
    };
    report.versions.insert(
        "credstream-broker".into(),
        version_of(config.broker_bin.to_str().unwrap_or_default(), "--version").unwrap_or_default(),
    );
    for (peer, program, flag) in [
        (PeerKind::Etcd, "etcd", "--version"),
        (PeerKind::Nats, "nats-server", "--version"),
        (PeerKind::Redis, "redis-server", "--version"),
    ] {
        if config.peers.contains(&peer) {
            report.versions.insert(
                program.into(),
                version_of(program, flag).unwrap_or_else(|| "not found".into()),
            );
        }
    }
    for (name, value) in [
        ("agents", format!("{:?}", config.agents)),
        ("publishes", config.publishes.to_string()),
        ("warmup", config.warmup.to_string()),
        (
            "payload_bytes",
            crate::payload::encoded(0).len().to_string(),
        ),
        ("gap_ms", config.gap.as_millis().to_string()),
        (
            "transport",
            if config.tls { "tls" } else { "plaintext" }.to_owned(),
        ),
        ("storm_agents", config.storm.to_string()),
        (
            "storm_backoff_max_ms",
            config.storm_backoff_max.as_millis().to_string(),
        ),
        (
            "peers",
            config
                .peers
                .iter()
                .map(|p| p.label())
                .collect::<Vec<_>>()
                .join(","),
        ),
    ] {
        report.config.insert(name.into(), value);
    }

    let largest = config.agents.iter().copied().max().unwrap_or_default();
    if config.seal {
        report
            .config
            .insert("seal_rounds".into(), config.seal_rounds.to_string());
        report
            .config
            .insert("open_iterations".into(), config.open_iterations.to_string());
        report.seal = Some(crate::sealing::compare(config, &tokens, fanout_tls, largest).await);
        report.compute_targets();
        return Ok(report);
    }

    let fanout_steps = if config.storm_only {
        &[][..]
    } else {
        &config.agents[..]
    };
    for (step, &n) in fanout_steps.iter().enumerate() {
        for &peer in &config.peers {
            eprintln!("[bench] {} with {n} agents", peer.label());
            let hint_storm = peer == PeerKind::Credstream && n == largest;
            let outcome = step_peer(config, &tokens, fanout_tls, step, n, peer, hint_storm).await;
            let result = match outcome {
                Ok((result, hints)) => {
                    if hints.is_some() {
                        report.hints = hints;
                    }
                    result
                }
                Err(error) => FanoutResult {
                    peer: peer.label().into(),
                    agents: n,
                    error: Some(format!("{error:#}")),
                    ..FanoutResult::default()
                },
            };
            eprintln!(
                "[bench]   latency {:?}, lost {}, cpu/update {:.2} ms (kernel {:.2}), {:.0} B/agent{}",
                result.latency_ms,
                result.lost,
                result.server_cpu_ms_per_update,
                result.server_system_ms_per_update,
                result.server_bytes_per_agent,
                result
                    .error
                    .as_deref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            );
            report.fanout.push(result);
        }
    }

    if let (true, Some(material)) = (config.storm > 0, &material) {
        let step = config.agents.len() + 1;
        for (slot, tls) in [(0, None), (1, Some(material))] {
            let transport = if tls.is_some() { "TLS" } else { "plaintext" };
            let port = port(config, step, slot);
            let setup = StormSetup {
                transport,
                url: url_of(port, tls.is_some()),
                ca: tls.map(|m| m.ca.clone()),
                cluster: CLUSTER,
                publisher_token: &tokens.publisher,
                agent_token: &tokens.agent,
                start: || start_broker(config, &tokens, port, tls),
                connect_concurrency: config.connect_concurrency,
                timeout: config.storm_timeout,
                backoff_max: config.storm_backoff_max,
            };
            let result = storm::run(setup, config.storm)
                .await
                .unwrap_or_else(|error| StormResult {
                    transport: transport.into(),
                    agents: config.storm,
                    error: Some(format!("{error:#}")),
                    ..StormResult::default()
                });
            eprintln!(
                "[bench]   converged {:?} s ({} never), {:.0} handshakes/s, broker CPU {:.2} s, RSS steady {} peak {}{}",
                result.converged_seconds,
                result.not_converged,
                result.handshakes_per_second,
                result.broker_cpu_seconds,
                result.steady_rss_bytes,
                result.peak_rss_bytes,
                result
                    .error
                    .as_deref()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default()
            );
            report.storms.push(result);
        }
    }

    if config.peers.contains(&PeerKind::Credstream) && !config.storm_only {
        match &config.agent_bin {
            Some(agent_bin) => {
                eprintln!("[bench] agent endpoint");
                match agent_endpoint(config, &tokens, agent_bin).await {
                    Ok(result) => report.agent_http = Some(result),
                    Err(error) => report.agent_http_error = Some(format!("{error:#}")),
                }
            }
            None => {
                report.agent_http_error = Some("no credstream-agent binary given".into());
            }
        }
    }
    report.compute_targets();
    Ok(report)
}

pub(crate) struct Tokens {
    pub(crate) publisher: String,
    pub(crate) agent: String,
    key_file: PathBuf,
}

pub(crate) fn url_of(port: u16, tls: bool) -> String {
    format!(
        "{}://{}",
        if tls { "https" } else { "http" },
        loopback(port)
    )
}

pub(crate) async fn start_broker(
    config: &BenchConfig,
    tokens: &Tokens,
    port: u16,
    tls: Option<&TlsMaterial>,
) -> Result<ServerProcess> {
    let mut command = Command::new(&config.broker_bin);
    command
        .arg("--listen")
        .arg(loopback(port).to_string())
        .arg("--token-key-file")
        .arg(&tokens.key_file);
    if let Some(tls) = tls {
        command
            .arg("--tls-cert")
            .arg(&tls.cert)
            .arg("--tls-key")
            .arg(&tls.key);
    }
    ServerProcess::start(
        "credstream-broker",
        command,
        loopback(port),
        &config.work_dir.join(format!("broker-{port}.log")),
    )
    .await
}

async fn start_server(
    config: &BenchConfig,
    tokens: &Tokens,
    tls: Option<&TlsMaterial>,
    peer: PeerKind,
    port: u16,
) -> Result<ServerProcess> {
    let log = config.work_dir.join(format!("{}-{port}.log", peer.label()));
    let addr = loopback(port);
    match peer {
        PeerKind::Credstream => start_broker(config, tokens, port, tls).await,
        PeerKind::Floor => {
            let mut command = Command::new(&config.floor_bin);
            command.arg(addr.to_string());
            if let Some(tls) = tls {
                command.arg(&tls.cert).arg(&tls.key);
            }
            ServerProcess::start("credstream-bench-floor", command, addr, &log).await
        }
        PeerKind::Etcd => {
            let data = config.etcd_data_root.join(format!("etcd-{port}"));
            let _ = std::fs::remove_dir_all(&data);
            let client = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
            let peer_url = format!("http://{}", loopback(port + 1));
            let mut command = Command::new("etcd");
            command
                .args(["--name", "bench", "--data-dir"])
                .arg(&data)
                .args(["--listen-client-urls", &client])
                .args(["--advertise-client-urls", &client])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("bench={peer_url}")])
                .args(["--logger", "zap", "--log-level", "warn"]);
            if let Some(tls) = tls {
                command
                    .arg("--cert-file")
                    .arg(&tls.cert)
                    .arg("--key-file")
                    .arg(&tls.key);
            }
            ServerProcess::start("etcd", command, addr, &log).await
        }
        PeerKind::Nats => {
            let mut command = Command::new("nats-server");
            command.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
            if let Some(tls) = tls {
                command
                    .arg("--tls")
                    .arg("--tlscert")
                    .arg(&tls.cert)
                    .arg("--tlskey")
                    .arg(&tls.key);
            }
            ServerProcess::start("nats-server", command, addr, &log).await
        }
        PeerKind::Redis => {
            let mut command = Command::new("redis-server");
            match tls {
                None => command.args(["--port", &port.to_string()]),
                Some(tls) => command
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca)
                    .args(["--tls-auth-clients", "no"]),
            };
            command
                .args(["--bind", "127.0.0.1"])
                .args(["--maxclients", "15000", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&config.work_dir);
            ServerProcess::start("redis-server", command, addr, &log).await
        }
    }
}

async fn step_peer(
    config: &BenchConfig,
    tokens: &Tokens,
    tls: Option<&TlsMaterial>,
    step: usize,
    n: usize,
    peer: PeerKind,
    hint_storm: bool,
) -> Result<(FanoutResult, Option<HintResult>)> {
    let port = port(config, step, peer.slot());
    let server = start_server(config, tokens, tls, peer, port).await?;
    let pid = server.pid();
    let url = url_of(port, tls.is_some());
    let ca_pem = tls.map(TlsMaterial::ca_pem).transpose()?;
    let outcome = async {
        match peer {
            PeerKind::Credstream | PeerKind::Floor => {
                let mut grpc = GrpcPeer::connect(
                    &url,
                    CLUSTER,
                    &tokens.publisher,
                    &tokens.agent,
                    tls.map(|m| m.ca.clone()),
                    0,
                )
                .await
                .context("publisher")?;
                let (mut result, agents) = fanout(config, &mut grpc, pid, n).await?;
                result.peer = peer.label().into();
                let hints = if hint_storm {
                    Some(hint_storm_on(&grpc, &agents).await?)
                } else {
                    None
                };
                drop(agents);
                Ok((result, hints))
            }
            PeerKind::Etcd => {
                let mut etcd = EtcdPeer::connect(&url, ca_pem).await?;
                let (mut result, _agents) = fanout(config, &mut etcd, pid, n).await?;
                result.peer = peer.label().into();
                Ok((result, None))
            }
            PeerKind::Nats => {
                let mut nats = NatsPeer::connect(
                    &format!("nats://{}", loopback(port)),
                    tls.map(|m| m.ca.clone()),
                )
                .await?;
                let (mut result, _agents) = fanout(config, &mut nats, pid, n).await?;
                result.peer = peer.label().into();
                Ok((result, None))
            }
            PeerKind::Redis => {
                let scheme = if tls.is_some() { "rediss" } else { "redis" };
                let mut redis =
                    RedisPeer::connect(&format!("{scheme}://{}/", loopback(port)), ca_pem).await?;
                let (mut result, _agents) = fanout(config, &mut redis, pid, n).await?;
                result.peer = peer.label().into();
                Ok((result, None))
            }
        }
    }
    .await;
    server.stop().await;
    if peer == PeerKind::Etcd {
        let _ = std::fs::remove_dir_all(config.etcd_data_root.join(format!("etcd-{port}")));
    }
    outcome
}

pub(crate) async fn fanout<P: Peer>(
    config: &BenchConfig,
    peer: &mut P,
    pid: u32,
    n: usize,
) -> Result<(FanoutResult, Agents)> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = ProcStats::read(pid)?;
    let recorder = Arc::new(Recorder::new(n));
    let started = Instant::now();
    let agents = connect_all(&*peer, &recorder, config.connect_concurrency).await?;
    let connect_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = ProcStats::read(pid)?;

    let mut round = 0;
    for _ in 0..config.warmup {
        round += 1;
        let t0 = recorder.begin(round);
        peer.publish(round).await?;
        recorder.finish(t0, config.round_timeout).await;
        tokio::time::sleep(config.gap).await;
    }
    let cpu_before = ProcStats::read(pid)?;
    let load_before = ProcStats::read(std::process::id())?;
    let mut samples = Vec::with_capacity(n * config.publishes);
    let mut lost = 0;
    let mut fanout_seconds = 0.0;
    for _ in 0..config.publishes {
        round += 1;
        let at_publish = ProcStats::read(pid)?;
        let t0 = recorder.begin(round);
        peer.publish(round).await?;
        let result = recorder.finish(t0, config.round_timeout).await;
        fanout_seconds += ProcStats::read(pid)?.cpu_seconds - at_publish.cpu_seconds;
        samples.extend(result.latencies_ns);
        lost += result.lost;
        tokio::time::sleep(config.gap).await;
    }
    let cpu_after = ProcStats::read(pid)?;
    let load_after = ProcStats::read(std::process::id())?;
    let per_update = |seconds: f64| seconds * 1000.0 / config.publishes.max(1) as f64;
    Ok((
        FanoutResult {
            agents: n,
            publishes: config.publishes,
            latency_ms: Latency::of(&mut samples),
            lost,
            connect_seconds,
            server_rss_before_bytes: before.rss_bytes,
            server_rss_after_bytes: after.rss_bytes,
            server_bytes_per_agent: after.rss_bytes.saturating_sub(before.rss_bytes) as f64
                / n as f64,
            server_cpu_ms_per_update: per_update(cpu_after.cpu_seconds - cpu_before.cpu_seconds),
            server_system_ms_per_update: per_update(
                cpu_after.system_seconds - cpu_before.system_seconds,
            ),
            server_fanout_cpu_ms_per_update: per_update(fanout_seconds),
            agents_cpu_ms_per_update: per_update(load_after.cpu_seconds - load_before.cpu_seconds),
            ..FanoutResult::default()
        },
        agents,
    ))
}

/// Every agent hints at once; counts the RefreshRequests that reach the
/// publisher (waiting 2 s past the first one for any other), then answers
/// it as a minter would.
async fn hint_storm_on(grpc: &GrpcPeer, agents: &Agents) -> Result<HintResult> {
    eprintln!("[bench]   {} agents hint at once", agents.len());
    let before = grpc.refresh_requests();
    let hints_sent = grpc.hint_all(agents.len(), Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while grpc.refresh_requests() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refresh_requests = grpc.refresh_requests() - before;
    grpc.answer_refresh(1_000_000, Duration::from_millis(100))
        .await?;
    Ok(HintResult {
        agents: agents.len(),
        hints_sent,
        refresh_requests,
    })
}

async fn agent_endpoint(
    config: &BenchConfig,
    tokens: &Tokens,
    agent_bin: &std::path::Path,
) -> Result<agent_http::AgentHttpResult> {
    let step = config.agents.len();
    let broker_port = port(config, step, 0);
    let broker = start_broker(config, tokens, broker_port, None).await?;
    let url = url_of(broker_port, false);
    let result = async {
        let _publisher =
            GrpcPeer::connect(&url, CLUSTER, &tokens.publisher, &tokens.agent, None, 0).await?;
        agent_http::measure(&AgentHttpConfig {
            agent_bin: agent_bin.to_owned(),
            broker_url: url.clone(),
            cluster: CLUSTER.into(),
            token: tokens.agent.clone(),
            listen: loopback(port(config, step, 6)),
            connections: config.http_connections,
            duration: config.http_duration,
            log: config.work_dir.join("agent.log"),
        })
        .await
    }
    .await;
    broker.stop().await;
    result
}
