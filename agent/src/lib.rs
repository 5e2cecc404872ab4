//! `credstream-agent`: the worker side of credstream.
//!
//! - [`store`]: the latest credentials and private env, with the version and
//!   expiry rules; every other module reads it.
//! - [`subscription`]: the `Subscribe` stream loop: hello, snapshot, updates,
//!   acks, refresh hints, reconnect with backoff.
#![warn(missing_docs)]

pub mod store;
pub mod subscription;
