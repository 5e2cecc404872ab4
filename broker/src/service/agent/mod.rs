//! `AgentService.Subscribe`: the worker's stream. The response is a
//! hand-written HTTP body ([`SubscribeBody`], in `body.rs`) over the
//! cluster's state (no task, no queue per agent): each time the cluster's
//! bell rings it sends whatever is newer than what this agent was sent.
//! The same body reads the agent's acks and hints ([`AgentInput`]) each
//! time it wakes, so a stream costs hyper's one task and no reader task of
//! its own; an agent that half-closes keeps receiving. Dropping the
//! response (the agent went away) unregisters the agent.
//!
//! The fan-out path does no per-agent encoding or copying: a credential is
//! framed once per version when it is published ([`crate::agent_wire`]),
//! and every agent's body hands those shared bytes to hyper as they are.
//! That is why the service is wired by hand here ([`AgentServiceServer`])
//! instead of with the generated server, whose response path encodes each
//! message per stream into a buffer of its own; the wire format is the
//! same.

mod body;

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use credstream_proto::kind::PerKind;
use credstream_proto::v1::{CredentialKind, SubscribeRequest, subscribe_request};
use futures::Stream as _;
use prost::Message as _;
use tokio::time::Instant;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::NamedService;
use tonic::{Request, Status, Streaming};

use body::AgentAudit;
pub use body::SubscribeBody;

use crate::auth::TokenKey;
use crate::hub::{AgentRegistration, ClusterHub};
use crate::limits;
use crate::stream_token::StreamToken;
use crate::{audit, auth};

/// The `AgentService` implementation.
#[derive(Debug, Clone)]
pub struct AgentServer {
    hub: Arc<ClusterHub>,
    hint_interval: Duration,
    key: TokenKey,
}

impl AgentServer {
    /// A service subscribing agents to `hub`; each agent may hint once per
    /// kind per `hint_interval`. Streams run on tokens of `key`'s ring
    /// (checked, and renewed, while they last).
    pub fn new(hub: Arc<ClusterHub>, hint_interval: Duration, key: TokenKey) -> Self {
        Self {
            hub,
            hint_interval,
            key,
        }
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
        let registration = cluster.connect_agent(hello.agent_id.clone());
        tracing::debug!(cluster = %hello.cluster_id, agent = %hello.agent_id, "agent subscribed");
        let (mut state, bell) = cluster.watch();
        let current = state.borrow_and_update().clone();
        let input = AgentInput::new(inbound, registration, self.hint_interval);
        let token = StreamToken::new(
            &self.key,
            claims,
            hello.accepts_token_renewal,
            Some(&hello.agent_id),
        );
        let mut body = SubscribeBody::new(
            &current,
            (state, bell),
            input,
            (token, self.key.clone()),
            self.hub.shutdown_signal(),
        );
        if let Some(caller) = caller {
            audit::record(audit::Event::AgentSubscribed {
                cluster: &hello.cluster_id,
                agent_id: &hello.agent_id,
                caller: &caller,
            });
            body.set_audit(AgentAudit {
                cluster: hello.cluster_id,
                agent_id: hello.agent_id,
                caller,
            });
        }
        Ok(body)
    }
}

/// Most requests [`AgentInput::poll_read`] handles before it yields: an
/// agent that floods acks shares its worker with the other streams.
const MAX_REQUESTS_PER_POLL: usize = 32;

/// What one agent sends on its Subscribe stream after the hello: acks and
/// hints, until it half-closes. Its [`SubscribeBody`] reads them each time
/// it wakes (the request stream wakes the body's task), so a stream needs
/// no reader task of its own. Owns the agent's registration: the agent is
/// unregistered when its body is dropped.
///
/// hyper polls a response body only while the stream may send, so an agent
/// whose receive window is full (it is not reading) has its acks and hints
/// read once it reads again; until then they wait in h2's receive window,
/// which bounds them.
pub(super) struct AgentInput {
    /// `None` once the agent half-closed or sent something that ends the
    /// stream.
    inbound: Option<Streaming<SubscribeRequest>>,
    registration: AgentRegistration,
    hint_interval: Duration,
    last_hint: PerKind<Option<Instant>>,
}

impl AgentInput {
    fn new(
        inbound: Streaming<SubscribeRequest>,
        registration: AgentRegistration,
        hint_interval: Duration,
    ) -> Self {
        Self {
            inbound: Some(inbound),
            registration,
            hint_interval,
            last_hint: PerKind::default(),
        }
    }

    /// Handles what the agent has sent so far and registers `cx` for more.
    /// Returns the status that ends the stream if the agent sent something
    /// undecodable or out of order; after that, and after a half-close,
    /// nothing more is read.
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> Option<Status> {
        for _ in 0..MAX_REQUESTS_PER_POLL {
            let inbound = self.inbound.as_mut()?;
            let result = match Pin::new(inbound).poll_next(cx) {
                Poll::Pending => return None,
                Poll::Ready(Some(Ok(request))) => self.handle(request),
                // Undecodable input ends the stream with its status.
                Poll::Ready(Some(Err(status))) => Err(status),
                // Half-closed: keep streaming.
                Poll::Ready(None) => {
                    self.inbound = None;
                    return None;
                }
            };
            if let Err(status) = result {
                self.inbound = None;
                return Some(status);
            }
        }
        // More may be waiting: come back after the other tasks had a turn.
        cx.waker().wake_by_ref();
        None
    }

    /// The cluster of the agent, for log lines.
    pub(super) fn cluster_id(&self) -> &str {
        self.registration.cluster().id()
    }

    fn handle(&mut self, request: SubscribeRequest) -> Result<(), Status> {
        match request.message {
            Some(subscribe_request::Message::Ack(ack)) => {
                self.registration.ack(ack.version);
                Ok(())
            }
            Some(subscribe_request::Message::RefreshHint(hint)) => {
                let kind = CredentialKind::try_from(hint.kind).unwrap_or_default();
                let Some(last) = self.last_hint.get_mut(kind) else {
                    return Err(Status::invalid_argument(format!(
                        "refresh_hint.kind holds {}, which is not a credential kind",
                        hint.kind
                    )));
                };
                let now = Instant::now();
                if last.is_none_or(|at| now >= at + self.hint_interval) {
                    *last = Some(now);
                    self.registration.cluster().hint(kind, hint.held_version);
                }
                Ok(())
            }
            Some(subscribe_request::Message::Hello(_)) => Err(Status::failed_precondition(
                "a second hello on the same Subscribe stream",
            )),
            None => Err(Status::invalid_argument(
                "empty SubscribeRequest: set exactly one message",
            )),
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
