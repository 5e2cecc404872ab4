//! `AgentService.Subscribe`: the worker's stream. The response is a
//! hand-written HTTP body ([`SubscribeBody`]) over the cluster's state (no
//! task, no queue per agent): each time the cluster's bell rings it sends
//! whatever is newer than what this agent was sent. A small task reads acks
//! and hints; an agent that half-closes keeps receiving. Dropping the
//! response (the agent went away) unregisters the agent.
//!
//! The fan-out path does no per-agent encoding or copying: a credential is
//! framed and encoded once per version by the hub, and every agent's body
//! hands those shared bytes to hyper as they are. That is why the service
//! is wired by hand here ([`AgentServiceServer`]) instead of with the
//! generated server, whose response path encodes each message per stream
//! into a buffer of its own; the wire format is the same.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use credstream_proto::v1::{
    CredentialKind, SubscribeRequest, SubscribeResponse, subscribe_request, subscribe_response,
};
use http::HeaderMap;
use http_body::Frame;
use prost::Message as _;
use prost::bytes::Bytes;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};

use crate::bell::BellHandle;
use crate::hub::{
    AgentRegistration, CatchUp, ClusterHub, ClusterState, SentVersions, grpc_frame_into,
};
use crate::limits;
use crate::{audit, auth};

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

impl AgentServer {
    /// Handles one Subscribe call: the hello, then the agent's stream.
    pub async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<SubscribeBody, Status> {
        let claims = auth::claims(&request)?;
        let routing = super::routing_cluster(&request)?;
        // Formatting the peer and token id costs every Subscribe of a
        // reconnect storm; only the audit trail reads them.
        let caller = audit::enabled().then(|| audit::Caller::of(request.extensions()));
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(super::HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| super::no_hello())??;
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
        claims.require_agent(&hello.agent_id)?;
        super::check_routing(routing.as_deref(), &hello.cluster_id, "hello's cluster_id")?;

        // A draining broker sends no snapshot: one would reset the agent's
        // backoff only for the stream to end at once.
        if *self.hub.shutdown_signal().borrow() {
            return Err(super::shutting_down());
        }
        let cluster = self.hub.cluster(&hello.cluster_id);
        let registration = Arc::new(cluster.connect_agent(hello.agent_id.clone()));
        tracing::debug!(cluster = %hello.cluster_id, agent = %hello.agent_id, "agent subscribed");
        let (mut state, bell) = cluster.watch();
        let current = state.borrow_and_update().clone();
        let (fail, failed) = oneshot::channel();
        tokio::spawn(read_agent(
            inbound,
            registration.clone(),
            self.hint_interval,
            fail,
        ));
        let mut body = SubscribeBody::new(
            &current,
            (state, bell),
            registration,
            failed,
            self.hub.shutdown_signal(),
        );
        if let Some(caller) = caller {
            audit::record(audit::Event::AgentSubscribed {
                cluster: &hello.cluster_id,
                agent_id: &hello.agent_id,
                caller: &caller,
            });
            body.audit = Some(AgentAudit {
                cluster: hello.cluster_id,
                agent_id: hello.agent_id,
                caller,
            });
        }
        Ok(body)
    }
}

/// Writes the `agent_gone` audit event when dropped with its stream.
struct AgentAudit {
    cluster: String,
    agent_id: String,
    caller: audit::Caller,
}

impl Drop for AgentAudit {
    fn drop(&mut self) {
        audit::record(audit::Event::AgentGone {
            cluster: &self.cluster,
            agent_id: &self.agent_id,
            caller: &self.caller,
        });
    }
}

/// The response body of one Subscribe stream: the snapshot, then whatever
/// is newer than what this agent was sent, each time the cluster's bell
/// rings; then the trailers with the status that ended it.
///
/// It yields gRPC-framed [`Bytes`] straight to hyper: a credential's bytes
/// are the ones the hub encoded once per version, so an agent stream costs
/// no encoding, no copy and no allocation per update.
pub struct SubscribeBody {
    state: watch::Receiver<Arc<ClusterState>>,
    bell: BellHandle,
    shutdown: watch::Receiver<bool>,
    sent: SentVersions,
    queue: VecDeque<CatchUp>,
    _registration: Arc<AgentRegistration>,
    /// Records `agent_gone` when the stream ends.
    audit: Option<AgentAudit>,
    /// Why the reader ended the stream (undecodable or out-of-order
    /// input); closed without a status when the agent half-closes.
    failed: Option<oneshot::Receiver<Status>>,
    /// The status to send as trailers next.
    ending: Option<Status>,
    done: bool,
}

impl SubscribeBody {
    fn new(
        current: &ClusterState,
        (state, bell): (watch::Receiver<Arc<ClusterState>>, BellHandle),
        registration: Arc<AgentRegistration>,
        failed: oneshot::Receiver<Status>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let snapshot = CatchUp::Message(subscribe_response::Message::Snapshot(
            current.snapshot(Instant::now()),
        ));
        let ending = shutdown.borrow().then(super::shutting_down);
        Self {
            state,
            bell,
            shutdown,
            sent: SentVersions::of(current),
            queue: VecDeque::from([snapshot]),
            _registration: registration,
            audit: None,
            failed: Some(failed),
            ending,
            done: false,
        }
    }
}

impl std::fmt::Debug for SubscribeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscribeBody")
            .field("sent", &self.sent)
            .field("queued", &self.queue.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// One `CatchUp` as the bytes of a gRPC message.
fn framed(item: CatchUp) -> Bytes {
    match item {
        CatchUp::Encoded(bytes) => bytes,
        CatchUp::Message(message) => {
            let mut out = Vec::new();
            grpc_frame_into(
                &SubscribeResponse {
                    message: Some(message),
                },
                &mut out,
            );
            Bytes::from(out)
        }
    }
}

/// `status` as gRPC trailers.
fn trailers(status: &Status) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(2);
    if status.add_header(&mut map).is_err() {
        // Only a message that is not a valid header value gets here; the
        // code alone still tells the agent what to do.
        map.clear();
        map.insert("grpc-status", (status.code() as i32).into());
    }
    map
}

impl http_body::Body for SubscribeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(framed(item)))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some(status) = this.ending.take() {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers(&status)))));
            }
            // Register before looking, so that a ring in between wakes us.
            this.bell.register(cx.waker());
            if this.shutdown.has_changed().unwrap_or(true) && *this.shutdown.borrow_and_update() {
                this.ending = Some(super::shutting_down());
                continue;
            }
            if let Some(failed) = &mut this.failed {
                match Pin::new(failed).poll(cx) {
                    Poll::Ready(Ok(status)) => {
                        this.ending = Some(status);
                        continue;
                    }
                    // The reader ended normally (half-close): keep
                    // streaming, but stop polling the finished channel.
                    Poll::Ready(Err(_)) => this.failed = None,
                    Poll::Pending => {}
                }
            }
            match this.state.has_changed() {
                Ok(true) => {
                    let latest = this.state.borrow_and_update().clone();
                    this.sent.catch_up(&latest, Instant::now(), &mut this.queue);
                }
                Ok(false) => return Poll::Pending,
                // The cluster is gone (the hub dropped it): nothing more
                // will come; end cleanly.
                Err(_) => this.ending = Some(Status::ok("")),
            }
        }
    }
}

async fn read_agent(
    mut inbound: Streaming<SubscribeRequest>,
    registration: Arc<AgentRegistration>,
    hint_interval: Duration,
    mut fail: oneshot::Sender<Status>,
) {
    let mut last_hint: [Option<Instant>; 2] = [None, None];
    loop {
        let message = tokio::select! {
            message = inbound.message() => message,
            // The response ended (shutdown, or the agent went away).
            () = fail.closed() => return,
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

/// Per-stream decode buffer (tonic's default is 8 KiB): agents send acks
/// and hints of a few bytes.
const DECODE_BUFFER_BYTES: usize = 512;

/// Decodes the `SubscribeRequest`s of a Subscribe stream, like the
/// generated codec but with a small buffer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SubscribeDecoder;

impl Decoder for SubscribeDecoder {
    type Item = SubscribeRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<SubscribeRequest>, Status> {
        SubscribeRequest::decode(src)
            .map(Some)
            .map_err(|error| credstream_proto::codec::decode_error("SubscribeRequest", &error))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, 32 * 1024)
    }
}

/// `credstream.v1.AgentService` for the tonic router, with the
/// [`SubscribeBody`]; it replaces the generated `AgentServiceServer`.
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
        if let Some(encoding) = request.headers().get("grpc-encoding")
            && encoding != "identity"
        {
            return Box::pin(async {
                Ok(Status::unimplemented(
                    "compressed Subscribe requests are not supported; send messages uncompressed (grpc-encoding identity)",
                )
                .into_http())
            });
        }
        let server = self.inner.clone();
        let max_decoding = self.max_decoding_message_size;
        Box::pin(async move {
            let request =
                Request::from_http(request.map(|body| {
                    Streaming::new_request(SubscribeDecoder, body, None, max_decoding)
                }));
            Ok(match server.subscribe(request).await {
                Ok(body) => {
                    let mut response = http::Response::new(tonic::body::Body::new(body));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    response
                }
                Err(status) => status.into_http(),
            })
        })
    }
}
