//! The `credstream.v1` API.
//!
//! - [`v1`]: the generated messages and the client and server stubs of
//!   `PublisherService`, `AgentService` and `AdminService`.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server
//!   reflection.
//! - `secret`: hand-written `Debug` (lengths, never values) and zeroize-on-drop
//!   for every message that carries a secret.
//! - [`connect`] — reaching the broker (plaintext rule, TLS, bearer token,
//!   routing header), shared by the client and the agent.
//! - [`codec`] — the stubs' codec: undecodable messages are
//!   `INVALID_ARGUMENT`, not `INTERNAL`.
//! - [`join`] — join strings (address, token, pinned broker keys) and the
//!   rustls verifier that pins the broker's key.
//! - [`convert`] — small helpers between the generated types and `SystemTime`.
//! - [`kind`] — [`kind::PerKind`], one value per credential kind, so that
//!   code looks a kind up instead of matching on it.
//! - [`rules`] — what the publisher, the broker and the agent must apply
//!   alike: env limits and names, backoff, which codes are retried.
//! - `seal` (feature `seal`) — sealed delivery: the one implementation of the
//!   construction in `docs/sealing.md`, used by the client to seal and by the
//!   agent to open.

pub mod codec;
pub mod connect;
pub mod convert;
pub mod join;
pub mod kind;
pub mod rules;
#[cfg(feature = "seal")]
pub mod seal;
mod secret;

/// The generated `credstream.v1` package.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("credstream.v1");
}

/// Encoded `FileDescriptorSet` of `credstream.v1` (and its imports), for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/credstream_descriptor.bin"));
