//! Per-cluster latest state and its fan-out.
//!
//! - [`registry`] — [`ClusterHub`], the registry of the broker's clusters:
//!   creates a cluster on first use, removes it once idle.
//! - [`cluster`] — [`Cluster`]: one cluster's state and everything that
//!   changes it.
//! - [`state`] — [`ClusterState`], the cluster as agents see it, and
//!   [`SentVersions`], how far one agent stream has got.
//! - [`publisher`] — the publisher slot: takeovers and their hold-down.
//! - [`agents`] — the agent tally behind the publisher's `UpdateAck`.
//! - [`status`] — what a cluster shows of itself (`GetCluster`,
//!   `ListClusters`, metrics), never a secret.
//! - `driver` — the cluster's task: the refresh planner's timer and the
//!   idle cluster's removal.
//!
//! A cluster's state as agents see it is one immutable [`ClusterState`]
//! behind a `watch` channel: publishing replaces it, and every agent stream
//! diffs the newest state against what it already sent. That is the
//! design's "latest value, not a queue": a slow agent skips intermediate
//! versions, nothing is buffered per agent beyond the transport's own
//! window, and a fast agent is never held back by a slow one.
//!
//! Versions are a hybrid clock: each change gets `max(previous + 1, the
//! broker's wall clock in microseconds)`. They increase strictly within a
//! broker's life and keep increasing across a restart (as long as the wall
//! clock does not jump back), so an agent's plain "newer than what I hold"
//! rule accepts what a restarted broker re-publishes.
//!
//! Everything else about a cluster — the publisher slot, the agent tally,
//! the refresh planner — lives in its mutex-protected inner part; the
//! fan-out path takes no lock. Agent streams do not wait on the `watch`
//! itself (its waiter list is one shared lock); each change rings the
//! cluster's [`Bell`](crate::bell::Bell), which wakes every stream through
//! its own atomic waker.
//!
//! Each credential is framed as its agent-bound `SubscribeResponse` once,
//! when it is published, before the cluster lock is taken
//! ([`crate::agent_wire`]); agent streams send those shared bytes
//! ([`SentVersions::catch_up`]) as they are.
//!
//! Clusters end: a cluster with no publisher, no agents and no live
//! credential for the grace period (`RefreshConfig::idle_cluster_grace`) is
//! removed from the hub by its own task, which then ends. A cluster with an
//! agent stream is therefore never removed while the stream lasts. The
//! private env does not keep a cluster alive: a publisher re-sends it on
//! every connect, as after a broker restart. The removal happens under the
//! hub's write lock and only while nothing but the map and the task holds
//! the cluster, so a hello that just looked the cluster up never registers
//! into a removed one.

pub mod agents;
pub mod cluster;
mod driver;
pub mod publisher;
pub mod registry;
pub mod state;
pub mod status;

pub use agents::AgentRegistration;
pub use cluster::Cluster;
pub use publisher::{PublisherEvent, PublisherRegistration};
pub use registry::{ClusterHub, HubConfig};
pub use state::{ClusterState, SentVersions, Slot};
pub use status::{ClusterMetrics, principal_and_account};
