//! `AgentService.Subscribe`: the worker's stream. The response is a stream
//! over the cluster's `watch` (no task, no queue per agent): each poll sends
//! whatever is newer than what this agent was sent. A small task reads acks
//! and hints; an agent that half-closes keeps receiving. Dropping the
//! response stream (the agent went away) unregisters the agent.
//!
//! The fan-out path does no per-agent encoding: a credential is encoded once
//! per version by the hub, and [`SubscribeCodec`] writes those shared bytes
//! into each stream as they are. That is why the service is wired by hand
//! here ([`AgentServiceServer`]) instead of with the generated server, whose
//! codec can only encode a `SubscribeResponse` value; the wire format is the
//! same.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use credstream_proto::v1::{
    CredentialKind, SubscribeRequest, SubscribeResponse, subscribe_request, subscribe_response,
};
use futures::Stream;
use prost::Message as _;
use prost::bytes::BufMut;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::hub::{AgentRegistration, CatchUp, ClusterHub, ClusterState, SentVersions};
use crate::limits;

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentServer {
    hub: Arc<ClusterHub>,
    hint_interval: Duration,
}

impl AgentServer {
    /// A service subscribing agents to `hub`; each agent may hint once per
    /// kind per `hint_interval`.
    pub fn new(hub: Arc<ClusterHub>, hint_interval: Duration) -> Self {
        Self { hub, hint_interval }
    }
}

/// The response stream of one agent.
pub type SubscribeStream = Pin<Box<dyn Stream<Item = Result<CatchUp, Status>> + Send>>;

impl AgentServer {
    /// Handles one Subscribe call: the hello, then the agent's stream.
    pub async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<SubscribeStream>, Status> {
        let claims = auth::claims(&request)?;
        let routing = super::routing_cluster(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(super::HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30 seconds"))??;
        let Some(SubscribeRequest {
            message: Some(subscribe_request::Message::Hello(hello)),
        }) = first
        else {
            return Err(Status::failed_precondition(
                "the first message on Subscribe must be a hello (AgentHello) naming the cluster and the agent",
            ));
        };
        limits::check_id("hello.cluster_id", &hello.cluster_id)?;
        limits::check_id("hello.agent_id", &hello.agent_id)?;
        claims.require_cluster(&hello.cluster_id)?;
        super::check_routing(routing.as_deref(), &hello.cluster_id)?;

        let cluster = self.hub.cluster(&hello.cluster_id);
        let registration = Arc::new(cluster.connect_agent(hello.agent_id.clone()));
        tracing::debug!(cluster = %hello.cluster_id, agent = %hello.agent_id, "agent subscribed");
        let mut state = cluster.watch();
        let current = state.borrow_and_update().clone();
        let (fail, failed) = oneshot::channel();
        tokio::spawn(read_agent(
            inbound,
            registration.clone(),
            self.hint_interval,
            fail,
            self.hub.shutdown_signal(),
        ));
        Ok(Response::new(Box::pin(fan_out(
            current,
            state,
            registration,
            failed,
            self.hub.shutdown_signal(),
        ))))
    }
}

struct FanOut {
    state: watch::Receiver<Arc<ClusterState>>,
    sent: SentVersions,
    queue: VecDeque<CatchUp>,
    _registration: Arc<AgentRegistration>,
    failed: Option<oneshot::Receiver<Status>>,
    shutdown: watch::Receiver<bool>,
    done: bool,
}

fn fan_out(
    current: Arc<ClusterState>,
    state: watch::Receiver<Arc<ClusterState>>,
    registration: Arc<AgentRegistration>,
    failed: oneshot::Receiver<Status>,
    shutdown: watch::Receiver<bool>,
) -> impl Stream<Item = Result<CatchUp, Status>> {
    let snapshot = CatchUp::Message(subscribe_response::Message::Snapshot(
        current.snapshot(Instant::now()),
    ));
    let fan_out = FanOut {
        state,
        sent: SentVersions::of(&current),
        queue: VecDeque::from([snapshot]),
        _registration: registration,
        failed: Some(failed),
        shutdown,
        done: false,
    };
    futures::stream::unfold(fan_out, |mut f| async move {
        loop {
            if let Some(message) = f.queue.pop_front() {
                return Some((Ok(message), f));
            }
            if f.done {
                return None;
            }
            enum Woke {
                Shutdown,
                Failed(Option<Status>),
                Changed(bool),
            }
            let woke = tokio::select! {
                biased;
                () = super::shutdown_requested(&mut f.shutdown) => Woke::Shutdown,
                status = async { f.failed.as_mut().expect("guarded").await }, if f.failed.is_some() => {
                    Woke::Failed(status.ok())
                }
                changed = f.state.changed() => Woke::Changed(changed.is_ok()),
            };
            match woke {
                Woke::Shutdown => {
                    f.done = true;
                    return Some((Err(super::shutting_down()), f));
                }
                Woke::Failed(Some(status)) => {
                    f.done = true;
                    return Some((Err(status), f));
                }
                Woke::Failed(None) => {
                    // The reader ended normally (half-close): keep streaming,
                    // but stop polling the finished channel.
                    f.failed = None;
                }
                Woke::Changed(false) => return None,
                Woke::Changed(true) => {
                    let latest = f.state.borrow_and_update().clone();
                    f.sent.catch_up(&latest, Instant::now(), &mut f.queue);
                }
            }
        }
    })
}

async fn read_agent(
    mut inbound: Streaming<SubscribeRequest>,
    registration: Arc<AgentRegistration>,
    hint_interval: Duration,
    fail: oneshot::Sender<Status>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last_hint: [Option<Instant>; 2] = [None, None];
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            () = super::shutdown_requested(&mut shutdown) => return,
        };
        let request = match message {
            Ok(Some(request)) => request,
            Ok(None) => return, // half-closed: keep streaming
            Err(status) => {
                // Undecodable input ends the stream with its status; if the
                // agent is simply gone, nobody reads it.
                let _ = fail.send(status);
                return;
            }
        };
        let result = match request.message {
            Some(subscribe_request::Message::Ack(ack)) => {
                registration.ack(ack.version);
                Ok(())
            }
            Some(subscribe_request::Message::RefreshHint(hint)) => {
                match CredentialKind::try_from(hint.kind) {
                    Ok(kind @ (CredentialKind::Aws | CredentialKind::Gcp)) => {
                        let slot = &mut last_hint[(kind == CredentialKind::Gcp) as usize];
                        let now = Instant::now();
                        if slot.is_none_or(|at| now >= at + hint_interval) {
                            *slot = Some(now);
                            registration.cluster().hint(kind, hint.held_version);
                        }
                        Ok(())
                    }
                    _ => Err(Status::invalid_argument(format!(
                        "refresh_hint.kind holds {}, which is not a credential kind",
                        hint.kind
                    ))),
                }
            }
            Some(subscribe_request::Message::Hello(_)) => Err(Status::failed_precondition(
                "a second hello on the same Subscribe stream",
            )),
            None => Err(Status::invalid_argument(
                "empty SubscribeRequest: set exactly one message",
            )),
        };
        if let Err(status) = result {
            let _ = fail.send(status);
            return;
        }
    }
}

/// Per-stream encode buffer (tonic's default is 8 KiB).
const ENCODE_BUFFER_BYTES: usize = 2 * 1024;
/// Per-stream decode buffer (tonic's default is 8 KiB).
const DECODE_BUFFER_BYTES: usize = 512;

/// The Subscribe codec: decodes `SubscribeRequest`s like the generated
/// codec; encodes a [`CatchUp`] by copying its shared bytes
/// ([`CatchUp::Encoded`]) or by encoding its message as a
/// `SubscribeResponse`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SubscribeCodec;

/// The encoding half of [`SubscribeCodec`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SubscribeEncoder;

/// The decoding half of [`SubscribeCodec`].
#[derive(Clone, Copy, Debug, Default)]
pub struct SubscribeDecoder;

impl Codec for SubscribeCodec {
    type Encode = CatchUp;
    type Decode = SubscribeRequest;
    type Encoder = SubscribeEncoder;
    type Decoder = SubscribeDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        SubscribeEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        SubscribeDecoder
    }
}

impl Encoder for SubscribeEncoder {
    type Item = CatchUp;
    type Error = Status;

    fn encode(&mut self, item: CatchUp, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        match item {
            CatchUp::Encoded(bytes) => dst.put_slice(&bytes),
            CatchUp::Message(message) => SubscribeResponse {
                message: Some(message),
            }
            .encode(dst)
            .map_err(|error| Status::internal(format!("cannot encode a response: {error}")))?,
        }
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Held per stream for its whole life: sized for one credential
        // (about 1.5 KiB) instead of tonic's 8 KiB; a larger snapshot grows
        // it in steps of this size.
        BufferSettings::new(ENCODE_BUFFER_BYTES, 32 * 1024)
    }
}

impl Decoder for SubscribeDecoder {
    type Item = SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SubscribeRequest>, Status> {
        SubscribeRequest::decode(src)
            .map(Some)
            .map_err(|error| Status::internal(error.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        // Agents send acks and hints of a few bytes.
        BufferSettings::new(DECODE_BUFFER_BYTES, 32 * 1024)
    }
}

/// `credstream.v1.AgentService` for the tonic router, with the
/// [`SubscribeCodec`]; it replaces the generated `AgentServiceServer`.
#[derive(Clone, Debug)]
pub struct AgentServiceServer {
    inner: Arc<AgentServer>,
    max_decoding_message_size: Option<usize>,
}

impl AgentServiceServer {
    /// Serves `server`.
    pub fn new(server: AgentServer) -> Self {
        Self {
            inner: Arc::new(server),
            max_decoding_message_size: None,
        }
    }

    /// Largest request message decoded, in bytes.
    #[must_use]
    pub fn max_decoding_message_size(mut self, limit: usize) -> Self {
        self.max_decoding_message_size = Some(limit);
        self
    }
}

impl NamedService for AgentServiceServer {
    const NAME: &'static str = "credstream.v1.AgentService";
}

struct SubscribeMethod(Arc<AgentServer>);

impl StreamingService<SubscribeRequest> for SubscribeMethod {
    type Response = CatchUp;
    type ResponseStream = SubscribeStream;
    type Future = BoxFuture<Response<SubscribeStream>, Status>;

    fn call(&mut self, request: Request<Streaming<SubscribeRequest>>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move { server.subscribe(request).await })
    }
}

impl<B> tower::Service<http::Request<B>> for AgentServiceServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != "/credstream.v1.AgentService/Subscribe" {
            return Box::pin(async {
                Ok(
                    Status::unimplemented("no such method in credstream.v1.AgentService")
                        .into_http(),
                )
            });
        }
        let method = SubscribeMethod(self.inner.clone());
        let max_decoding = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(SubscribeCodec).apply_max_message_size_config(max_decoding, None);
            Ok(grpc.streaming(method, request).await)
        })
    }
}
