//! [`SubscribeBody`]: the HTTP response body of one Subscribe stream,
//! written by hand over the cluster's state (no task, no queue per agent).
//!
//! It yields gRPC-framed [`Bytes`] straight to hyper: a credential's bytes
//! are the ones the hub framed once per version ([`crate::agent_wire`]),
//! so an agent stream costs no encoding, no copy and no allocation per
//! update. The generated server would encode each message per stream into
//! a buffer of its own; the wire format is the same.
//!
//! The body waits on three things: its place on the cluster's
//! [`Bell`](crate::bell::Bell), which the hub rings for a new state, for
//! the broker's shutdown and for a reload of the token keys; the agent's
//! request stream, which h2 wakes when an ack or hint arrives; and one timer
//! for its token ([`StreamToken::deadline`]: the renewal point or the
//! expiry). After each wake-up the body handles what the agent sent
//! ([`AgentInput`]) and reads the rest from state: the shutdown flag, the
//! stream's token ([`StreamToken::step`], which may end the stream or queue
//! a `TokenRenewal`), the cluster's latest state.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use credstream_proto::v1::subscribe_response;
use http::HeaderMap;
use http_body::Frame;
use prost::bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::codegen::http;

use super::AgentInput;
use crate::agent_wire::AgentFrame;
use crate::audit;
use crate::auth::TokenKey;
use crate::bell::BellHandle;
use crate::hub::{ClusterState, SentVersions};
use crate::stream_token::StreamToken;

/// Writes the `agent_gone` audit event when dropped with its stream.
pub(super) struct AgentAudit {
    pub(super) cluster: String,
    pub(super) agent_id: String,
    pub(super) caller: audit::Caller,
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
/// rings; then the trailers with the status that ended it. See the module
/// docs.
pub struct SubscribeBody {
    state: watch::Receiver<Arc<ClusterState>>,
    bell: BellHandle,
    shutdown: watch::Receiver<bool>,
    sent: SentVersions,
    queue: VecDeque<AgentFrame>,
    /// The agent's acks and hints; holds its registration.
    input: AgentInput,
    /// The stream's token and the ring it is checked against.
    token: StreamToken,
    key: TokenKey,
    /// Fires at the token's deadline (boxed: a `Sleep` is `!Unpin`).
    token_timer: Pin<Box<Sleep>>,
    /// Records `agent_gone` when the stream ends.
    audit: Option<AgentAudit>,
    /// The status to send as trailers next.
    ending: Option<Status>,
    done: bool,
}

impl SubscribeBody {
    /// A body that starts with the snapshot of `current`, reads the
    /// agent's `input`, and runs on `token`, checked against `key`.
    pub(super) fn new(
        current: &ClusterState,
        (state, bell): (watch::Receiver<Arc<ClusterState>>, BellHandle),
        input: AgentInput,
        (token, key): (StreamToken, TokenKey),
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let snapshot = AgentFrame::message(subscribe_response::Message::Snapshot(
            current.snapshot(Instant::now()),
        ));
        let ending = shutdown.borrow().then(crate::service::shutting_down);
        Self {
            state,
            bell,
            shutdown,
            sent: SentVersions::of(current),
            queue: VecDeque::from([snapshot]),
            input,
            token_timer: Box::pin(tokio::time::sleep_until(token.deadline())),
            token,
            key,
            audit: None,
            ending,
            done: false,
        }
    }

    /// Records `agent_gone` through `audit` when the stream ends.
    pub(super) fn set_audit(&mut self, audit: AgentAudit) {
        self.audit = Some(audit);
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
                return Poll::Ready(Some(Ok(Frame::data(item.into_bytes()))));
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
                this.ending = Some(crate::service::shutting_down());
                continue;
            }
            if let Some(status) = this.input.poll_read(cx) {
                this.ending = Some(status);
                continue;
            }
            match this.token.step(&this.key) {
                Err(status) => {
                    tracing::info!(cluster = %this.input.cluster_id(), reason = %status.message(), "agent stream ended: its token is no longer valid");
                    this.ending = Some(status);
                    continue;
                }
                Ok(Some(renewal)) => {
                    tracing::debug!(cluster = %this.input.cluster_id(), "agent token renewed");
                    this.queue.push_back(AgentFrame::message(
                        subscribe_response::Message::TokenRenewal(renewal),
                    ));
                    continue;
                }
                Ok(None) => {
                    let deadline = this.token.deadline();
                    if this.token_timer.deadline() != deadline {
                        this.token_timer.as_mut().reset(deadline);
                    }
                    if this.token_timer.as_mut().poll(cx).is_ready() {
                        continue;
                    }
                }
            }
            match this.state.has_changed() {
                Ok(true) => {
                    let latest = this.state.borrow_and_update().clone();
                    this.sent.catch_up(&latest, Instant::now(), &mut this.queue);
                }
                Ok(false) => return Poll::Pending,
                // Only if the cluster's state sender were gone, which the
                // registration this body holds rules out (it keeps the
                // cluster); ending cleanly beats waiting for nothing.
                Err(_) => this.ending = Some(Status::ok("")),
            }
        }
    }
}
