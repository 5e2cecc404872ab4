//! `PublisherService.Publish`: the user's stream. Reads the hello, registers
//! the publisher (taking over from an older one, unless the hold-down
//! refuses it), then relays checked changes into the cluster and refresh
//! requests and ack progress back out.
//!
//! A publisher that declared `answers_heartbeats` gets a `Heartbeat` every
//! `heartbeat_interval`, one at a time; one still unanswered when the next
//! is due marks it unresponsive in the cluster (a SIGSTOPped or frozen
//! process keeps its TCP connection, so keepalive never notices), and its
//! ack marks it responsive again.
//!
//! The stream runs on its token ([`StreamToken`]): it ends when the token
//! expires or a reload of the key ring removes its key, and a publisher that
//! declared `accepts_token_renewal` is sent a `TokenRenewal` before that
//! (and at once when a reload promotes another signing key).

use std::sync::Arc;
use std::time::SystemTime;

use credstream_proto::v1::publisher_service_server::PublisherService;
use credstream_proto::v1::{
    CredentialKind, Heartbeat, PublishRequest, PublishResponse, PublisherHello, PublisherWelcome,
    TokenRenewal, publish_request, publish_response,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit;
use crate::auth::{self, Claims, TokenKey};
use crate::hub::{Cluster, ClusterHub, PublisherEvent, principal_and_account};
use crate::limits;
use crate::stream_token::StreamToken;

/// The `PublisherService` implementation.
#[derive(Debug, Clone)]
pub struct PublisherServer {
    hub: Arc<ClusterHub>,
    key: TokenKey,
}

impl PublisherServer {
    /// A service publishing into `hub`; streams run on tokens of `key`'s
    /// ring (checked, and renewed, while they last).
    pub fn new(hub: Arc<ClusterHub>, key: TokenKey) -> Self {
        Self { hub, key }
    }
}

type Outbound = mpsc::Sender<Result<PublishResponse, Status>>;

#[tonic::async_trait]
impl PublisherService for PublisherServer {
    type PublishStream = ReceiverStream<Result<PublishResponse, Status>>;

    async fn publish(
        &self,
        request: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let claims = auth::claims(&request)?;
        let routing = super::routing_cluster(&request)?;
        let caller = audit::Caller::of(request.extensions());
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let hub = self.hub.clone();
        let key = self.key.clone();
        tokio::spawn(async move {
            let shutdown = hub.shutdown_signal();
            let token = (claims, key);
            if let Err(status) = session(hub, token, routing, caller, inbound, &tx, shutdown).await
            {
                tracing::debug!(code = ?status.code(), reason = ?status.message(), "publish stream ended");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The credential kind `raw` names, if it names one that carries a
/// credential (not `Unspecified`, not a number this broker does not know).
fn known_kind(raw: i32) -> Option<CredentialKind> {
    CredentialKind::try_from(raw)
        .ok()
        .filter(|kind| CredentialKind::KNOWN.contains(kind))
}

fn declared_kinds(hello: &PublisherHello) -> Result<Vec<CredentialKind>, Status> {
    let mut kinds = Vec::new();
    for raw in &hello.kinds {
        let Some(kind) = known_kind(*raw) else {
            return Err(Status::invalid_argument(format!(
                "hello.kinds holds {raw}, which is not a credential kind (use CREDENTIAL_KIND_AWS or CREDENTIAL_KIND_GCP)"
            )));
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    Ok(kinds)
}

async fn send(tx: &Outbound, message: publish_response::Message) -> Result<(), Status> {
    tx.send(Ok(PublishResponse {
        message: Some(message),
    }))
    .await
    .map_err(|_| Status::cancelled("the publisher went away"))
}

/// Waits for the stream's token to need something: a renewal to send
/// (`Ok`) or the status that ends the stream (`Err`). Cancel-safe: the
/// token changes only when this returns.
async fn token_due(
    token: &mut StreamToken,
    key: &TokenKey,
    reloads: &mut watch::Receiver<u64>,
) -> Result<TokenRenewal, Status> {
    loop {
        if let Some(renewal) = token.step(key)? {
            return Ok(renewal);
        }
        tokio::select! {
            () = tokio::time::sleep_until(token.deadline()) => {}
            changed = reloads.changed() => {
                if changed.is_err() {
                    // The keys can no longer change: wait for the deadline.
                    tokio::time::sleep_until(token.deadline()).await;
                }
            }
        }
    }
}

async fn session(
    hub: Arc<ClusterHub>,
    (claims, key): (Claims, TokenKey),
    routing: Option<String>,
    caller: audit::Caller,
    mut inbound: Streaming<PublishRequest>,
    tx: &Outbound,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), Status> {
    let first = tokio::select! {
        message = inbound.message() => message?,
        () = tokio::time::sleep(super::HELLO_TIMEOUT) => {
            return Err(super::no_hello());
        }
        () = super::shutdown_requested(&mut shutdown) => return Err(super::shutting_down()),
    };
    let Some(PublishRequest {
        message: Some(publish_request::Message::Hello(hello)),
    }) = first
    else {
        return Err(Status::failed_precondition(
            "the first message on Publish must be a hello (PublisherHello) naming the cluster",
        ));
    };
    limits::check_id("hello.cluster_id", &hello.cluster_id)?;
    claims.require_cluster(&hello.cluster_id)?;
    super::check_routing(routing.as_deref(), &hello.cluster_id, "hello's cluster_id")?;
    limits::check_display_name("hello.publisher_name", &hello.publisher_name)?;
    let kinds = declared_kinds(&hello)?;
    let mut reloads = key.changes();
    let mut token = StreamToken::new(&key, claims, hello.accepts_token_renewal, None);
    let cluster = hub.cluster(&hello.cluster_id);
    let (missing, private_env_missing, agents_connected) = cluster.missing(&kinds);
    let (registration, mut events, requests) =
        cluster.connect_publisher(kinds, hello.private_env, &hello.publisher_name)?;
    tracing::info!(cluster = %hello.cluster_id, publisher = %hello.publisher_name, "publisher connected");
    audit::record(audit::Event::PublisherConnected {
        cluster: &hello.cluster_id,
        publisher_name: &hello.publisher_name,
        caller: &caller,
    });
    let _gone = PublisherAudit {
        cluster: hello.cluster_id.clone(),
        publisher_name: hello.publisher_name.clone(),
        caller: caller.clone(),
    };
    send(
        tx,
        publish_response::Message::Welcome(PublisherWelcome {
            version: cluster.state().version,
            missing: missing.into_iter().map(|k| k as i32).collect(),
            private_env_missing,
            agents_connected,
        }),
    )
    .await?;
    for request in requests {
        send(tx, publish_response::Message::RefreshRequest(request)).await?;
    }
    let mut acks = cluster.watch_acks();
    // Ack progress is coalesced: with thousands of agents each ack would
    // otherwise be a message to the publisher. At most one UpdateAck per
    // ACK_INTERVAL, always the latest tally.
    let mut ack_due: Option<tokio::time::Instant> = None;
    let mut last_ack_sent = tokio::time::Instant::now() - ACK_INTERVAL;
    let mut inbound_open = true;
    let heartbeats = hello.answers_heartbeats;
    let interval = cluster.heartbeat_interval();
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut heartbeat_sent, mut heartbeat_acked) = (0u64, 0u64);
    loop {
        tokio::select! {
            message = inbound.message(), if inbound_open => match message {
                Ok(Some(PublishRequest {
                    message: Some(publish_request::Message::HeartbeatAck(ack)),
                })) => {
                    if ack.sequence > heartbeat_sent || ack.sequence == 0 {
                        return Err(Status::invalid_argument(format!(
                            "heartbeat_ack.sequence {} answers no heartbeat sent on this stream (the last was {heartbeat_sent})",
                            ack.sequence
                        )));
                    }
                    if ack.sequence > heartbeat_acked {
                        heartbeat_acked = ack.sequence;
                        registration.resumed();
                    }
                }
                Ok(Some(request)) => handle(&cluster, request)?,
                // A half-closed publisher keeps receiving, like an agent.
                Ok(None) => inbound_open = false,
                // A message the broker could not decode (over the size
                // limit, malformed) ends the stream with that status; if
                // the publisher is simply gone, nobody reads it.
                Err(status) => return Err(status),
            },
            event = events.recv() => match event {
                Some(PublisherEvent::Refresh(request)) => {
                    send(tx, publish_response::Message::RefreshRequest(request)).await?;
                }
                Some(PublisherEvent::TakenOver) | None => {
                    audit::record(audit::Event::PublisherTakenOver {
                        cluster: cluster.id(),
                        publisher_name: &hello.publisher_name,
                        caller: &caller,
                    });
                    return Err(Status::aborted(format!(
                        "another publisher took over cluster {:?}; this stream ends (do not reconnect)",
                        cluster.id()
                    )));
                }
            },
            changed = acks.changed(), if ack_due.is_none() => {
                if changed.is_ok() {
                    ack_due = Some(last_ack_sent + ACK_INTERVAL);
                }
            }
            () = sleep_until_due(ack_due) => {
                ack_due = None;
                last_ack_sent = tokio::time::Instant::now();
                let ack = *acks.borrow_and_update();
                audit::record(audit::Event::Delivery {
                    cluster: cluster.id(),
                    version: ack.version,
                    agents_holding: ack.agents_current,
                    agents_connected: ack.agents_connected,
                });
                send(tx, publish_response::Message::UpdateAck(ack)).await?;
            }
            _ = heartbeat.tick(), if heartbeats => {
                if heartbeat_sent > heartbeat_acked {
                    registration.unresponsive();
                } else {
                    heartbeat_sent += 1;
                    send(tx, publish_response::Message::Heartbeat(Heartbeat {
                        sequence: heartbeat_sent,
                    }))
                    .await?;
                }
            }
            due = token_due(&mut token, &key, &mut reloads) => match due {
                Ok(renewal) => {
                    tracing::debug!(cluster = %cluster.id(), "publisher token renewed");
                    send(tx, publish_response::Message::TokenRenewal(renewal)).await?;
                }
                Err(status) => {
                    tracing::info!(cluster = %cluster.id(), reason = %status.message(), "publish stream ended: its token is no longer valid");
                    return Err(status);
                }
            },
            () = super::shutdown_requested(&mut shutdown) => return Err(super::shutting_down()),
            () = tx.closed() => return Ok(()),
        }
    }
}

/// Writes `publisher_gone` when the publisher's session ends, however it
/// ends.
struct PublisherAudit {
    cluster: String,
    publisher_name: String,
    caller: audit::Caller,
}

impl Drop for PublisherAudit {
    fn drop(&mut self) {
        audit::record(audit::Event::PublisherGone {
            cluster: &self.cluster,
            publisher_name: &self.publisher_name,
            caller: &self.caller,
        });
    }
}

/// The shortest gap between two `UpdateAck`s to one publisher.
const ACK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn handle(cluster: &Cluster, request: PublishRequest) -> Result<(), Status> {
    use publish_request::Message;
    match request.message {
        Some(Message::Hello(_)) => Err(Status::failed_precondition(
            "a second hello on the same Publish stream; open a new stream to publish to another cluster",
        )),
        Some(Message::Credential(update)) => {
            let lifetime = limits::check_credential(&update, SystemTime::now())?;
            let kind = update.kind();
            let answered = update.refresh_request_id.clone();
            let (principal, account) = principal_and_account(&update);
            match cluster.publish_credential(update, lifetime) {
                Some(version) => {
                    tracing::info!(cluster = %cluster.id(), kind = kind.label(), version, refresh = ?answered, "credential published");
                    audit::record(audit::Event::CredentialPublished {
                        cluster: cluster.id(),
                        kind: kind.label(),
                        principal: &principal,
                        account: &account,
                        version,
                        issued_at: audit::time(lifetime.issued_at),
                        expires_at: audit::time(lifetime.expires_at),
                    });
                }
                None => {
                    tracing::info!(cluster = %cluster.id(), kind = kind.label(), refresh = ?answered,
                        "credential answers a superseded refresh request; dropped");
                }
            }
            Ok(())
        }
        Some(Message::PrivateEnv(env)) => {
            limits::check_env_change(&env)?;
            let (set, unset) = (env.set.len(), env.unset.len());
            let version = cluster.publish_env(env)?;
            audit::record(audit::Event::PrivateEnvPublished {
                cluster: cluster.id(),
                version,
                set,
                unset,
            });
            tracing::info!(cluster = %cluster.id(), version, "private env published");
            Ok(())
        }
        Some(Message::RefreshError(error)) => {
            if error.refresh_request_id.is_empty()
                || error.refresh_request_id.len() > limits::MAX_ID_BYTES
            {
                return Err(Status::invalid_argument(
                    "refresh_error.refresh_request_id is required (at most 128 bytes)",
                ));
            }
            let message = limits::bounded_message(&error.message);
            tracing::warn!(cluster = %cluster.id(), request = ?error.refresh_request_id, error = ?message, "publisher could not refresh");
            cluster.refresh_failed(&error.refresh_request_id, message, error.permanent);
            Ok(())
        }
        Some(Message::Revoke(revoke)) => {
            let mut kinds = Vec::new();
            for raw in &revoke.kinds {
                let Some(kind) = known_kind(*raw) else {
                    return Err(Status::invalid_argument(format!(
                        "revoke.kinds holds {raw}, which is not a credential kind"
                    )));
                };
                kinds.push(kind);
            }
            if revoke.all {
                kinds = CredentialKind::KNOWN.to_vec();
            } else if kinds.is_empty() {
                return Err(Status::invalid_argument("revoke needs kinds or all = true"));
            }
            let version = cluster.revoke(&kinds, revoke.all);
            audit::record(audit::Event::Revoked {
                cluster: cluster.id(),
                version,
                kinds: kinds.iter().map(|kind| kind.label()).collect(),
                all: revoke.all,
            });
            tracing::info!(cluster = %cluster.id(), version, all = revoke.all, "revoked");
            Ok(())
        }
        // Handled by the stream loop, which knows the heartbeats it sent.
        Some(Message::HeartbeatAck(_)) => Ok(()),
        None => Err(Status::invalid_argument(
            "empty PublishRequest: set exactly one message",
        )),
    }
}
