//! Rules the publisher, the broker and the agent must apply alike, in one
//! place so that they cannot drift apart:
//!
//! - [`env`] — private env limits and the variable name rule;
//! - [`backoff`] — exponential backoff with jitter;
//! - [`retry`] — which gRPC codes end a stream for good and which are
//!   retried;
//! - [`private_file`] — a secret's file (a seal key) is read only if no
//!   other user may access it;
//! - [`token`] — a token from a flag or a file;
//! - [`version`] — how far ahead of its clock an agent accepts a version;
//! - [`text`] — peer-chosen text made safe to print (escapes, a length cap).
//!
//! Each side words its own errors (the broker as gRPC statuses, the client
//! for a person at a terminal); the limits and predicates are these.

pub mod backoff;
pub mod env;
pub mod private_file;
pub mod retry;
pub mod text;
pub mod token;
pub mod version;
