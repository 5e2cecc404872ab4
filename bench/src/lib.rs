//! `credstream-bench`: fan-out to many agents, measured side by side with
//! etcd watch, NATS core pub/sub, Redis pub/sub and a minimal tonic fan-out.
//!
//! Every server runs as its own process on 127.0.0.1; this process is the
//! one load generator for all of them, so each latency includes the
//! receiving side's work on the same two cores.
//!
//! - [`payload`]: the ≈1.5 KB credential every peer carries, and how a
//!   receiver reads the round number back out of it.
//! - [`recorder`]: per-agent receipt times of one publish, lock-free.
//! - [`procstat`]: RSS and CPU time of a server process from `/proc`.
//! - [`servers`]: starting and stopping the server processes by PID.
//! - [`peers`]: one subscriber/publisher pair per system under test.
//! - [`floor`]: the minimal tonic fan-out (a `watch` channel, nothing else)
//!   served by the `credstream-bench-floor` binary.
//! - [`agent_http`]: keep-alive load on the agent's `/aws/credentials`.
//! - [`tls`]: the CA and server certificate of a TLS run.
//! - [`storm`]: the reconnect storm: N agent streams, the broker restarted.
//! - [`sealing`]: sealing on against off, and what one open costs an agent.
//! - [`report`]: results, targets, the table and the JSON.
//! - [`run`]: the whole benchmark, driven by a [`run::BenchConfig`].
#![warn(missing_docs)]

pub mod agent_http;
pub mod floor;
pub mod payload;
pub mod peers;
pub mod procstat;
pub mod recorder;
pub mod report;
pub mod run;
pub mod sealing;
pub mod servers;
pub mod storm;
pub mod tls;
