//! `credstream`: the user side of credstream.
//!
//! - [`mint`]: one [`mint::Minter`] per credential kind.
//! - [`session`]: the `Publish` stream loop: hello, publishing credentials and
//!   the private env, answering refresh requests, reconnecting.
#![warn(missing_docs)]

pub mod mint;
pub mod session;
