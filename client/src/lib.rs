//! `credstream`: the user side of credstream.
//!
//! - [`broker`] — reaching the broker as a publisher: the checked address,
//!   an eager admin connection, and errors that name the fix.
//! - [`connect_failure`] — why a connection to the broker failed, by the
//!   types in the error's source chain.
//! - [`env`] — the private environment (`--env KEY=VALUE`, `--env-file F`),
//!   parsed and validated before it is sent.
//! - [`identity`] — the minters from what the user asked for, and which of
//!   them have local credentials.
//! - [`mint`] — one [`mint::Minter`] per credential kind.
//! - [`seal`] — sealed delivery: the cluster's seal key on disk and the
//!   [`seal::Sealer`] the session seals with.
//! - [`seal_key`] — which seal key a publisher uses, and whether it seals.
//! - [`session`] — the `Publish` stream loop: hello, publishing credentials and
//!   the private env, answering refresh requests, reconnecting.
//! - [`whoami`] — which AWS identity and GCP principal would be forwarded.
#![warn(missing_docs)]

pub mod broker;
pub mod connect_failure;
pub mod env;
pub mod identity;
pub mod mint;
pub mod seal;
pub mod seal_key;
pub mod session;
pub mod whoami;
