//! `credstream-broker`: per-cluster credential state, fan-out and refresh.
//!
//! - [`hub`] — the registry of clusters; per cluster its latest state (a
//!   `watch` per cluster), the agent tally, the publisher slot and the
//!   planner's task.
//! - [`agent_wire`] — agent-bound messages as gRPC frames; a credential is
//!   framed once per version and shared by every agent stream.
//! - [`bell`] — wakes a cluster's agent streams when its state changes.
//! - [`refresh`] — the refresh planner — when to ask the publisher for a new
//!   credential, single flight, retries with backoff.
//! - [`audit`] — the JSON-lines audit trail of `--audit-log`: bounded
//!   refusal records, a queue and a writer thread of its own.
//! - [`auth`] — signed bearer tokens and the gate that checks them.
//! - [`stream_token`] — a stream's token while the stream lasts: expiry,
//!   key removal, renewal.
//! - [`gate`] — the tower layer that admits or refuses each new call.
//! - [`limits`] — bounds and checks on every input.
//! - [`rate_limit`] — per-connection and per-token limits on new calls (two
//!   gates, around authentication).
//! - [`metrics`] — the Prometheus endpoint of `--metrics-listen`.
//! - [`service`] — the thin gRPC services (publisher, agent, admin).
//! - [`connections`] — the accept loop: descriptor limit, connection cap,
//!   handshake deadline, back-off on exhaustion.
//! - [`state_dir`] — a state directory: key ring, self-signed TLS pair, join strings.
//! - [`tls`] — the rustls server configuration.
//! - [`serving`] — hyper's HTTP/2 server, each connection and its streams
//!   polled in one task.
//! - [`server`] — the gRPC server: services, layers, health, reflection,
//!   shutdown.
#![warn(missing_docs)]

pub mod agent_wire;
pub mod audit;
pub mod auth;
pub mod bell;
pub mod connections;
pub mod gate;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod rate_limit;
pub mod refresh;
pub mod server;
pub mod service;
pub mod serving;
pub mod state_dir;
pub mod stream_token;
pub mod tls;

// The integration tests' certificates, shared with the unit tests; the file
// names the crate as its integration tests do.
#[cfg(test)]
extern crate self as credstream_broker;
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/common/tls.rs"]
mod test_pki;
