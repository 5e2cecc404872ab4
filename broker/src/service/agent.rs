//! `AgentService.Subscribe`: the worker's stream. The response is a stream
//! over the cluster's `watch` (no task, no queue per agent): each poll sends
//! whatever is newer than what this agent was sent. A small task reads acks
//! and hints; an agent that half-closes keeps receiving. Dropping the
//! response stream (the agent went away) unregisters the agent.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use credstream_proto::v1::agent_service_server::AgentService;
use credstream_proto::v1::{
    CredentialKind, SubscribeRequest, SubscribeResponse, subscribe_request, subscribe_response,
};
use futures::Stream;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::hub::{AgentRegistration, ClusterHub, ClusterState, SentVersions};
use crate::limits;

/// How long an agent has to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

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

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentServer {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let claims = auth::claims(&request)?;
        let routing = super::routing_cluster(&request)?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
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
    queue: VecDeque<subscribe_response::Message>,
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
) -> impl Stream<Item = Result<SubscribeResponse, Status>> {
    let snapshot = subscribe_response::Message::Snapshot(current.snapshot(Instant::now()));
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
                return Some((
                    Ok(SubscribeResponse {
                        message: Some(message),
                    }),
                    f,
                ));
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
                    let mut out = Vec::new();
                    f.sent.catch_up(&latest, Instant::now(), &mut out);
                    f.queue.extend(out);
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
