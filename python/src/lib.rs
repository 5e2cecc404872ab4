//! `credstream-python`: the Rust half of the `credstream` Python package.
//!
//! - [`publisher`] — [`publisher::Publisher`]: `credstream publish` as an
//!   object. The same broker checks and `fix:` messages (the CLI's own
//!   `cli/broker.rs` and `cli/identity.rs`, compiled in here), the same
//!   minters and [`credstream_client::session::PublishSession`], on a tokio
//!   runtime the object owns; sealing with the cluster's key as the CLI
//!   does (its `cli/seal_key.rs`, compiled in here too), and
//!   [`publisher::cluster_seal_key`] for the Dask plugin, which carries the
//!   key to the workers' agents. Plain Rust, tested by `cargo test` without
//!   Python.
//! - `module` (feature `python`) — the PyO3 module
//!   `credstream._credstream` over it: argument conversion, the GIL released
//!   around every blocking call, errors as Python exception classes.
//!
//! The Python package itself (`credstream/`, `credstream/dask.py`) and the
//! wheel (with the `credstream` and `credstream-agent` commands) are built
//! by `scripts/wheel.sh`; see the README's "From Python and Dask".
#![warn(missing_docs)]

/// The CLI's broker connection and its error messages with the fix
/// (`credstream publish` and `Publisher` say the same things).
#[allow(dead_code, missing_docs)]
#[path = "../../client/src/cli/broker.rs"]
mod broker;
/// The CLI's minters from the identity options, and which have local
/// credentials.
#[allow(dead_code, missing_docs)]
#[path = "../../client/src/cli/identity.rs"]
mod identity;
/// The CLI's seal key resolution: the cluster's key (created on first use)
/// that `credstream publish` seals with, and the line saying so.
#[allow(dead_code, missing_docs)]
#[path = "../../client/src/cli/seal_key.rs"]
mod seal_key;

pub mod publisher;

#[cfg(feature = "python")]
mod module;
