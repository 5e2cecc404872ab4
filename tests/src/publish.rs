//! Reaching a plaintext broker on this machine through the client and
//! agent libraries: the [`BrokerAddress`] they take, and a started
//! [`PublishSession`] publishing what one minter mints.

use std::sync::Arc;

use credstream_client::mint::Minter;
use credstream_client::session::PublishSession;
use credstream_proto::connect::BrokerAddress;

/// The address of the plaintext broker at `url` (`http://127.0.0.1:PORT`)
/// for `cluster`, with `token` of whichever role the caller plays.
pub fn local_address(url: &str, token: &str, cluster: &str) -> BrokerAddress {
    BrokerAddress {
        url: url.into(),
        token: token.into(),
        cluster_id: cluster.into(),
        ca_cert: None,
        client_identity: None,
        insecure: false,
        pins: Vec::new(),
    }
}

/// A started [`PublishSession`] to the plaintext broker at `url`,
/// publishing to `cluster` with the publisher `token` what `minter` mints
/// (unsealed).
pub fn start_publisher(
    url: &str,
    token: &str,
    cluster: &str,
    minter: Arc<dyn Minter>,
) -> PublishSession {
    PublishSession::builder(local_address(url, token, cluster))
        .minter(minter)
        .start()
        .expect("the publish session starts")
}
