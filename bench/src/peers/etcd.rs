//! etcd: one client (its own gRPC connection) and one watch per agent on a
//! single key; publishing is a put of the encoded credential.

use std::sync::Arc;

use anyhow::{Context, Result};
use etcd_client::Client;
use tokio::task::JoinHandle;

use super::Peer;
use crate::payload;
use crate::recorder::Recorder;

const KEY: &str = "credstream-bench/credential";

/// etcd under test.
pub struct EtcdPeer {
    url: String,
    publisher: Client,
}

impl std::fmt::Debug for EtcdPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdPeer").field("url", &self.url).finish()
    }
}

impl EtcdPeer {
    /// Connects the publisher to `url` and puts round 0.
    pub async fn connect(url: &str) -> Result<Self> {
        let mut publisher = Client::connect([url], None)
            .await
            .context("etcd publisher")?;
        publisher.put(KEY, payload::encoded(0), None).await?;
        Ok(Self {
            url: url.to_owned(),
            publisher,
        })
    }
}

impl Peer for EtcdPeer {
    async fn connect_agent(&self, index: usize, recorder: Arc<Recorder>) -> Result<JoinHandle<()>> {
        let mut client = Client::connect([self.url.as_str()], None).await?;
        let (watcher, mut stream) = client.watch(KEY, None).await?;
        Ok(tokio::spawn(async move {
            // Both halves live as long as the task: dropping them cancels.
            let _keep = (client, watcher);
            while let Ok(Some(response)) = stream.message().await {
                for event in response.events() {
                    if let Some(round) = event
                        .kv()
                        .and_then(|kv| payload::round_of_bytes(kv.value()))
                    {
                        recorder.record(index, round);
                    }
                }
            }
        }))
    }

    async fn publish(&mut self, round: u64) -> Result<()> {
        self.publisher
            .put(KEY, payload::encoded(round), None)
            .await?;
        Ok(())
    }
}
