//! The `Subscribe` stream loop: hello, snapshot, updates, acks, refresh
//! hints, reconnects.
//!
//! [`run`] keeps one stream open to the broker and applies everything it
//! receives to the [`CredentialStore`]. It acknowledges the highest version
//! it holds a little later (a random delay around
//! [`SubscriptionConfig::ack_delay`]), so that the acks of thousands of agents
//! neither compete with the broker's fan-out of the very version they
//! acknowledge nor arrive all at once; a burst of versions costs one ack. While a declared credential is
//! in its last quarter of life (the broker should have refreshed it at half
//! life) or missing, it sends a refresh hint at most every
//! [`SubscriptionConfig::hint_every`]; the broker folds all hints of a
//! cluster into one refresh.
//!
//! Reconnects use exponential backoff with full jitter (250 ms doubling to
//! 30 s), which starts over only once a stream has stayed open
//! [`STABLE_AFTER`] (10 s) past its snapshot, not on the snapshot itself: a
//! broker that accepts streams and drops them cannot make its agents
//! reconnect in a tight loop. The store keeps serving what it holds
//! meanwhile (until expiry). Statuses that no retry can
//! fix (a bad token, a token for another cluster, a malformed hello) end
//! [`run`] with a [`SubscriptionError`].
//!
//! **Token renewal.** The hello declares `accepts_token_renewal`: the broker
//! then sends a `TokenRenewal` before the agent's token expires (and after a
//! key rotation). The agent keeps the newest in memory only — in the
//! interceptor every call shares ([`CallCredentials::renew`]), never in a
//! file or a log line — and presents it on every reconnect, so a
//! subscription outlives any one token. When the broker ends a stream that
//! was serving with `UNAUTHENTICATED` (its token expired, its key was
//! removed), the agent logs the reason and reconnects with backoff using the
//! newest token it holds; only a refusal of that new call is final.
//!
//! A message this agent cannot take — larger than [`MAX_MESSAGE`] or not a
//! valid `SubscribeResponse` — is the broker's fault, not the agent's: it
//! is a refusal (logged and counted with the seal gate's, see
//! [`crate::refusals`]) and the stream is reopened with backoff (the
//! stream's framing is lost after such a message, so it cannot go on).
//! Such errors are told from statuses the broker sent by where they come
//! from: the agent's decoder ([`ResponseCodec`]) marks its own, and tonic's
//! size check, which runs before any decoder, is recognised by its code
//! and wording (a broker that sends the same status only makes the agent
//! reconnect, which it can always do by dropping the stream).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_proto::codec::{ProtoCodec, ProtoDecoder};
use credstream_proto::connect::CallCredentials;
use credstream_proto::connect::{BrokerAddress, ConnectError};
use credstream_proto::convert::system_time;
use credstream_proto::rules::backoff::Backoff as Exponential;
use credstream_proto::rules::retry::{self, Final};
use credstream_proto::rules::text::printable;
use credstream_proto::v1::{
    AgentAck, AgentHello, CredentialKind, RefreshHint, SubscribeRequest, SubscribeResponse,
    TokenRenewal, subscribe_request, subscribe_response,
};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::GrpcMethod;
use tonic::IntoStreamingRequest;
use tonic::client::Grpc;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::refusals::REASON_MAX;
use crate::store::{AgentState, CredentialStore};

/// Where and as whom to subscribe.
#[derive(Clone, Debug)]
pub struct SubscriptionConfig {
    /// The broker and the agent token.
    pub address: BrokerAddress,
    /// This agent's id (unique in the cluster, e.g. the host name).
    pub agent_id: String,
    /// Fraction of a credential's lifetime after which the agent hints.
    pub hint_after: f64,
    /// How often to repeat a hint while the condition holds.
    pub hint_every: Duration,
    /// Mean delay before acknowledging (uniform between ½× and 1½×).
    pub ack_delay: Duration,
}

impl SubscriptionConfig {
    /// Defaults: hint in the last quarter of a credential's life, every 30 s.
    pub fn new(address: BrokerAddress, agent_id: impl Into<String>) -> Self {
        Self {
            address,
            agent_id: agent_id.into(),
            hint_after: 0.75,
            hint_every: Duration::from_secs(30),
            ack_delay: Duration::from_millis(500),
        }
    }
}

/// Why the subscription ended for good.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    /// The broker address or token is unusable.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The broker refused the token.
    #[error("the broker rejected the agent token: {0}; ask the publisher for a new one")]
    Unauthenticated(String),
    /// The token is not for this cluster or not an agent token.
    #[error("the token may not subscribe to this cluster: {0}")]
    PermissionDenied(String),
    /// The broker rejected the hello or a message.
    #[error("the broker rejected the subscription: {0}")]
    Rejected(String),
}

enum Ended {
    Retry(String),
    /// The broker sent a message this agent refuses (too large, not
    /// decodable); reconnect.
    Refused(String),
    Fatal(SubscriptionError),
    Shutdown,
}

/// The largest message the agent accepts from the broker. A snapshot of a
/// cluster is a few KiB (the private env is capped far below this).
pub const MAX_MESSAGE: usize = 1024 * 1024;

/// The start of tonic's own status for a message over the size limit.
const TOO_LARGE: &str = "Error, decoded message length too large";

/// Marks a status made by the agent's own decoder (the broker's message
/// did not decode), as opposed to one the broker sent.
#[derive(Debug, thiserror::Error)]
#[error("the broker's message does not decode")]
struct Undecodable;

/// The generated client's codec ([`ProtoCodec`]), except that a response
/// that does not decode carries [`Undecodable`] as its status's source.
#[derive(Debug, Default)]
struct ResponseCodec(ProtoCodec<SubscribeRequest, SubscribeResponse>);

impl Codec for ResponseCodec {
    type Encode = SubscribeRequest;
    type Decode = SubscribeResponse;
    type Encoder = <ProtoCodec<SubscribeRequest, SubscribeResponse> as Codec>::Encoder;
    type Decoder = MarkingDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        MarkingDecoder(self.0.decoder())
    }
}

/// [`ResponseCodec`]'s decoder.
struct MarkingDecoder(ProtoDecoder<SubscribeResponse>);

impl Decoder for MarkingDecoder {
    type Item = SubscribeResponse;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        self.0.decode(buf).map_err(|mut status| {
            status.set_source(Arc::new(Undecodable));
            status
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Why the agent refuses what the broker sent, if `status` is the agent's
/// own size or decode error rather than the broker's status.
fn refused_message(status: &tonic::Status) -> Option<String> {
    let undecodable = std::error::Error::source(status)
        .is_some_and(|source| source.downcast_ref::<Undecodable>().is_some());
    let too_large =
        status.code() == tonic::Code::OutOfRange && status.message().starts_with(TOO_LARGE);
    (undecodable || too_large).then(|| status.message().to_owned())
}

/// What the agent makes of a status that ended a stream. The broker (or
/// anything between) chose its message, so only a printable, bounded copy
/// of it reaches a log line or an error ([`crate::refusals::REASON_MAX`]).
fn classify(status: tonic::Status) -> Ended {
    let message = printable(status.message(), REASON_MAX).into_owned();
    match retry::final_reason(status.code()) {
        Some(Final::Unauthenticated) => Ended::Fatal(SubscriptionError::Unauthenticated(message)),
        Some(Final::PermissionDenied) => Ended::Fatal(SubscriptionError::PermissionDenied(message)),
        Some(Final::Rejected) => Ended::Fatal(SubscriptionError::Rejected(message)),
        // Only a displaced publisher is taken over; an agent retries.
        Some(Final::TakenOver) | None => Ended::Retry(format!("{:?}: {message}", status.code())),
    }
}

const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Reconnects: [`BACKOFF_BASE`] doubling to [`BACKOFF_MAX`], full jitter.
const RECONNECT: Exponential = Exponential::new(BACKOFF_BASE, BACKOFF_MAX);

/// How long a stream must stay open after its snapshot before the
/// reconnect backoff starts over. A broker that accepts a stream, sends the
/// snapshot and drops it (a draining or overloaded one) must not make its
/// agents reconnect in a tight loop; a stream that served for this long was
/// a real connection, and the next loss is a fresh incident.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The reconnect backoff: exponential from [`BACKOFF_BASE`] to
/// [`BACKOFF_MAX`] with full jitter, reset only by a stream that stayed
/// open [`STABLE_AFTER`] past its snapshot.
#[derive(Debug, Default)]
struct Backoff {
    /// Consecutive streams that failed or did not stay up long enough.
    failures: u32,
    /// When the current stream delivered its snapshot.
    snapshot_at: Option<tokio::time::Instant>,
}

impl Backoff {
    /// The current stream delivered its snapshot.
    fn snapshot_received(&mut self) {
        self.snapshot_at = Some(tokio::time::Instant::now());
    }

    /// The current stream ended (or never opened): how long to wait before
    /// the next attempt.
    fn stream_ended(&mut self) -> Duration {
        if self
            .snapshot_at
            .take()
            .is_some_and(|at| at.elapsed() >= STABLE_AFTER)
        {
            self.failures = 0;
        }
        let delay = RECONNECT.full_jitter(self.failures);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The upper bound of the next delay (before jitter).
    #[cfg(test)]
    fn ceiling(&self) -> Duration {
        RECONNECT.ceiling(self.failures)
    }
}

/// The kinds for which a hint is due now: declared, and missing, expired or
/// in the last part of their life.
pub fn hints_due(
    state: &AgentState,
    hint_after: f64,
    now: SystemTime,
) -> Vec<(CredentialKind, u64)> {
    let Some(info) = &state.info else {
        return Vec::new();
    };
    info.kinds()
        .filter(|kind| *kind != CredentialKind::Unspecified)
        .filter(|kind| {
            let Some(held) = state.held(*kind) else {
                return true;
            };
            let (Some(expires), issued) =
                (held.expiry(), held.issued_at.as_ref().and_then(system_time))
            else {
                return true;
            };
            let issued = issued.unwrap_or(now);
            let lifetime = expires.duration_since(issued).unwrap_or_default();
            let hint_at = issued + lifetime.mul_f64(hint_after);
            now >= hint_at
        })
        .map(|kind| (kind, state.held_version(kind)))
        .collect()
}

/// Runs the subscription until `shutdown` resolves or a terminal error.
pub async fn run(
    config: SubscriptionConfig,
    store: CredentialStore,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SubscriptionError> {
    let channel = config.address.channel()?;
    let credentials = config.address.interceptor()?;
    let renewals = credentials.clone();
    let mut client = Grpc::new(InterceptedService::new(channel, credentials))
        .max_decoding_message_size(MAX_MESSAGE);
    tokio::pin!(shutdown);
    let mut backoff = Backoff::default();
    loop {
        let ended = tokio::select! {
            ended = connection(&config, &store, &mut client, &renewals, &mut backoff) => ended,
            () = &mut shutdown => Ended::Shutdown,
        };
        match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Fatal(error) => return Err(error),
            Ended::Refused(reason) => {
                store.gate().refusals().record("message", 0, &reason);
                let delay = backoff.stream_ended();
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => return Ok(()),
                }
            }
            Ended::Retry(reason) => {
                let delay = backoff.stream_ended();
                tracing::warn!(%reason, ?delay, "subscription lost; serving what is held and reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = &mut shutdown => return Ok(()),
                }
            }
        }
    }
}

type Client = Grpc<InterceptedService<Channel, CallCredentials>>;

/// `AgentService.Subscribe`, as the generated client calls it but with
/// [`ResponseCodec`].
async fn subscribe(
    client: &mut Client,
    url: &str,
    requests: ReceiverStream<SubscribeRequest>,
) -> Result<tonic::codec::Streaming<SubscribeResponse>, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| unreachable(url, &e.to_string(), std::error::Error::source(&e)))?;
    let mut request = requests.into_streaming_request();
    request
        .extensions_mut()
        .insert(GrpcMethod::new("credstream.v1.AgentService", "Subscribe"));
    let path = PathAndQuery::from_static("/credstream.v1.AgentService/Subscribe");
    let response = client
        .streaming(request, path, ResponseCodec::default())
        .await
        .map_err(|status| match std::error::Error::source(&status) {
            // A status with a source was made here, by the transport (the
            // connection failed); one the broker sent has none.
            Some(source) if refused_message(&status).is_none() => {
                unreachable(url, status.message(), Some(source))
            }
            _ => status,
        })?;
    Ok(response.into_inner())
}

/// `UNAVAILABLE` naming the broker and why it could not be reached: the
/// connect error's whole chain (connection refused, the TLS or DNS cause),
/// each cause once.
fn unreachable(
    url: &str,
    message: &str,
    mut source: Option<&(dyn std::error::Error + 'static)>,
) -> tonic::Status {
    let mut text = message.to_owned();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    tonic::Status::unavailable(format!(
        "the broker at {url} is not reachable: {}",
        printable(&text, REASON_MAX)
    ))
}

fn message(message: subscribe_request::Message) -> SubscribeRequest {
    SubscribeRequest {
        message: Some(message),
    }
}

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps `renewal`'s token for every later call (the reconnects).
fn keep_renewal(renewals: &CallCredentials, mut renewal: TokenRenewal) {
    let token = zeroize::Zeroizing::new(std::mem::take(&mut renewal.token));
    let until = renewal
        .expires_at
        .as_ref()
        .and_then(system_time)
        .map_or_else(
            || "an unstated time".to_owned(),
            |at| humantime::format_rfc3339_seconds(at).to_string(),
        );
    match renewals.renew(&token) {
        Ok(()) => tracing::info!("token renewed, valid until {until}"),
        Err(error) => {
            tracing::warn!(%error, "the broker's token renewal is unusable; keeping the token held");
        }
    }
}

/// How a stream that was serving (its snapshot arrived) ended with
/// `status`: `UNAUTHENTICATED` there is the broker ending a live stream
/// whose token expired or whose key was removed, and the agent may hold a
/// newer token (a renewal) than the one the stream opened with, so it
/// reconnects; the broker's refusal of that call is final.
fn classify_serving(status: tonic::Status) -> Ended {
    if status.code() == tonic::Code::Unauthenticated {
        let reason = printable(status.message(), REASON_MAX);
        return Ended::Retry(format!(
            "the broker ended the stream: {reason}; reconnecting with the newest token held"
        ));
    }
    classify(status)
}

async fn connection(
    config: &SubscriptionConfig,
    store: &CredentialStore,
    client: &mut Client,
    renewals: &CallCredentials,
    backoff: &mut Backoff,
) -> Ended {
    let (tx, rx) = mpsc::channel(8);
    let hello = AgentHello {
        cluster_id: config.address.cluster_id.clone(),
        agent_id: config.agent_id.clone(),
        accepts_token_renewal: true,
    };
    let _ = tx
        .send(message(subscribe_request::Message::Hello(hello)))
        .await;
    let mut inbound = match subscribe(client, &config.address.url, ReceiverStream::new(rx)).await {
        Ok(inbound) => inbound,
        Err(status) => return classify(status),
    };
    let mut hint_timer = tokio::time::interval(config.hint_every);
    hint_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut acked = 0;
    let mut ack_at: Option<tokio::time::Instant> = None;
    let mut serving = false;
    loop {
        tokio::select! {
            received = inbound.message() => {
                let response = match received {
                    Ok(Some(response)) => response,
                    Ok(None) => return Ended::Retry("the broker closed the stream".into()),
                    Err(status) => {
                        return match refused_message(&status) {
                            Some(reason) => Ended::Refused(reason),
                            None if serving => classify_serving(status),
                            None => classify(status),
                        };
                    }
                };
                let Some(update) = response.message else { continue };
                let update = match update {
                    subscribe_response::Message::TokenRenewal(renewal) => {
                        keep_renewal(renewals, renewal);
                        continue;
                    }
                    update => update,
                };
                let snapshot = matches!(update, subscribe_response::Message::Snapshot(_));
                store.apply(update);
                if snapshot {
                    serving = true;
                    backoff.snapshot_received();
                    tracing::info!(version = store.current().version, "snapshot received");
                }
                if ack_at.is_none() && (store.current().version > acked || snapshot) {
                    let delay = config.ack_delay.mul_f64(0.5 + rand::thread_rng().r#gen::<f64>());
                    ack_at = Some(tokio::time::Instant::now() + delay);
                }
            }
            () = sleep_until_due(ack_at) => {
                ack_at = None;
                let version = store.current().version;
                acked = version;
                if tx.send(message(subscribe_request::Message::Ack(AgentAck { version }))).await.is_err() {
                    return Ended::Retry("the stream closed while acknowledging".into());
                }
            }
            _ = hint_timer.tick() => {
                store.gate().refusals().flush();
                let state = store.current();
                for (kind, held_version) in hints_due(&state, config.hint_after, SystemTime::now()) {
                    tracing::debug!(kind = kind.label(), held_version, "hinting for a refresh");
                    let hint = RefreshHint { kind: kind as i32, held_version };
                    if tx.send(message(subscribe_request::Message::RefreshHint(hint))).await.is_err() {
                        return Ended::Retry("the stream closed while hinting".into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that delivered its snapshot and lasted `up`.
    fn stream(backoff: &mut Backoff, up: Duration) -> impl Future<Output = Duration> + '_ {
        backoff.snapshot_received();
        async move {
            tokio::time::advance(up).await;
            backoff.stream_ended()
        }
    }

    /// Finding 6 (issue 34): what the agent's own decoder rejects is a
    /// refusal; the same status sent by the broker is the broker's.
    #[test]
    fn only_the_agents_own_size_and_decode_errors_are_refusals() {
        let mut undecodable = tonic::Status::invalid_argument("the message is not a valid …");
        assert_eq!(
            refused_message(&undecodable),
            None,
            "as the broker sends it"
        );
        assert!(matches!(classify(undecodable.clone()), Ended::Fatal(_)));
        undecodable.set_source(Arc::new(Undecodable));
        assert!(refused_message(&undecodable).is_some());

        let too_large = tonic::Status::out_of_range(format!(
            "{TOO_LARGE}: found 2097170 bytes, the limit is: 1048576 bytes"
        ));
        assert_eq!(
            refused_message(&too_large).as_deref(),
            Some(too_large.message())
        );
        let other = tonic::Status::out_of_range("the broker says so");
        assert_eq!(refused_message(&other), None);
    }

    #[test]
    fn a_broker_status_message_reaches_errors_printable_and_bounded() {
        let status = tonic::Status::permission_denied(format!(
            "no\nfix: run this\u{1b}[2J{}",
            "x".repeat(1 << 20)
        ));
        let Ended::Fatal(error) = classify(status) else {
            panic!("PERMISSION_DENIED is final");
        };
        let text = error.to_string();
        assert!(text.len() < REASON_MAX + 100, "{} bytes", text.len());
        assert!(!text.contains('\n') && !text.contains('\u{1b}'), "{text}");
        assert!(text.contains("no\\u{a}fix: run this\\u{1b}[2J"), "{text}");
        let Ended::Retry(reason) = classify(tonic::Status::unavailable("\r".repeat(1 << 20)))
        else {
            panic!("UNAVAILABLE is retried");
        };
        assert!(reason.len() < REASON_MAX + 100, "{} bytes", reason.len());
    }

    /// Finding 1 (issue 34): the broker ending a serving stream because its
    /// token expired is retried (with the renewal held); a refused call is
    /// final.
    #[test]
    fn an_expired_stream_is_retried_and_a_refused_call_is_final() {
        let expired = || {
            tonic::Status::unauthenticated(
                "the agent token expired at 2026-01-01T00:00:00Z; reconnect with a renewed token",
            )
        };
        let Ended::Retry(reason) = classify_serving(expired()) else {
            panic!("a serving stream's expiry is retried");
        };
        assert!(reason.contains("expired at"), "{reason}");
        assert!(matches!(
            classify(expired()),
            Ended::Fatal(SubscriptionError::Unauthenticated(_))
        ));
        assert!(matches!(
            classify_serving(tonic::Status::permission_denied("another cluster")),
            Ended::Fatal(SubscriptionError::PermissionDenied(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn streams_dropped_after_their_snapshot_keep_backing_off() {
        let mut backoff = Backoff::default();
        let mut ceilings = vec![backoff.ceiling()];
        for _ in 0..8 {
            let delay = stream(&mut backoff, Duration::from_millis(50)).await;
            assert!(delay <= *ceilings.last().unwrap());
            ceilings.push(backoff.ceiling());
        }
        let ms: Vec<u128> = ceilings.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000],
            "a snapshot alone must not reset the backoff"
        );
        // Just short of stable still counts as a failure.
        stream(&mut backoff, STABLE_AFTER - Duration::from_millis(1)).await;
        assert_eq!(backoff.ceiling(), BACKOFF_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_stayed_up_resets_the_backoff() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.stream_ended(); // connection refused: no snapshot
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(8));
        let delay = stream(&mut backoff, STABLE_AFTER).await;
        assert!(delay <= BACKOFF_BASE, "{delay:?}");
        assert_eq!(backoff.ceiling(), BACKOFF_BASE * 2);
        // A failure without a snapshot after that does not reset again.
        tokio::time::advance(Duration::from_secs(60)).await;
        backoff.stream_ended();
        assert_eq!(backoff.ceiling(), BACKOFF_BASE * 4);
    }

    /// Issue 32: an unreachable broker is reported with the connect error's
    /// cause (here: connection refused), not only "transport error".
    #[tokio::test]
    async fn an_unreachable_broker_is_reported_with_the_cause() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        }; // closed again: connecting is refused
        let address = BrokerAddress {
            url: format!("http://127.0.0.1:{port}"),
            token: "token".into(),
            cluster_id: "dev".into(),
            ca_cert: None,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        };
        let config = SubscriptionConfig::new(address.clone(), "w1");
        let mut client = Grpc::new(InterceptedService::new(
            address.channel().unwrap(),
            address.interceptor().unwrap(),
        ));
        let renewals = address.interceptor().unwrap();
        let ended = connection(
            &config,
            &CredentialStore::new(),
            &mut client,
            &renewals,
            &mut Backoff::default(),
        )
        .await;
        let Ended::Retry(reason) = ended else {
            panic!("an unreachable broker is retried");
        };
        assert!(reason.contains("Connection refused"), "{reason}");
        assert!(reason.contains(&format!("127.0.0.1:{port}")), "{reason}");
    }
}
