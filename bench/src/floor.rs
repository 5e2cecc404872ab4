//! The floor: the least a tonic server can do to fan a value out — one
//! `watch` channel holding the latest credential, each Subscribe stream a
//! `WatchStream` over it that encodes the message for itself, default
//! server settings, no auth, no acks kept, no versions checked. It speaks
//! credstream's services so that the same client measures both. Over TLS
//! it uses the broker's own rustls configuration
//! ([`credstream_broker::tls::acceptor`]), so the two differ above TLS only.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use credstream_proto::v1::agent_service_server::{AgentService, AgentServiceServer};
use credstream_proto::v1::publisher_service_server::{PublisherService, PublisherServiceServer};
use credstream_proto::v1::{
    ClusterSnapshot, CredentialUpdate, PublishRequest, PublishResponse, PublisherWelcome,
    SubscribeRequest, SubscribeResponse, publish_request, publish_response, subscribe_response,
};
use futures::{Stream, StreamExt};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream, WatchStream};
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};

type Latest = Option<Arc<CredentialUpdate>>;

/// The minimal fan-out service.
#[derive(Clone, Debug)]
pub struct Floor {
    latest: Arc<watch::Sender<Latest>>,
    version: Arc<AtomicU64>,
}

impl Default for Floor {
    fn default() -> Self {
        Self {
            latest: Arc::new(watch::Sender::new(None)),
            version: Arc::new(AtomicU64::new(0)),
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl PublisherService for Floor {
    type PublishStream = BoxStream<PublishResponse>;

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let mut inbound = request.into_inner();
        let floor = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(publish_request::Message::Credential(mut update)) = message.message {
                    update.version = floor.version.fetch_add(1, Ordering::AcqRel) + 1;
                    floor.latest.send_replace(Some(Arc::new(update)));
                }
            }
        });
        let welcome = PublishResponse {
            message: Some(publish_response::Message::Welcome(
                PublisherWelcome::default(),
            )),
        };
        Ok(Response::new(Box::pin(
            futures::stream::once(async { Ok(welcome) }).chain(futures::stream::pending()),
        )))
    }
}

#[tonic::async_trait]
impl AgentService for Floor {
    type SubscribeStream = BoxStream<SubscribeResponse>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        // Read (and drop) whatever the agent sends.
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let mut first = true;
        let stream = WatchStream::new(self.latest.subscribe()).map(move |latest| {
            let message = if std::mem::take(&mut first) {
                subscribe_response::Message::Snapshot(ClusterSnapshot {
                    version: latest.as_ref().map_or(0, |u| u.version),
                    credentials: latest.iter().map(|u| (**u).clone()).collect(),
                    ..Default::default()
                })
            } else {
                match latest {
                    Some(update) => subscribe_response::Message::Credential((*update).clone()),
                    None => subscribe_response::Message::Snapshot(ClusterSnapshot::default()),
                }
            };
            Ok(SubscribeResponse {
                message: Some(message),
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves the floor on `listener` until the process ends; with `tls`,
/// each connection's TLS handshake runs in a task of its own (as the
/// broker's accept loop does) and tonic gets the TLS streams.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
) -> Result<(), tonic::transport::Error> {
    let floor = Floor::default();
    let server = Server::builder()
        .add_service(PublisherServiceServer::new(floor.clone()))
        .add_service(AgentServiceServer::new(floor));
    match tls {
        None => {
            server
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
        }
        Some(acceptor) => {
            let (tx, rx) = mpsc::channel::<std::io::Result<TlsStream<TcpStream>>>(1024);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        if let Ok(Ok(tls)) =
                            tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                                .await
                        {
                            let _ = tx.send(Ok(tls)).await;
                        }
                    });
                }
            });
            server.serve_with_incoming(ReceiverStream::new(rx)).await
        }
    }
}
