//! `credstream`: the user side of credstream.
//!
//! - [`connect_failure`] — why a connection to the broker failed, by the
//!   types in the error's source chain.
//! - [`env`] — the private environment (`--env KEY=VALUE`, `--env-file F`),
//!   parsed and validated before it is sent.
//! - [`mint`] — one [`mint::Minter`] per credential kind.
//! - [`seal`] — sealed delivery: the cluster's seal key on disk and the
//!   [`seal::Sealer`] the session seals with.
//! - [`session`] — the `Publish` stream loop: hello, publishing credentials and
//!   the private env, answering refresh requests, reconnecting.
//! - [`whoami`] — which AWS identity and GCP principal would be forwarded.
#![warn(missing_docs)]

pub mod connect_failure;
pub mod env;
pub mod mint;
pub mod seal;
pub mod session;
pub mod whoami;
