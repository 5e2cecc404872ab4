//! `credstream-agent`: the worker side of credstream.
//!
//! - [`agent`] — the parts below assembled into one running agent:
//!   [`AgentConfig`] (plain data), [`Agent::start`] → a handle (`store`,
//!   `endpoints`, `failure`, `stop`), and [`run`]`(config, shutdown)`, so a
//!   test or another front end runs an agent in its own process; the binary
//!   (`src/main.rs`) adds only flags, the process hardening and signals.
//! - [`store`] — the latest credentials and private env, with the version and
//!   expiry rules; every other module reads it.
//! - [`seal`] — sealed delivery: opening what the publisher sealed, and
//!   refusing everything else, before the store applies it.
//! - [`refusals`] — what the agent refused from the broker: counted, the
//!   last reason kept, logged in bounded text at a bounded rate.
//! - [`sequences`] — the state file: the highest sealed sequences accepted,
//!   kept across restarts.
//! - [`served`] — how many local requests each version served, logged as
//!   each version retires (the agent's half of the audit trail).
//! - [`subscription`] — the `Subscribe` stream loop: hello, snapshot, updates,
//!   acks, refresh hints, reconnect with backoff.
//! - [`http`] — the loopback listener user processes reach: the AWS container
//!   credential endpoint, the GCE metadata emulation, `/env` and `/readyz`;
//!   and [`http::LocalEndpoints::child_env`], the variables that point a
//!   process at them.
//! - [`env_file`] — the env file (mode 0600, rewritten atomically on every
//!   change) for shells and systemd units.
//! - [`hardening`] — the agent's own process: non-dumpable, the broker token
//!   out of its arguments and environment, a raised descriptor limit.
//! - [`exec`] — starting a user command once the agent is ready, forwarding
//!   signals, restarting it when the private env changes.
//! - [`notify`] — systemd's readiness protocol (`READY=1` to
//!   `$NOTIFY_SOCKET`), so a unit ordered after the agent's starts once the
//!   agent is ready.
#![warn(missing_docs)]

pub mod agent;
pub mod env_file;
pub mod exec;
pub mod hardening;
pub mod http;
pub mod notify;
pub mod refusals;
pub mod seal;
pub mod sequences;
pub mod served;
pub mod store;
pub mod subscription;

pub use agent::{Agent, AgentConfig, AgentError, SealKeySource, run};
