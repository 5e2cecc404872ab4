//! The `credstream` subcommands.
//!
//! - [`broker`]: the broker address from flags, connecting, and error
//!   messages that name the fix (token, reachability, TLS).
//! - [`identity`]: the minters from flags, and `whoami`.
//! - [`publish`]: `credstream publish`, the long-running publisher.
//! - [`seal_key`]: `credstream seal-key`, and the key `publish` seals with.
//! - [`status`]: `credstream status`, `AdminService.GetCluster` for people.
//! - [`output`]: event lines, the live agent count on a terminal, times.
//! - [`access`]: "workers keep access until …" and the warning before it.

pub mod access;
pub mod broker;
pub mod identity;
pub mod output;
pub mod publish;
pub mod seal_key;
pub mod status;
