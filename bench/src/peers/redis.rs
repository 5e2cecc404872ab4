//! Redis pub/sub: one pub/sub connection per agent; publishing is one
//! PUBLISH on a separate connection.

use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use redis::aio::MultiplexedConnection;
use tokio::task::JoinHandle;

use super::Peer;
use crate::payload;
use crate::recorder::Recorder;

const CHANNEL: &str = "credstream-bench.credential";

/// A Redis server under test.
pub struct RedisPeer {
    client: redis::Client,
    publisher: MultiplexedConnection,
}

impl std::fmt::Debug for RedisPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPeer").finish_non_exhaustive()
    }
}

impl RedisPeer {
    /// Connects the publisher to `url` (`redis://127.0.0.1:PORT/`, or
    /// `rediss://` with `ca_pem`, against which every connection verifies
    /// the server).
    pub async fn connect(url: &str, ca_pem: Option<Vec<u8>>) -> Result<Self> {
        let client = match ca_pem {
            None => redis::Client::open(url),
            Some(ca) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca),
                },
            ),
        }
        .context("Redis URL")?;
        let publisher = client
            .get_multiplexed_async_connection()
            .await
            .context("Redis publisher")?;
        Ok(Self { client, publisher })
    }
}

impl Peer for RedisPeer {
    async fn connect_agent(&self, index: usize, recorder: Arc<Recorder>) -> Result<JoinHandle<()>> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok(tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                if let Some(round) = payload::round_of_bytes(message.get_payload_bytes()) {
                    recorder.record(index, round);
                }
            }
        }))
    }

    async fn publish(&mut self, round: u64) -> Result<()> {
        let _receivers: i64 = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(payload::encoded(round))
            .query_async(&mut self.publisher)
            .await?;
        Ok(())
    }
}
