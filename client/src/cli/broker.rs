//! Reaching the broker from the command line: the library's
//! [`credstream_client::broker`] (the address from flags, an eager
//! connection, errors that name the fix), with its errors as the command's
//! `anyhow` errors.

use credstream_proto::connect::BrokerAddress;

pub use credstream_client::broker::{BrokerOptions, connect_admin, get_cluster};

/// The fix for a status the broker answered with
/// ([`credstream_client::broker::status_error`]), as the command's error.
pub fn status_error(address: &BrokerAddress, status: &tonic::Status) -> anyhow::Error {
    credstream_client::broker::status_error(address, status).into()
}
