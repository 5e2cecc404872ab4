//! A hostile relay: a real gRPC `AgentService` between agents and a broker
//! that forwards everything both ways, records what the broker sent per
//! cluster, and sends agents whatever a test tells it to (a tampered copy
//! of a recorded update, another cluster's update, a plaintext one), the
//! way a compromised broker or a man in the middle would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use credstream_proto::v1::agent_service_client::AgentServiceClient;
use credstream_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use credstream_proto::v1::{
    SubscribeRequest, SubscribeResponse, subscribe_request, subscribe_response,
};
use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status, Streaming};

type Downstream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[derive(Clone)]
struct Relay {
    upstream: Channel,
    /// Every message the broker sent, per cluster, in order.
    recorded: Arc<Mutex<HashMap<String, Vec<subscribe_response::Message>>>>,
    inject: broadcast::Sender<(String, subscribe_response::Message)>,
}

/// A running relay. Dropping it stops serving.
pub struct HostileRelay {
    /// `http://127.0.0.1:PORT`, for agents' `--broker`.
    pub url: String,
    relay: Relay,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HostileRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HostileRelay {
    /// A relay in front of the broker at `upstream` (`http://…`).
    pub async fn start(upstream: &str) -> HostileRelay {
        let channel = Channel::from_shared(upstream.to_owned())
            .expect("upstream url")
            .connect_lazy();
        let (inject, _) = broadcast::channel(64);
        let relay = Relay {
            upstream: channel,
            recorded: Arc::default(),
            inject,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr: SocketAddr = listener.local_addr().expect("relay address");
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let service = AgentServiceServer::new(relay.clone());
        let task = tokio::spawn(async move {
            let _ = Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
        });
        HostileRelay {
            url: format!("http://{addr}"),
            relay,
            task,
        }
    }

    /// What the broker sent to agents of `cluster` so far, in order
    /// (snapshots included).
    pub fn recorded(&self, cluster: &str) -> Vec<subscribe_response::Message> {
        self.relay
            .recorded
            .lock()
            .unwrap()
            .get(cluster)
            .cloned()
            .unwrap_or_default()
    }

    /// Sends `message` to every agent of `cluster` connected through the
    /// relay, as if the broker had sent it.
    pub fn inject(&self, cluster: &str, message: subscribe_response::Message) {
        self.relay
            .inject
            .send((cluster.to_owned(), message))
            .expect("an agent is connected through the relay");
    }
}

#[tonic::async_trait]
impl AgentService for Relay {
    type SubscribeStream = Downstream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let metadata = request.metadata().clone();
        let mut from_agent = request.into_inner();
        let hello = from_agent
            .message()
            .await?
            .ok_or_else(|| Status::failed_precondition("no hello"))?;
        let Some(subscribe_request::Message::Hello(ref h)) = hello.message else {
            return Err(Status::failed_precondition("hello first"));
        };
        let cluster = h.cluster_id.clone();
        let (up_tx, up_rx) = tokio::sync::mpsc::channel(16);
        up_tx.send(hello).await.expect("queue the hello");
        tokio::spawn(async move {
            while let Ok(Some(message)) = from_agent.message().await {
                if up_tx.send(message).await.is_err() {
                    break;
                }
            }
        });
        let upward = tokio_stream::wrappers::ReceiverStream::new(up_rx);
        let mut upstream_request = Request::new(upward);
        for name in ["authorization", "x-credstream-cluster"] {
            if let Some(value) = metadata.get(name) {
                upstream_request.metadata_mut().insert(name, value.clone());
            }
        }
        let mut client = AgentServiceClient::new(self.upstream.clone());
        let from_broker = client.subscribe(upstream_request).await?.into_inner();
        let recorded = self.recorded.clone();
        let key = cluster.clone();
        let relayed = from_broker.map(move |item| {
            if let Ok(response) = &item
                && let Some(message) = &response.message
            {
                recorded
                    .lock()
                    .unwrap()
                    .entry(key.clone())
                    .or_default()
                    .push(message.clone());
            }
            item
        });
        let injected = tokio_stream::wrappers::BroadcastStream::new(self.inject.subscribe())
            .filter_map(move |item| {
                let cluster = cluster.clone();
                async move {
                    match item {
                        Ok((target, message)) if target == cluster => Some(Ok(SubscribeResponse {
                            message: Some(message),
                        })),
                        _ => None,
                    }
                }
            });
        let merged = futures::stream::select(relayed, injected);
        Ok(Response::new(Box::pin(merged)))
    }
}
