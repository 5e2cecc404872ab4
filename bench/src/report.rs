//! Results, the targets as ratios from this one run, the table and
//! the JSON.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::agent_http::AgentHttpResult;

/// Latency percentiles over every (agent, publish) pair, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Latency {
    /// Percentiles of `samples_ns` (sorted in place); `None` when empty.
    pub fn of(samples_ns: &mut [u64]) -> Option<Self> {
        if samples_ns.is_empty() {
            return None;
        }
        samples_ns.sort_unstable();
        let at = |q: f64| {
            let index = ((samples_ns.len() as f64 * q).ceil() as usize).clamp(1, samples_ns.len());
            samples_ns[index - 1] as f64 / 1e6
        };
        Some(Self {
            p50: at(0.50),
            p99: at(0.99),
            max: samples_ns[samples_ns.len() - 1] as f64 / 1e6,
        })
    }
}

/// One peer at one N.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FanoutResult {
    /// `credstream`, `tonic-floor`, `etcd`, `nats` or `redis`.
    pub peer: String,
    /// Connected agents (each its own connection).
    pub agents: usize,
    /// Measured publishes (after the warm-up).
    pub publishes: usize,
    /// Publish-to-receipt latency per agent.
    pub latency_ms: Option<Latency>,
    /// (agent, publish) pairs not received within the round timeout.
    pub lost: usize,
    /// Seconds to connect and subscribe every agent.
    pub connect_seconds: f64,
    /// Server RSS before the agents connected.
    pub server_rss_before_bytes: u64,
    /// Server RSS with every agent connected.
    pub server_rss_after_bytes: u64,
    /// (after - before) / agents.
    pub server_bytes_per_agent: f64,
    /// Server CPU (user + system) per publish, over the measured publishes.
    pub server_cpu_ms_per_update: f64,
    /// The kernel's part of it (`stime`), which a server cannot shed by
    /// doing less above the socket layer.
    pub server_system_ms_per_update: f64,
    /// Server CPU per publish from just before it until the last agent
    /// held it: the fan-out alone. The rest of `server_cpu_ms_per_update`
    /// is what the server does between rounds, which for credstream is
    /// reading the agents' acks (sent 250-750 ms after receipt; the other
    /// systems have none). `/proc` counts CPU in clock ticks (10 ms here),
    /// so each round's reading is within a tick; summed over the rounds.
    pub server_fanout_cpu_ms_per_update: f64,
    /// The load process's CPU per publish (the publisher and every agent
    /// receiving and decoding): the receiving side shares the same cores,
    /// so it is part of every latency here, and it differs by protocol.
    pub agents_cpu_ms_per_update: f64,
    /// Why this step failed, if it did.
    pub error: Option<String>,
}

/// The refresh hint storm.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HintResult {
    /// Agents connected.
    pub agents: usize,
    /// Hints handed to their streams at once.
    pub hints_sent: usize,
    /// RefreshRequests the publisher received for them (mints).
    pub refresh_requests: u64,
}

/// One reconnect storm (see [`crate::storm`]); times are seconds from the
/// restart (SIGTERM to the old broker).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StormResult {
    /// `plaintext` or `TLS`.
    pub transport: String,
    /// Agent streams, each on its own connection.
    pub agents: usize,
    /// Seconds to connect them all before the restart.
    pub connect_seconds: f64,
    /// When the old broker had exited.
    pub old_broker_exit_seconds: f64,
    /// When the new one accepted its first connection.
    pub new_broker_listening_seconds: f64,
    /// When the publisher's stream was open again and the credential
    /// re-published.
    pub publisher_reconnected_seconds: f64,
    /// When the last agent held the re-published credential (`None` if
    /// some never did within the timeout).
    pub converged_seconds: Option<f64>,
    /// When half of them did.
    pub median_seconds: Option<f64>,
    /// Agents that did not hold it by the timeout.
    pub not_converged: usize,
    /// Streams that delivered a snapshot after the restart (one handshake
    /// each, TLS included).
    pub streams_opened: u64,
    /// Stream attempts that failed after the restart (each is retried).
    pub failed_attempts: u64,
    /// Those failures by cause, and what the attempt log says about
    /// connecting to the new broker.
    pub failures: StormFailures,
    /// `streams_opened` / (last opened − new broker listening).
    pub handshakes_per_second: f64,
    /// The new broker's CPU (user + system) from its start to convergence.
    pub broker_cpu_seconds: f64,
    /// The kernel's part of it.
    pub broker_system_seconds: f64,
    /// The load process's CPU over the same time (every agent's
    /// reconnects, handshakes included, and the publisher).
    pub load_cpu_seconds: f64,
    /// The old broker's RSS with every agent connected and idle.
    pub steady_rss_bytes: u64,
    /// The new broker's peak RSS (`VmHWM`) up to 2 s after convergence.
    pub peak_rss_bytes: u64,
    /// Its RSS 2 s after convergence.
    pub rss_after_bytes: u64,
    /// Why the storm failed, if it did.
    pub error: Option<String>,
}

/// A reconnect storm's failed attempts by cause (see
/// [`crate::storm::Cause`]), the time successful attempts took to open
/// (connect, TLS, HTTP/2, call, snapshot) and when the agents first tried
/// the new broker; all after the restart, times in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StormFailures {
    /// TCP connect refused.
    pub refused: u64,
    /// TCP connect timed out (10 s).
    pub connect_timeout: u64,
    /// The broker closed the connection during the TLS (plaintext: HTTP/2)
    /// handshake.
    pub handshake_closed: u64,
    /// The TLS handshake failed with a TLS error.
    pub handshake_error: u64,
    /// Connected, then the call failed before its snapshot.
    pub stream: u64,
    /// Median time of a successful attempt, from its start to its snapshot.
    pub open_p50_seconds: Option<f64>,
    /// Its 99th percentile.
    pub open_p99_seconds: Option<f64>,
    /// Its maximum.
    pub open_max_seconds: Option<f64>,
    /// When half the agents had made their first attempt after the new
    /// broker listened (from the restart).
    pub first_try_median_seconds: Option<f64>,
    /// When the last agent had: the agents' backoff alone keeps the storm
    /// from converging sooner.
    pub first_try_last_seconds: Option<f64>,
}

/// One fan-out of the sealing comparison ([`crate::sealing`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SealStep {
    /// `off`, `relay` (sealed, not opened) or `on` (sealed and opened).
    pub mode: String,
    /// Which round it belongs to (0, 1, …).
    pub round: usize,
    /// The fan-out, measured as the main one is.
    pub fanout: FanoutResult,
    /// Credential updates an agent's gate did not let through (0 in a sound
    /// run: every sealed update opened).
    pub not_opened: u64,
    /// Versions the publisher sealed (warm-up and the first included).
    pub publisher_seals: u64,
    /// The publisher's wall time per seal, in microseconds.
    pub publisher_seal_us_per_version: f64,
}

/// The median of one mode's fan-outs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SealMode {
    /// Fan-outs that completed.
    pub fanouts: usize,
    /// Median of their max latencies (ms).
    pub max_ms: Option<f64>,
    /// Median of their p99 latencies (ms).
    pub p99_ms: Option<f64>,
    /// Median of their p50 latencies (ms).
    pub p50_ms: Option<f64>,
    /// Median broker CPU (user + system) per version, ms.
    pub broker_cpu_ms_per_version: Option<f64>,
    /// Median broker kernel CPU per version, ms.
    pub broker_kernel_ms_per_version: Option<f64>,
    /// Median load-process CPU per version, ms: the publisher and all N
    /// agents receiving (and, sealed, opening).
    pub load_cpu_ms_per_version: Option<f64>,
    /// That divided by N, in microseconds: one agent's share per update.
    pub load_cpu_us_per_agent_update: Option<f64>,
    /// (agent, version) pairs lost, summed.
    pub lost: usize,
    /// Updates not let through by a gate, summed.
    pub not_opened: u64,
}

fn median_of(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

impl SealMode {
    /// The medians of `steps` (failed fan-outs left out).
    pub fn of<'a>(steps: impl Iterator<Item = &'a SealStep>, agents: usize) -> Self {
        let ok: Vec<&SealStep> = steps
            .filter(|s| s.fanout.error.is_none() && s.fanout.latency_ms.is_some())
            .collect();
        let of = |f: &dyn Fn(&SealStep) -> f64| median_of(ok.iter().map(|s| f(s)).collect());
        let latency = |s: &SealStep| s.fanout.latency_ms.unwrap_or_default();
        let load = of(&|s| s.fanout.agents_cpu_ms_per_update);
        Self {
            fanouts: ok.len(),
            max_ms: of(&|s| latency(s).max),
            p99_ms: of(&|s| latency(s).p99),
            p50_ms: of(&|s| latency(s).p50),
            broker_cpu_ms_per_version: of(&|s| s.fanout.server_cpu_ms_per_update),
            broker_kernel_ms_per_version: of(&|s| s.fanout.server_system_ms_per_update),
            load_cpu_ms_per_version: load,
            load_cpu_us_per_agent_update: load.map(|ms| ms * 1000.0 / agents.max(1) as f64),
            lost: ok.iter().map(|s| s.fanout.lost).sum(),
            not_opened: ok.iter().map(|s| s.not_opened).sum(),
        }
    }
}

/// What one version costs, measured in a tight loop on one thread
/// ([`crate::sealing::open_cost`]); medians over the passes, in
/// microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OpenCost {
    /// Versions per pass (one fresh `Gate` each).
    pub versions_per_pass: usize,
    /// Passes per mode.
    pub passes: usize,
    /// An agent without sealing: decode the `SubscribeResponse`.
    pub decode_us: f64,
    /// An agent with sealing: decode it and pass it through its `Gate`.
    pub decode_open_us: f64,
    /// The difference: what sealing adds per update on each agent.
    pub open_us: f64,
    /// The publisher: one seal per version.
    pub seal_us: f64,
    /// The encoded clear `SubscribeResponse`.
    pub clear_bytes: usize,
    /// The encoded sealed one.
    pub sealed_bytes: usize,
    /// How it was timed.
    pub clock: String,
}

/// Sealing on against off at one N (issue 16).
#[derive(Clone, Debug, Default, Serialize)]
pub struct SealComparison {
    /// Agents in every fan-out.
    pub agents: usize,
    /// Rounds run (one fan-out per mode each).
    pub rounds: usize,
    /// The modes, in the order of the first round.
    pub modes: Vec<String>,
    /// Every fan-out, in the order run.
    pub steps: Vec<SealStep>,
    /// Medians with sealing off.
    pub off: Option<SealMode>,
    /// Medians with sealed updates the agents do not open.
    pub relay: Option<SealMode>,
    /// Medians with sealing on.
    pub on: Option<SealMode>,
    /// on / off, median max latency.
    pub ratio_max: Option<f64>,
    /// on / off, median p99 latency.
    pub ratio_p99: Option<f64>,
    /// on / off, median p50 latency.
    pub ratio_p50: Option<f64>,
    /// on / off, median broker CPU per version.
    pub ratio_broker_cpu: Option<f64>,
    /// on / off, median load-process CPU per version.
    pub ratio_load_cpu: Option<f64>,
    /// relay / off, median max latency.
    pub relay_ratio_max: Option<f64>,
    /// relay / off, median broker CPU per version.
    pub relay_ratio_broker_cpu: Option<f64>,
    /// (on − relay) load-process CPU per version / N, in microseconds (or
    /// on − off without relay): the in-situ estimate of one agent's cost
    /// per opened update (noisy: a difference of two medians).
    pub load_cpu_us_per_opened_update: Option<f64>,
    /// The tight-loop cost of one open.
    pub open: Option<OpenCost>,
    /// Why it was not measured, if it was not.
    pub open_error: Option<String>,
}

impl SealComparison {
    /// Fills the ratios from the modes' medians.
    pub fn compute_ratios(&mut self) {
        let off = self.off.clone().unwrap_or_default();
        let on = self.on.clone().unwrap_or_default();
        let relay = self.relay.clone().unwrap_or_default();
        self.ratio_max = median_ratio(on.max_ms, off.max_ms);
        self.ratio_p99 = median_ratio(on.p99_ms, off.p99_ms);
        self.ratio_p50 = median_ratio(on.p50_ms, off.p50_ms);
        self.ratio_broker_cpu =
            median_ratio(on.broker_cpu_ms_per_version, off.broker_cpu_ms_per_version);
        self.ratio_load_cpu = median_ratio(on.load_cpu_ms_per_version, off.load_cpu_ms_per_version);
        self.relay_ratio_max = median_ratio(relay.max_ms, off.max_ms);
        self.relay_ratio_broker_cpu = median_ratio(
            relay.broker_cpu_ms_per_version,
            off.broker_cpu_ms_per_version,
        );
        let base = relay
            .load_cpu_ms_per_version
            .or(off.load_cpu_ms_per_version);
        self.load_cpu_us_per_opened_update = match (on.load_cpu_ms_per_version, base) {
            (Some(on), Some(base)) => Some((on - base) * 1000.0 / self.agents.max(1) as f64),
            _ => None,
        };
    }

    fn table(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "sealing: credstream, {} agents, {} rounds of {} (order rotating each round), medians of each mode's fan-outs",
            self.agents,
            self.rounds,
            self.modes.join(", ")
        );
        let _ = writeln!(
            out,
            "  off: clear; relay: sealed once by the publisher, agents do not open; on: sealed, every agent opens through its own Gate"
        );
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>9} {:>9} {:>9} {:>6} {:>10} {:>15} {:>9} {:>10} {:>10}",
            "round",
            "mode",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "not opened",
            "broker CPU/v ms",
            "kernel ms",
            "load ms/v",
            "seal us/v"
        );
        for s in &self.steps {
            if let Some(error) = &s.fanout.error {
                let _ = writeln!(out, "{:>5} {:>6} failed: {error}", s.round, s.mode);
                continue;
            }
            let l = s.fanout.latency_ms.unwrap_or_default();
            let _ = writeln!(
                out,
                "{:>5} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>6} {:>10} {:>15.2} {:>9.2} {:>10.2} {:>10}",
                s.round,
                s.mode,
                l.p50,
                l.p99,
                l.max,
                s.fanout.lost,
                s.not_opened,
                s.fanout.server_cpu_ms_per_update,
                s.fanout.server_system_ms_per_update,
                s.fanout.agents_cpu_ms_per_update,
                if s.publisher_seals > 0 {
                    format!("{:.1}", s.publisher_seal_us_per_version)
                } else {
                    "-".into()
                }
            );
        }
        let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let r = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}x"));
        let _ = writeln!(
            out,
            "{:>12} {:>9} {:>9} {:>9} {:>17} {:>9} {:>10} {:>16}",
            "median",
            "p50 ms",
            "p99 ms",
            "max ms",
            "broker CPU/v ms",
            "kernel",
            "load ms/v",
            "load us/agent/v"
        );
        for (name, m) in [("off", &self.off), ("relay", &self.relay), ("on", &self.on)] {
            let Some(m) = m else { continue };
            let _ = writeln!(
                out,
                "{:>12} {:>9} {:>9} {:>9} {:>17} {:>9} {:>10} {:>16}",
                name,
                f(m.p50_ms),
                f(m.p99_ms),
                f(m.max_ms),
                f(m.broker_cpu_ms_per_version),
                f(m.broker_kernel_ms_per_version),
                f(m.load_cpu_ms_per_version),
                f(m.load_cpu_us_per_agent_update),
            );
        }
        let _ = writeln!(
            out,
            "{:>12} {:>9} {:>9} {:>9} {:>17} {:>9} {:>10}",
            "on/off",
            r(self.ratio_p50),
            r(self.ratio_p99),
            r(self.ratio_max),
            r(self.ratio_broker_cpu),
            "",
            r(self.ratio_load_cpu),
        );
        if self.relay.is_some() {
            let _ = writeln!(
                out,
                "{:>12} {:>9} {:>9} {:>9} {:>17}",
                "relay/off",
                "",
                "",
                r(self.relay_ratio_max),
                r(self.relay_ratio_broker_cpu),
            );
        }
        let _ = writeln!(
            out,
            "load process: (on - {}) / N = {} us of CPU per opened update per agent (in situ: all N agents share the load process)",
            if self.relay.is_some() { "relay" } else { "off" },
            f(self.load_cpu_us_per_opened_update)
        );
        match (&self.open, &self.open_error) {
            (Some(o), _) => {
                let _ = writeln!(
                    out,
                    "one agent, one update ({}, {} passes of {}): decode {:.2} us, decode + open through the agent's Gate {:.2} us, \
                     so opening adds {:.2} us; the publisher seals once per version in {:.2} us; {} B clear, {} B sealed",
                    o.clock,
                    o.passes,
                    o.versions_per_pass,
                    o.decode_us,
                    o.decode_open_us,
                    o.open_us,
                    o.seal_us,
                    o.clear_bytes,
                    o.sealed_bytes
                );
            }
            (None, Some(error)) => {
                let _ = writeln!(out, "open cost: not measured: {error}");
            }
            (None, None) => {}
        }
    }
}

fn median_ratio(on: Option<f64>, off: Option<f64>) -> Option<f64> {
    match (on, off) {
        (Some(on), Some(off)) if off > 0.0 => Some(on / off),
        _ => None,
    }
}

/// One target of the issue.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What is compared.
    pub name: String,
    /// The measured value (a ratio, bytes, a count or requests per second).
    pub value: Option<f64>,
    /// The limit.
    pub limit: f64,
    /// True if the value must be at most the limit (else at least).
    pub at_most: bool,
    /// Met, missed, or not measured (`None`).
    pub met: Option<bool>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// When the run started (RFC 3339, UTC).
    pub date: String,
    /// CPU model, cores, memory, kernel.
    pub machine: BTreeMap<String, String>,
    /// Versions of every server.
    pub versions: BTreeMap<String, String>,
    /// The run's settings.
    pub config: BTreeMap<String, String>,
    /// Fan-out results, by N then peer.
    pub fanout: Vec<FanoutResult>,
    /// True if every connection used TLS (the fan-out table says so).
    pub tls: bool,
    /// The reconnect storms (plaintext and TLS, same N).
    pub storms: Vec<StormResult>,
    /// The hint storm at the largest N.
    pub hints: Option<HintResult>,
    /// The agent's HTTP endpoint.
    pub agent_http: Option<AgentHttpResult>,
    /// Why the agent endpoint was not measured, if it was not.
    pub agent_http_error: Option<String>,
    /// Sealing on against off (`--seal`); the other sections stay empty
    /// in such a run.
    pub seal: Option<SealComparison>,
    /// The targets.
    pub targets: Vec<Target>,
}

impl Report {
    fn find(&self, peer: &str, agents: usize) -> Option<&FanoutResult> {
        self.fanout
            .iter()
            .find(|r| r.peer == peer && r.agents == agents && r.error.is_none())
    }

    fn max_latency(&self, peer: &str, agents: usize) -> Option<f64> {
        self.find(peer, agents)?.latency_ms.map(|l| l.max)
    }

    /// Fills [`Report::targets`] from the results.
    pub fn compute_targets(&mut self) {
        if let Some(seal) = &self.seal {
            // Issue 16: sealing on within 5% of off.
            let n = seal.agents;
            self.targets = [
                (
                    format!("sealing on / off: max latency at N={n}"),
                    seal.ratio_max,
                ),
                (
                    format!("sealing on / off: broker CPU per version at N={n}"),
                    seal.ratio_broker_cpu,
                ),
            ]
            .into_iter()
            .map(|(name, value)| Target {
                met: value.map(|v| v <= 1.05),
                name,
                value,
                limit: 1.05,
                at_most: true,
            })
            .collect();
            return;
        }
        let largest = self
            .fanout
            .iter()
            .map(|r| r.agents)
            .max()
            .unwrap_or_default();
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let cs = |n| self.max_latency("credstream", n);
        let faster_pubsub = match (
            self.max_latency("nats", largest),
            self.max_latency("redis", largest),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let broker_cpu = self
            .find("credstream", largest)
            .map(|r| r.server_cpu_ms_per_update);
        let bytes_per_agent = (
            format!(
                "broker bytes per connected {}agent (N={largest})",
                if self.tls { "TLS " } else { "" }
            ),
            self.find("credstream", largest)
                .map(|r| r.server_bytes_per_agent),
            16384.0,
            true,
        );
        // Issue 18's targets over TLS, issue 7's in plaintext.
        let mut targets = if self.tls {
            vec![
                (
                    format!("TLS: max latency at N={largest} / etcd"),
                    ratio(cs(largest), self.max_latency("etcd", largest)),
                    0.4,
                    true,
                ),
                (
                    format!("TLS: max latency at N={largest} / faster of NATS and Redis"),
                    ratio(cs(largest), faster_pubsub),
                    0.8,
                    true,
                ),
                bytes_per_agent,
                (
                    format!("TLS: broker CPU per round (fan-out and acks) at N={largest} / Redis"),
                    ratio(
                        broker_cpu,
                        self.find("redis", largest)
                            .map(|r| r.server_cpu_ms_per_update),
                    ),
                    1.0,
                    true,
                ),
                (
                    format!("TLS: broker CPU during the fan-out alone at N={largest} / Redis"),
                    ratio(
                        self.find("credstream", largest)
                            .map(|r| r.server_fanout_cpu_ms_per_update),
                        self.find("redis", largest)
                            .map(|r| r.server_fanout_cpu_ms_per_update),
                    ),
                    1.0,
                    true,
                ),
            ]
        } else {
            vec![
                (
                    format!("max latency at N={largest} / etcd"),
                    ratio(cs(largest), self.max_latency("etcd", largest)),
                    0.5,
                    true,
                ),
                (
                    format!("max latency at N={largest} / faster of NATS and Redis"),
                    ratio(cs(largest), faster_pubsub),
                    1.0,
                    true,
                ),
                (
                    "max latency at N=1000 / tonic floor".to_owned(),
                    ratio(cs(1000), self.max_latency("tonic-floor", 1000)),
                    1.0,
                    true,
                ),
                bytes_per_agent,
                (
                    format!("broker CPU per fan-out at N={largest} / tonic floor"),
                    ratio(
                        broker_cpu,
                        self.find("tonic-floor", largest)
                            .map(|r| r.server_cpu_ms_per_update),
                    ),
                    0.5,
                    true,
                ),
            ]
        };
        for storm in self.storms.iter().filter(|s| s.error.is_none()) {
            targets.push((
                format!(
                    "{} reconnect storm of {}: seconds to converge",
                    storm.transport, storm.agents
                ),
                storm.converged_seconds,
                10.0,
                true,
            ));
            targets.push((
                format!(
                    "{} reconnect storm of {}: broker peak RSS / steady",
                    storm.transport, storm.agents
                ),
                (storm.steady_rss_bytes > 0)
                    .then(|| storm.peak_rss_bytes as f64 / storm.steady_rss_bytes as f64),
                1.5,
                true,
            ));
        }
        targets.extend([
            (
                format!(
                    "mints for {} simultaneous hints",
                    self.hints.as_ref().map_or(0, |h| h.agents)
                ),
                self.hints.as_ref().map(|h| h.refresh_requests as f64),
                1.0,
                true,
            ),
            (
                "agent endpoint requests/s".to_owned(),
                self.agent_http.as_ref().map(|h| h.requests_per_second),
                20_000.0,
                false,
            ),
            (
                "agent idle RSS bytes".to_owned(),
                self.agent_http.as_ref().map(|h| h.idle_rss_bytes as f64),
                10.0 * 1024.0 * 1024.0,
                true,
            ),
        ]);
        self.targets = targets
            .drain(..)
            .map(|(name, value, limit, at_most)| Target {
                met: value.map(|v| {
                    if name.starts_with("mints") {
                        v == 1.0
                    } else if at_most {
                        v <= limit
                    } else {
                        v >= limit
                    }
                }),
                name,
                value,
                limit,
                at_most,
            })
            .collect();
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "credstream fan-out benchmark over {}, {} ({} publishes per N after warm-up)",
            if self.tls {
                "TLS (every connection; clients verify a P-256 certificate for 127.0.0.1)"
            } else {
                "plaintext TCP"
            },
            self.date,
            self.config.get("publishes").map_or("?", String::as_str)
        );
        let _ = writeln!(
            out,
            "machine: {}; servers and load generator share these cores",
            self.machine
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = writeln!(out);
        if let Some(seal) = &self.seal {
            seal.table(&mut out);
            self.targets_table(&mut out);
            return out;
        }
        let _ = writeln!(
            out,
            "{:>6}  {:<12} {:>9} {:>9} {:>9} {:>6} {:>14} {:>9} {:>10} {:>10} {:>14} {:>9}",
            "N",
            "peer",
            "p50 ms",
            "p99 ms",
            "max ms",
            "lost",
            "srv CPU/upd ms",
            "kernel ms",
            "fan-out ms",
            "agents ms",
            "srv B/agent",
            "connect s"
        );
        for r in &self.fanout {
            match (&r.error, r.latency_ms) {
                (Some(error), _) => {
                    let _ = writeln!(out, "{:>6}  {:<12} failed: {error}", r.agents, r.peer);
                }
                (None, latency) => {
                    let l = latency.unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "{:>6}  {:<12} {:>9.2} {:>9.2} {:>9.2} {:>6} {:>14.2} {:>9.2} {:>10.2} {:>10.2} {:>14.0} {:>9.1}",
                        r.agents,
                        r.peer,
                        l.p50,
                        l.p99,
                        l.max,
                        r.lost,
                        r.server_cpu_ms_per_update,
                        r.server_system_ms_per_update,
                        r.server_fanout_cpu_ms_per_update,
                        r.agents_cpu_ms_per_update,
                        r.server_bytes_per_agent,
                        r.connect_seconds
                    );
                }
            }
        }
        let _ = writeln!(out);
        for s in &self.storms {
            if let Some(error) = &s.error {
                let _ = writeln!(
                    out,
                    "reconnect storm, {}, {} agents: failed: {error}",
                    s.transport, s.agents
                );
                continue;
            }
            let mib = |b: u64| b as f64 / 1048576.0;
            let seconds = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2} s"));
            let _ = writeln!(
                out,
                "reconnect storm, {:<9} {} agents: old broker gone {:.2} s, new listening {:.2} s, publisher back {:.2} s, \
                 half converged {}, all converged {} ({} never); {} streams opened ({} failed attempts), {:.0} handshakes/s; \
                 new broker CPU {:.2} s (kernel {:.2} s), load process {:.2} s; broker RSS steady {:.1} MiB, peak {:.1} MiB, after {:.1} MiB\n  \
                 failed: {} refused, {} connect timeout, {} closed in handshake, {} TLS error, {} stream; \
                 successful opens took p50 {}, p99 {}, max {}; first try at the new broker: half by {}, all by {}",
                format!("{},", s.transport),
                s.agents,
                s.old_broker_exit_seconds,
                s.new_broker_listening_seconds,
                s.publisher_reconnected_seconds,
                s.median_seconds.map_or("-".into(), |v| format!("{v:.2} s")),
                s.converged_seconds
                    .map_or("-".into(), |v| format!("{v:.2} s")),
                s.not_converged,
                s.streams_opened,
                s.failed_attempts,
                s.handshakes_per_second,
                s.broker_cpu_seconds,
                s.broker_system_seconds,
                s.load_cpu_seconds,
                mib(s.steady_rss_bytes),
                mib(s.peak_rss_bytes),
                mib(s.rss_after_bytes),
                s.failures.refused,
                s.failures.connect_timeout,
                s.failures.handshake_closed,
                s.failures.handshake_error,
                s.failures.stream,
                seconds(s.failures.open_p50_seconds),
                seconds(s.failures.open_p99_seconds),
                seconds(s.failures.open_max_seconds),
                seconds(s.failures.first_try_median_seconds),
                seconds(s.failures.first_try_last_seconds),
            );
        }
        if let Some(h) = &self.hints {
            let _ = writeln!(
                out,
                "refresh hints: {} agents hinted at once ({} sent) -> {} RefreshRequest(s) to the publisher",
                h.agents, h.hints_sent, h.refresh_requests
            );
        }
        match (&self.agent_http, &self.agent_http_error) {
            (Some(h), _) => {
                let _ = writeln!(
                    out,
                    "agent /aws/credentials: {:.0} req/s over {} keep-alive connections ({} errors); idle RSS {:.1} MiB, after load {:.1} MiB",
                    h.requests_per_second,
                    h.connections,
                    h.errors,
                    h.idle_rss_bytes as f64 / 1048576.0,
                    h.loaded_rss_bytes as f64 / 1048576.0
                );
            }
            (None, Some(error)) => {
                let _ = writeln!(out, "agent endpoint: not measured: {error}");
            }
            (None, None) => {}
        }
        self.targets_table(&mut out);
        if let Some(line) = self.kernel_bound() {
            let _ = writeln!(out, "{line}");
        }
        out
    }

    fn targets_table(&self, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(out, "targets:");
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            let value = t.value.map_or("-".to_owned(), |v| {
                if v.abs() < 100.0 {
                    format!("{v:.3}")
                } else {
                    format!("{v:.0}")
                }
            });
            let _ = writeln!(
                out,
                "  {:<58} {:>12} {} {:<10} {}",
                t.name,
                value,
                if t.at_most { "<=" } else { ">=" },
                t.limit,
                verdict
            );
        }
    }

    /// What the CPU target is up against: the broker's kernel time per
    /// fan-out (one write per agent, one read per ack) set beside the
    /// floor's whole CPU. No work above the socket layer can bring the
    /// broker below its kernel time.
    fn kernel_bound(&self) -> Option<String> {
        let largest = self.fanout.iter().map(|r| r.agents).max()?;
        let broker = self.find("credstream", largest)?;
        let floor = self.find("tonic-floor", largest)?;
        if floor.server_cpu_ms_per_update <= 0.0 {
            return None;
        }
        let broker_user = broker.server_cpu_ms_per_update - broker.server_system_ms_per_update;
        let floor_user = floor.server_cpu_ms_per_update - floor.server_system_ms_per_update;
        Some(format!(
            "  CPU at N={largest}: broker {:.1} ms per fan-out, of which kernel {:.1} ms ({:.2}x the floor's \
             whole {:.1} ms; floor kernel {:.1} ms); user space {:.1} ms against the floor's {:.1} ms ({:.2}x)",
            broker.server_cpu_ms_per_update,
            broker.server_system_ms_per_update,
            broker.server_system_ms_per_update / floor.server_cpu_ms_per_update,
            floor.server_cpu_ms_per_update,
            floor.server_system_ms_per_update,
            broker_user,
            floor_user,
            broker_user / floor_user.max(0.001),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_hundred_samples() {
        let mut samples: Vec<u64> = (1..=100).map(|ms| ms * 1_000_000).collect();
        let l = Latency::of(&mut samples).expect("samples");
        assert_eq!((l.p50, l.p99, l.max), (50.0, 99.0, 100.0));
    }
}
