//! `credstream-python`: the Rust half of the `credstream` Python package.
//!
//! - [`publisher`] — [`publisher::Publisher`]: `credstream publish` as an
//!   object. The same broker checks and `fix:` messages
//!   ([`credstream_client::broker`]), the same minters
//!   ([`credstream_client::identity`]) and
//!   [`credstream_client::session::PublishSession`] as the CLI, on a tokio
//!   runtime the object owns; sealing with the cluster's key as the CLI
//!   does ([`credstream_client::seal_key`]), and
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

pub mod publisher;

#[cfg(feature = "python")]
mod module;
