//! Sealing on against sealing off (issue 16): the same credstream fan-out
//! to the same N agents with clear and with sealed credentials, several
//! rounds in rotating order, plus what one open costs an agent.
//!
//! - **off**: the publisher sends the clear credential; agents decode it.
//! - **relay**: the publisher seals each version once; the broker relays
//!   the sealed update; agents decode it but do not open it (they take the
//!   round from the clear sequence). What the sealed bytes cost the broker,
//!   the wire and the receiving side, without the opening.
//! - **on**: sealed as in relay, and every agent holds the cluster's key
//!   and passes each update through its own `credstream_agent::seal::Gate`
//!   (the real agent's verification path: open, clear-metadata checks, the
//!   rollback rule) before it can read the round, which travels only inside
//!   the ciphertext. A fan-out's latency therefore ends when the agent has
//!   *opened* the update: its arrival plus its own opening time, each open
//!   timed apart once the round is in, as on a worker of its own (see
//!   [`crate::peers::grpc`]: N opens in a row in the one load process
//!   would delay every later agent's reception, a cost no cluster has).
//!
//! Sealing is `credstream_proto::seal::seal_credential`, which `credstream
//! publish` calls too. Each fan-out is a fresh broker process and N fresh
//! connections, measured exactly as the main fan-out is ([`crate::run`]).
//! Round `r` runs the modes rotated by `r` (off, relay, on | relay, on, off
//! | on, off, relay), so that each mode runs in each position and a drift of
//! the shared machine weighs on all alike; the summary is the median of
//! each mode's fan-outs.
//!
//! What an open costs one agent is measured apart, in a tight loop on one
//! thread over the real sealed payload encoded as the broker sends it
//! ([`open_cost`]): decoding the `SubscribeResponse` alone (what an agent
//! without sealing does) against decoding it and passing it through a
//! `Gate`. On a real cluster each agent pays this on its own worker; here
//! all N share the load process, whose CPU per version is also reported.

use std::hint::black_box;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use credstream_agent::seal::Gate;
use credstream_proto::seal::{SealKey, seal_credential};
use credstream_proto::v1::{SubscribeResponse, subscribe_response};
use prost::Message;

use crate::payload;
use crate::peers::grpc::{GrpcPeer, Sealing};
use crate::report::{FanoutResult, OpenCost, SealComparison, SealMode, SealStep};
use crate::run::{BenchConfig, CLUSTER, Tokens, fanout, port, start_broker, url_of};
use crate::tls::TlsMaterial;

/// The fan-outs of the comparison in the order they run, with their
/// round: round `r` runs `modes` rotated left by `r`.
pub fn order(modes: &[Sealing], rounds: usize) -> Vec<(usize, Sealing)> {
    (0..rounds)
        .flat_map(|round| (0..modes.len()).map(move |i| (round, modes[(i + round) % modes.len()])))
        .collect()
}

/// Runs the comparison at `agents` agents.
pub(crate) async fn compare(
    config: &BenchConfig,
    tokens: &Tokens,
    tls: Option<&TlsMaterial>,
    agents: usize,
) -> SealComparison {
    let key = SealKey::generate(CLUSTER);
    let mut comparison = SealComparison {
        agents,
        rounds: config.seal_rounds,
        modes: config
            .seal_modes
            .iter()
            .map(|m| m.label().to_owned())
            .collect(),
        ..SealComparison::default()
    };

    eprintln!("[bench] sealing: cost of one open, in a tight loop");
    let open_key = key.clone();
    let iterations = config.open_iterations;
    match tokio::task::spawn_blocking(move || open_cost(&open_key, iterations)).await {
        Ok(Ok(cost)) => comparison.open = Some(cost),
        Ok(Err(error)) => comparison.open_error = Some(format!("{error:#}")),
        Err(error) => comparison.open_error = Some(format!("the measurement panicked: {error}")),
    }

    let fanouts = order(&config.seal_modes, config.seal_rounds);
    let total = fanouts.len();
    for (index, (round, mode)) in fanouts.into_iter().enumerate() {
        let label = mode.label();
        eprintln!(
            "[bench] sealing {label} (fan-out {} of {total}), {agents} agents",
            index + 1
        );
        let step = match seal_step(config, tokens, tls, index, agents, &key, mode).await {
            Ok(step) => SealStep { round, ..step },
            Err(error) => SealStep {
                mode: label.into(),
                round,
                fanout: FanoutResult {
                    peer: format!("credstream, sealing {label}"),
                    agents,
                    error: Some(format!("{error:#}")),
                    ..FanoutResult::default()
                },
                ..SealStep::default()
            },
        };
        eprintln!(
            "[bench]   latency {:?}, lost {}, not opened {}, broker cpu/version {:.2} ms (kernel {:.2}), load {:.2} ms{}",
            step.fanout.latency_ms,
            step.fanout.lost,
            step.not_opened,
            step.fanout.server_cpu_ms_per_update,
            step.fanout.server_system_ms_per_update,
            step.fanout.agents_cpu_ms_per_update,
            step.fanout
                .error
                .as_deref()
                .map(|e| format!(", error: {e}"))
                .unwrap_or_default()
        );
        comparison.steps.push(step);
    }
    let of = |mode: Sealing| {
        let steps: Vec<&SealStep> = comparison
            .steps
            .iter()
            .filter(|s| s.mode == mode.label())
            .collect();
        (!steps.is_empty()).then(|| SealMode::of(steps.into_iter(), agents))
    };
    comparison.off = of(Sealing::Off);
    comparison.relay = of(Sealing::Relay);
    comparison.on = of(Sealing::On);
    comparison.compute_ratios();
    comparison
}

async fn seal_step(
    config: &BenchConfig,
    tokens: &Tokens,
    tls: Option<&TlsMaterial>,
    index: usize,
    agents: usize,
    key: &SealKey,
    mode: Sealing,
) -> Result<SealStep> {
    let port = port(config, index, 0);
    let server = start_broker(config, tokens, port, tls).await?;
    let pid = server.pid();
    let outcome = async {
        let mut grpc = GrpcPeer::connect_sealed(
            &url_of(port, tls.is_some()),
            CLUSTER,
            &tokens.publisher,
            &tokens.agent,
            tls.map(|m| m.ca.clone()),
            0,
            Some((key.clone(), mode)),
        )
        .await
        .context("publisher")?;
        let (mut result, connected) = fanout(config, &mut grpc, pid, agents).await?;
        result.peer = format!("credstream, sealing {}", mode.label());
        let (seals, sealing) = grpc.seals();
        let not_opened = grpc.not_opened();
        drop(connected);
        Ok(SealStep {
            mode: mode.label().into(),
            round: 0,
            fanout: result,
            not_opened,
            publisher_seals: seals,
            publisher_seal_us_per_version: if seals > 0 {
                sealing.as_secs_f64() * 1e6 / seals as f64
            } else {
                0.0
            },
        })
    }
    .await;
    server.stop().await;
    outcome
}

/// CPU time of the calling thread so far (`CLOCK_THREAD_CPUTIME_ID`,
/// which the kernel brings up to date on every read; the scheduler's
/// `/proc/thread-self/schedstat` only moves at ticks and context switches).
fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// The thread CPU time `f` takes.
fn timed(mut f: impl FnMut()) -> Duration {
    let before = thread_cpu();
    f();
    thread_cpu().saturating_sub(before)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Versions per pass of [`open_cost`]: each pass gives one fresh `Gate` a
/// run of strictly newer sealed versions, as one agent sees them.
const OPEN_BATCH: usize = 500;

/// What one version costs the publisher (one seal) and one agent (one
/// decode, with and without opening), measured on this thread in a tight
/// loop over `iterations` versions per mode, alternating the modes in
/// passes of [`OPEN_BATCH`]; each figure is the median over the passes.
///
/// The payload is the bench's real credential sealed by
/// `credstream_proto::seal`, encoded as the `SubscribeResponse` the broker
/// sends (without the 5-byte gRPC prefix). Off: decode it and read the
/// round. On: decode it, `Gate::admit` it (open with ChaCha20-Poly1305,
/// decode the sealed credential, check the clear metadata and the
/// sequence), read the round from the opened credential.
pub fn open_cost(key: &SealKey, iterations: usize) -> Result<OpenCost> {
    let batch = OPEN_BATCH.min(iterations.max(1));
    let passes = iterations.div_ceil(batch).max(1);
    let response = |update| {
        SubscribeResponse {
            message: Some(subscribe_response::Message::Credential(update)),
        }
        .encode_to_vec()
    };
    let mut clear_batch = Vec::with_capacity(batch);
    let mut sealed_batch = Vec::with_capacity(batch);
    for i in 0..batch {
        let round = i as u64 + 1;
        let mut clear = payload::credential(round);
        let mut sealed = seal_credential(key, &clear, round).context("seal")?;
        // The broker assigns versions, increasing.
        clear.version = round;
        sealed.version = round;
        clear_batch.push(response(clear));
        sealed_batch.push(response(sealed));
    }
    let credentials: Vec<_> = (0..batch as u64)
        .map(|i| payload::credential(i + 1))
        .collect();

    let mut decode = Vec::with_capacity(passes);
    let mut decode_open = Vec::with_capacity(passes);
    let mut seal = Vec::with_capacity(passes);
    let per_version = |d: Duration| d.as_secs_f64() * 1e6 / batch as f64;
    for pass in 0..passes {
        let mut rounds = 0u64;
        let off = timed(|| {
            for bytes in &clear_batch {
                let response = SubscribeResponse::decode(bytes.as_slice()).expect("decodes");
                if let Some(subscribe_response::Message::Credential(update)) = response.message {
                    rounds += payload::round_of(&update).unwrap_or(0);
                }
            }
        });
        let gate = Gate::new(Some(key.clone()));
        let mut opened = 0usize;
        let on = timed(|| {
            for bytes in &sealed_batch {
                let response = SubscribeResponse::decode(bytes.as_slice()).expect("decodes");
                let Some(message) = response.message else {
                    continue;
                };
                if let Some(subscribe_response::Message::Credential(update)) = gate.admit(message) {
                    rounds += payload::round_of(&update).unwrap_or(0);
                    opened += 1;
                }
            }
        });
        if opened != batch || gate.refused() != 0 {
            bail!(
                "the gate let {opened} of {batch} sealed versions through in pass {pass}: {:?}",
                gate.last_refusal()
            );
        }
        let base = (pass * batch) as u64 * 1_000_000;
        let sealing = timed(|| {
            for (i, credential) in credentials.iter().enumerate() {
                black_box(seal_credential(key, credential, base + i as u64).expect("seals"));
            }
        });
        black_box(rounds);
        decode.push(per_version(off));
        decode_open.push(per_version(on));
        seal.push(per_version(sealing));
    }
    let decode_us = median(&mut decode);
    let decode_open_us = median(&mut decode_open);
    Ok(OpenCost {
        versions_per_pass: batch,
        passes,
        decode_us,
        decode_open_us,
        open_us: decode_open_us - decode_us,
        seal_us: median(&mut seal),
        clear_bytes: clear_batch[0].len(),
        sealed_bytes: sealed_batch[0].len(),
        clock: "thread CPU time".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_rotates_the_modes() {
        use Sealing::{Off, On, Relay};
        let modes: Vec<Sealing> = order(&[Off, Relay, On], 3)
            .iter()
            .map(|(_, m)| *m)
            .collect();
        assert_eq!(modes, [Off, Relay, On, Relay, On, Off, On, Off, Relay]);
        let rounds: Vec<usize> = order(&[Off, On], 2).iter().map(|(r, _)| *r).collect();
        assert_eq!(rounds, [0, 0, 1, 1]);
        assert!(order(&[Off, On], 0).is_empty());
    }

    #[test]
    fn opening_costs_something_and_every_version_opens() {
        let cost = open_cost(&SealKey::generate(CLUSTER), 200).expect("measured");
        assert_eq!((cost.versions_per_pass, cost.passes), (200, 1));
        assert!(cost.decode_open_us > 0.0 && cost.seal_us > 0.0, "{cost:?}");
        assert!(cost.sealed_bytes > cost.clear_bytes, "{cost:?}");
    }
}
