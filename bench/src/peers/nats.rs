//! NATS core pub/sub: one connection and one subscription per agent;
//! publishing is a publish plus a flush.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::StreamExt;
use tokio::task::JoinHandle;

use super::Peer;
use crate::payload;
use crate::recorder::Recorder;

const SUBJECT: &str = "credstream-bench.credential";

/// A NATS server under test.
#[derive(Debug)]
pub struct NatsPeer {
    url: String,
    ca: Option<PathBuf>,
    publisher: async_nats::Client,
}

impl NatsPeer {
    /// Connects the publisher to `url`; with `ca`, every connection
    /// requires TLS and verifies the server against that CA file.
    pub async fn connect(url: &str, ca: Option<PathBuf>) -> Result<Self> {
        let publisher = options(ca.as_ref())
            .connect(url)
            .await
            .context("NATS publisher")?;
        Ok(Self {
            url: url.to_owned(),
            ca,
            publisher,
        })
    }
}

fn options(ca: Option<&PathBuf>) -> async_nats::ConnectOptions {
    let options = async_nats::ConnectOptions::new();
    match ca {
        Some(ca) => options.require_tls(true).add_root_certificates(ca.clone()),
        None => options,
    }
}

impl Peer for NatsPeer {
    async fn connect_agent(&self, index: usize, recorder: Arc<Recorder>) -> Result<JoinHandle<()>> {
        let client = options(self.ca.as_ref()).connect(self.url.as_str()).await?;
        let mut subscriber = client.subscribe(SUBJECT).await?;
        // The PONG proves the server processed the SUB.
        client.flush().await?;
        Ok(tokio::spawn(async move {
            let _keep = client;
            while let Some(message) = subscriber.next().await {
                if let Some(round) = payload::round_of_bytes(&message.payload) {
                    recorder.record(index, round);
                }
            }
        }))
    }

    async fn publish(&mut self, round: u64) -> Result<()> {
        self.publisher
            .publish(SUBJECT, payload::encoded(round).into())
            .await?;
        self.publisher.flush().await?;
        Ok(())
    }
}
