//! The `credstream` subcommands.
//!
//! - [`broker`]: the library's broker connection
//!   ([`credstream_client::broker`]), its errors as the command's.
//! - [`identity`]: `whoami`; the minters from flags are
//!   [`credstream_client::identity`]'s.
//! - [`publish`]: `credstream publish`, the long-running publisher.
//! - [`seal_key`]: `credstream seal-key`; the key `publish` seals with is
//!   [`credstream_client::seal_key`]'s.
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
