//! etcd: one client (its own gRPC connection) and one watch per agent on a
//! single key; publishing is a put of the encoded credential. The client is
//! generated from the subset of etcd's v3 API in `bench/proto/` (see
//! `build.rs`).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::Peer;
use crate::payload;
use crate::recorder::Recorder;

/// The generated etcd v3 subset.
#[allow(missing_docs, clippy::all)]
mod pb {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

use pb::etcdserverpb::kv_client::KvClient;
use pb::etcdserverpb::watch_client::WatchClient;
use pb::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, watch_request};

const KEY: &[u8] = b"credstream-bench/credential";

/// etcd under test.
#[derive(Debug)]
pub struct EtcdPeer {
    endpoint: Endpoint,
    publisher: KvClient<Channel>,
}

impl EtcdPeer {
    /// Connects the publisher to `url` and puts round 0; over TLS
    /// (`https://`) every connection verifies the server against `ca_pem`.
    pub async fn connect(url: &str, ca_pem: Option<Vec<u8>>) -> Result<Self> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())?;
        if let Some(ca) = ca_pem {
            endpoint = endpoint.tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .domain_name("127.0.0.1"),
            )?;
        }
        let channel = endpoint.connect().await.context("etcd publisher")?;
        let mut peer = Self {
            endpoint,
            publisher: KvClient::new(channel),
        };
        peer.put(0).await?;
        Ok(peer)
    }

    async fn put(&mut self, round: u64) -> Result<()> {
        self.publisher
            .put(PutRequest {
                key: KEY.to_vec(),
                value: payload::encoded(round),
                ..Default::default()
            })
            .await
            .context("etcd put")?;
        Ok(())
    }
}

impl Peer for EtcdPeer {
    async fn connect_agent(&self, index: usize, recorder: Arc<Recorder>) -> Result<JoinHandle<()>> {
        // A connection of its own per agent, as etcd clients have.
        let channel = self.endpoint.clone().connect().await?;
        let mut client = WatchClient::new(channel);
        let (requests, rx) = mpsc::channel(1);
        requests
            .send(WatchRequest {
                request_union: Some(watch_request::RequestUnion::CreateRequest(
                    WatchCreateRequest {
                        key: KEY.to_vec(),
                        ..Default::default()
                    },
                )),
            })
            .await?;
        let mut stream = client.watch(ReceiverStream::new(rx)).await?.into_inner();
        match stream.message().await? {
            Some(response) if response.created => {}
            other => bail!("etcd did not confirm the watch: {other:?}"),
        }
        Ok(tokio::spawn(async move {
            // The request side lives as long as the task: dropping it ends
            // the watch.
            let _keep = requests;
            while let Ok(Some(response)) = stream.message().await {
                for event in &response.events {
                    if let Some(round) = event
                        .kv
                        .as_ref()
                        .and_then(|kv| payload::round_of_bytes(&kv.value))
                    {
                        recorder.record(index, round);
                    }
                }
            }
        }))
    }

    async fn publish(&mut self, round: u64) -> Result<()> {
        self.put(round).await
    }
}
