//! The credstream protocol as the bench's agents and publisher speak it:
//! one HTTP/2 connection per agent, a hello, the snapshot, then every
//! credential recorded and acknowledged as the real agent does (a jittered
//! ack delay around 500 ms, one ack for a burst of versions). The same
//! client drives the minimal tonic fan-out, which speaks the same services.
//!
//! With sealing ([`GrpcPeer::connect_sealed`], [`Sealing`]) the publisher
//! seals each version once with `credstream_proto::seal` (as `credstream
//! publish` does). With [`Sealing::On`] every agent passes each message
//! through its own `credstream_agent::seal::Gate`, the real agent's
//! verification path (open, check the clear metadata, the rollback rule),
//! before it reads the round: a sealed update carries no access key id in
//! clear, so an agent cannot record a round it did not open.
//!
//! On a cluster each agent opens on its own worker, in parallel with every
//! other; here N agents share one load process on the broker's two cores,
//! where N opens in a row would delay the *reception* of every later
//! agent's update and charge the broker's fan-out for work no broker does.
//! So an agent with sealing on records its update's arrival time and hands
//! it to [`DeferredOpens`]; once the round's updates are in, one task opens
//! each through that agent's own gate, timing each open alone, and records
//! the agent's latency as arrival + its own opening time: what the agent
//! would see on a worker of its own. An update its gate refuses is counted
//! in [`GrpcPeer::not_opened`] and never recorded. With
//! [`Sealing::Relay`] agents do not open: they read the round from the
//! sealed payload's clear sequence, which isolates what the sealed bytes
//! cost the broker and the wire from what opening costs the agents.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use credstream_agent::seal::Gate;
use credstream_proto::connect::{BrokerAddress, CallCredentials};
use credstream_proto::seal::SealKey;
use credstream_proto::v1::agent_service_client::AgentServiceClient;
use credstream_proto::v1::publisher_service_client::PublisherServiceClient;
use credstream_proto::v1::{
    AgentAck, AgentHello, CredentialKind, CredentialUpdate, PublishRequest, PublisherHello,
    RefreshHint, SubscribeRequest, SubscribeResponse, publish_request, publish_response,
    subscribe_request, subscribe_response,
};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Endpoint;

use super::Peer;
use crate::payload;
use crate::recorder::Recorder;

/// How long the first message of a stream may take.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A credstream-protocol server under test (the broker or the floor).
#[derive(Debug)]
pub struct GrpcPeer {
    dialer: AgentDialer,
    publisher: mpsc::Sender<PublishRequest>,
    publisher_task: JoinHandle<()>,
    refresh_requests: Arc<AtomicU64>,
    refresh_ids: Mutex<mpsc::UnboundedReceiver<String>>,
    hint: watch::Sender<u64>,
    hints_sent: Arc<AtomicUsize>,
    sealer: Option<Sealer>,
    not_opened: Arc<AtomicU64>,
    /// With [`Sealing::On`]: the updates waiting to be opened.
    deferred: Option<Arc<DeferredOpens>>,
    deferred_task: Option<JoinHandle<()>>,
}

/// Sealed updates that arrived, waiting to be opened by their agent's gate
/// (see the module doc).
#[derive(Debug)]
pub struct DeferredOpens {
    pending: std::sync::Mutex<Vec<PendingOpen>>,
    /// Rung when a round's N-th update arrives, and when the recorder is set.
    full: tokio::sync::Notify,
    recorder: std::sync::OnceLock<Arc<Recorder>>,
    not_opened: Arc<AtomicU64>,
}

#[derive(Debug)]
struct PendingOpen {
    index: usize,
    gate: Arc<Gate>,
    update: CredentialUpdate,
    arrived_ns: u64,
}

/// How long a partial round waits for more arrivals before its updates are
/// opened anyway (agents that lost the round must not hold back the rest).
const PARTIAL_ROUND_WAIT: Duration = Duration::from_secs(1);

impl DeferredOpens {
    fn new(not_opened: Arc<AtomicU64>) -> Self {
        Self {
            pending: std::sync::Mutex::new(Vec::new()),
            full: tokio::sync::Notify::new(),
            recorder: std::sync::OnceLock::new(),
            not_opened,
        }
    }

    fn push(&self, open: PendingOpen, recorder: &Arc<Recorder>) {
        if self.recorder.get().is_none() {
            let _ = self.recorder.set(recorder.clone());
            self.full.notify_one();
        }
        let mut pending = self.pending.lock().expect("deferred opens");
        pending.push(open);
        if pending.len() >= recorder.agents() {
            self.full.notify_one();
        }
    }

    fn len(&self) -> usize {
        self.pending.lock().expect("deferred opens").len()
    }

    /// Opens every round once its updates are in (or no more arrive for
    /// [`PARTIAL_ROUND_WAIT`]), each through its agent's gate and timed
    /// alone, and records arrival + opening time.
    async fn run(self: Arc<Self>) {
        loop {
            let Some(recorder) = self.recorder.get().cloned() else {
                self.full.notified().await;
                continue;
            };
            let mut seen = 0;
            loop {
                let full = self.full.notified();
                let len = self.len();
                if len >= recorder.agents() || (len > 0 && len == seen) {
                    break;
                }
                seen = len;
                let _ = tokio::time::timeout(PARTIAL_ROUND_WAIT, full).await;
            }
            let batch = std::mem::take(&mut *self.pending.lock().expect("deferred opens"));
            for open in batch {
                let started = Instant::now();
                let opened = open
                    .gate
                    .admit(subscribe_response::Message::Credential(open.update));
                let took = started.elapsed().as_nanos() as u64;
                match opened {
                    Some(subscribe_response::Message::Credential(opened)) => {
                        if let Some(round) = payload::round_of(&opened) {
                            recorder.record_at(open.index, round, open.arrived_ns + took);
                        }
                    }
                    _ => {
                        self.not_opened.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
    }
}

/// What a peer's publisher and agents do about sealing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sealing {
    /// Clear credentials, as `credstream publish --no-seal`.
    Off,
    /// Sealed by the publisher and relayed by the broker, but the agents do
    /// not open them (they read the round from the clear sequence): the
    /// cost of sealed bytes without the cost of opening.
    Relay,
    /// Sealed, and every agent opens each update through its own `Gate`,
    /// as `credstream-agent --seal-key-file` does.
    On,
}

impl Sealing {
    /// `off`, `relay` or `on`.
    pub fn label(self) -> &'static str {
        match self {
            Sealing::Off => "off",
            Sealing::Relay => "relay",
            Sealing::On => "on",
        }
    }
}

/// The publisher's sealing: the cluster's key, increasing sequences, and
/// the time spent sealing. `credstream publish` uses `max(previous + 1,
/// wall clock in µs)` (`credstream_client::seal::Sealer`); the bench uses
/// `max(previous + 1, base + round)` with `base` the wall clock in µs when
/// the publisher connected: the same magnitude, strictly increasing as the
/// rounds are, and a [`Sealing::Relay`] agent can tell the round from it.
#[derive(Debug)]
struct Sealer {
    key: SealKey,
    base: u64,
    last: u64,
    seals: u64,
    sealing: Duration,
}

impl Sealer {
    fn seal(&mut self, update: &CredentialUpdate) -> Result<CredentialUpdate> {
        // `payload::credential` sets the version to the round.
        self.last = (self.last + 1).max(self.base + update.version);
        let started = Instant::now();
        let sealed = credstream_proto::seal::seal_credential(&self.key, update, self.last)
            .context("seal the credential")?;
        self.sealing += started.elapsed();
        self.seals += 1;
        Ok(sealed)
    }
}

impl Drop for GrpcPeer {
    fn drop(&mut self) {
        self.publisher_task.abort();
        if let Some(task) = &self.deferred_task {
            task.abort();
        }
    }
}

fn request(message: subscribe_request::Message) -> SubscribeRequest {
    SubscribeRequest {
        message: Some(message),
    }
}

impl GrpcPeer {
    /// Opens the publisher stream on `url` and publishes round
    /// `first_round`, so that agents find a credential in their snapshot.
    /// Over TLS (`https://`) the publisher and every agent verify the
    /// server against the CA file `ca`.
    pub async fn connect(
        url: &str,
        cluster: &str,
        publisher_token: &str,
        agent_token: &str,
        ca: Option<PathBuf>,
        first_round: u64,
    ) -> Result<Self> {
        Self::connect_sealed(
            url,
            cluster,
            publisher_token,
            agent_token,
            ca,
            first_round,
            None,
        )
        .await
    }

    /// [`GrpcPeer::connect`], and with `seal` (a key for `cluster` and
    /// [`Sealing::Relay`] or [`Sealing::On`]) every credential this peer
    /// publishes is sealed once; with [`Sealing::On`] every agent it
    /// connects holds the key and opens each update through its own
    /// `Gate`, refusing anything else as `credstream-agent
    /// --seal-key-file` does.
    #[allow(clippy::too_many_arguments)]
    pub async fn connect_sealed(
        url: &str,
        cluster: &str,
        publisher_token: &str,
        agent_token: &str,
        ca: Option<PathBuf>,
        first_round: u64,
        seal: Option<(SealKey, Sealing)>,
    ) -> Result<Self> {
        let seal = seal.filter(|(_, mode)| *mode != Sealing::Off);
        let publisher_address = BrokerAddress {
            url: url.to_owned(),
            token: publisher_token.to_owned(),
            cluster_id: cluster.to_owned(),
            ca_cert: ca,
            client_identity: None,
            insecure: false,
            pins: Vec::new(),
        };
        let channel = publisher_address.endpoint()?.connect().await?;
        let mut client =
            PublisherServiceClient::with_interceptor(channel, publisher_address.interceptor()?);
        let (publisher, rx) = mpsc::channel(64);
        publisher
            .send(PublishRequest {
                message: Some(publish_request::Message::Hello(PublisherHello {
                    cluster_id: cluster.to_owned(),
                    kinds: vec![CredentialKind::Aws as i32],
                    private_env: false,
                    publisher_name: "credstream-bench".into(),
                    ..Default::default()
                })),
            })
            .await?;
        let mut inbound = client.publish(ReceiverStream::new(rx)).await?.into_inner();
        match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(response)))
                if matches!(
                    response.message,
                    Some(publish_response::Message::Welcome(_))
                ) => {}
            other => bail!("no welcome on the publish stream: {other:?}"),
        }
        let refresh_requests = Arc::new(AtomicU64::new(0));
        let (ids, refresh_ids) = mpsc::unbounded_channel();
        let publisher_task = tokio::spawn(read_publisher(inbound, refresh_requests.clone(), ids));
        let agent_address = BrokerAddress {
            token: agent_token.to_owned(),
            ..publisher_address
        };
        let base = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut dialer = AgentDialer::new(&agent_address)?;
        match &seal {
            Some((key, Sealing::On)) => dialer.seal_key = Some(key.clone()),
            Some((_, Sealing::Relay)) => dialer.sequence_base = Some(base),
            _ => {}
        }
        let not_opened = Arc::new(AtomicU64::new(0));
        let mut peer = Self {
            dialer,
            publisher,
            publisher_task,
            refresh_requests,
            refresh_ids: Mutex::new(refresh_ids),
            hint: watch::Sender::new(0),
            hints_sent: Arc::new(AtomicUsize::new(0)),
            sealer: seal.map(|(key, _)| Sealer {
                key,
                base,
                last: 0,
                seals: 0,
                sealing: Duration::ZERO,
            }),
            not_opened: not_opened.clone(),
            deferred: None,
            deferred_task: None,
        };
        if peer.dialer.seal_key.is_some() {
            let deferred = Arc::new(DeferredOpens::new(not_opened));
            peer.deferred_task = Some(tokio::spawn(deferred.clone().run()));
            peer.deferred = Some(deferred);
        }
        let first = peer.prepare(payload::credential(first_round))?;
        peer.send_credential(first).await?;
        Ok(peer)
    }

    /// The update as this peer publishes it: sealed if it has a key.
    fn prepare(&mut self, update: CredentialUpdate) -> Result<CredentialUpdate> {
        match &mut self.sealer {
            Some(sealer) => sealer.seal(&update),
            None => Ok(update),
        }
    }

    /// True if this peer seals what it publishes.
    pub fn sealed(&self) -> bool {
        self.sealer.is_some()
    }

    /// Seals made so far and the publisher's time spent in them.
    pub fn seals(&self) -> (u64, Duration) {
        self.sealer
            .as_ref()
            .map_or((0, Duration::ZERO), |s| (s.seals, s.sealing))
    }

    /// Credential updates the agents received but their gate did not let
    /// through (refused, or taken for a duplicate): 0 in a sound run.
    pub fn not_opened(&self) -> u64 {
        self.not_opened.load(Ordering::Acquire)
    }

    /// How this peer's agents connect.
    pub fn dialer(&self) -> &AgentDialer {
        &self.dialer
    }

    async fn send_credential(&self, update: credstream_proto::v1::CredentialUpdate) -> Result<()> {
        self.publisher
            .send(PublishRequest {
                message: Some(publish_request::Message::Credential(update)),
            })
            .await
            .context("the publish stream closed")
    }

    /// Refresh requests the publisher has received so far.
    pub fn refresh_requests(&self) -> u64 {
        self.refresh_requests.load(Ordering::Acquire)
    }

    /// Makes every connected agent send one refresh hint for the credential
    /// it holds, all at once; returns once `agents` hints were handed to
    /// their streams (or after `timeout`) with how many were.
    pub async fn hint_all(&self, agents: usize, timeout: Duration) -> usize {
        self.hints_sent.store(0, Ordering::Release);
        self.hint.send_modify(|generation| *generation += 1);
        let deadline = tokio::time::Instant::now() + timeout;
        while self.hints_sent.load(Ordering::Acquire) < agents
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.hints_sent.load(Ordering::Acquire)
    }

    /// Answers the next refresh request (waiting at most `timeout` for
    /// one) with a new credential, as a publisher's minter would.
    pub async fn answer_refresh(&self, round: u64, timeout: Duration) -> Result<bool> {
        let id = tokio::time::timeout(timeout, async {
            self.refresh_ids.lock().await.recv().await
        })
        .await;
        let Ok(Some(id)) = id else {
            return Ok(false);
        };
        let mut update = payload::credential(round);
        update.version = 0;
        update.refresh_request_id = id;
        self.send_credential(update).await?;
        Ok(true)
    }
}

async fn read_publisher(
    mut inbound: Streaming<credstream_proto::v1::PublishResponse>,
    count: Arc<AtomicU64>,
    ids: mpsc::UnboundedSender<String>,
) {
    while let Ok(Some(response)) = inbound.message().await {
        if let Some(publish_response::Message::RefreshRequest(request)) = response.message {
            count.fetch_add(1, Ordering::AcqRel);
            let _ = ids.send(request.id);
        }
    }
}

/// How an agent opens its Subscribe stream: the endpoint (TLS or not),
/// its token and cluster. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AgentDialer {
    endpoint: Endpoint,
    credentials: CallCredentials,
    cluster: String,
    /// The cluster's seal key, which every agent then holds.
    seal_key: Option<SealKey>,
    /// [`Sealing::Relay`]: round = the sealed sequence − this.
    sequence_base: Option<u64>,
}

/// A Subscribe stream that delivered its snapshot.
pub struct OpenStream {
    inbound: Streaming<SubscribeResponse>,
    tx: mpsc::Sender<SubscribeRequest>,
    held: u64,
    /// The agent's gate, which has seen the snapshot (with a seal key).
    gate: Option<Arc<Gate>>,
    /// The rounds of the credentials in the snapshot (opened, if sealed).
    pub snapshot_rounds: Vec<u64>,
}

impl AgentDialer {
    /// Agents of `address` (its token must have the agent role).
    pub fn new(address: &BrokerAddress) -> Result<Self> {
        Ok(Self {
            endpoint: address.endpoint()?,
            credentials: address.interceptor()?,
            cluster: address.cluster_id.clone(),
            seal_key: None,
            sequence_base: None,
        })
    }

    /// Connects agent `index` on a connection of its own, made now, says
    /// hello and waits for the snapshot.
    pub async fn open(&self, index: usize) -> Result<OpenStream> {
        let channel = self.endpoint.clone().connect().await?;
        let mut client = AgentServiceClient::with_interceptor(channel, self.credentials.clone());
        let (tx, rx) = mpsc::channel(8);
        tx.send(request(subscribe_request::Message::Hello(AgentHello {
            cluster_id: self.cluster.clone(),
            agent_id: format!("bench-agent-{index}"),
            // A benchmark run is far shorter than its tokens.
            accepts_token_renewal: false,
        })))
        .await?;
        let mut inbound = client
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message())
            .await
            .context("no snapshot in time")??;
        match first.and_then(|r| r.message) {
            Some(subscribe_response::Message::Snapshot(snapshot)) => {
                let held = snapshot
                    .credentials
                    .iter()
                    .map(|c| c.version)
                    .max()
                    .unwrap_or(0);
                let gate = self
                    .seal_key
                    .clone()
                    .map(|key| Arc::new(Gate::new(Some(key))));
                let snapshot = match &gate {
                    None => snapshot,
                    Some(gate) => match gate.admit(subscribe_response::Message::Snapshot(snapshot))
                    {
                        Some(subscribe_response::Message::Snapshot(opened)) => opened,
                        _ => bail!("the agent's gate dropped the snapshot"),
                    },
                };
                Ok(OpenStream {
                    inbound,
                    tx,
                    held,
                    gate,
                    snapshot_rounds: snapshot
                        .credentials
                        .iter()
                        .filter_map(payload::round_of)
                        .collect(),
                })
            }
            other => bail!("the first message was not a snapshot: {other:?}"),
        }
    }
}

/// Runs an open stream as the real agent does (recording every round into
/// `recorder` and acking once per burst) until the stream ends.
pub async fn run_stream(index: usize, open: OpenStream, recorder: Arc<Recorder>) {
    let (_never, hint) = watch::channel(0);
    agent_loop(AgentLoop {
        index,
        recorder,
        inbound: open.inbound,
        tx: open.tx,
        held: open.held,
        gate: open.gate,
        deferred: None,
        sequence_base: None,
        not_opened: Arc::new(AtomicU64::new(0)),
        hint,
        hints_sent: Arc::new(AtomicUsize::new(0)),
    })
    .await;
}

impl Peer for GrpcPeer {
    async fn connect_agent(&self, index: usize, recorder: Arc<Recorder>) -> Result<JoinHandle<()>> {
        let open = self.dialer.open(index).await?;
        Ok(tokio::spawn(agent_loop(AgentLoop {
            index,
            recorder,
            inbound: open.inbound,
            tx: open.tx,
            held: open.held,
            gate: open.gate,
            deferred: self.deferred.clone(),
            sequence_base: self.dialer.sequence_base,
            not_opened: self.not_opened.clone(),
            hint: self.hint.subscribe(),
            hints_sent: self.hints_sent.clone(),
        })))
    }

    async fn publish(&mut self, round: u64) -> Result<()> {
        let mut update = self.prepare(payload::credential(round))?;
        update.version = 0;
        self.send_credential(update).await
    }
}

struct AgentLoop {
    index: usize,
    recorder: Arc<Recorder>,
    inbound: Streaming<SubscribeResponse>,
    tx: mpsc::Sender<SubscribeRequest>,
    held: u64,
    gate: Option<Arc<Gate>>,
    /// Set: sealed updates are opened later, apart (see the module doc).
    deferred: Option<Arc<DeferredOpens>>,
    sequence_base: Option<u64>,
    not_opened: Arc<AtomicU64>,
    hint: watch::Receiver<u64>,
    hints_sent: Arc<AtomicUsize>,
}

/// Mean ack delay, as `credstream_agent::subscription` uses by default.
const ACK_DELAY: Duration = Duration::from_millis(500);

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn ack_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + ACK_DELAY.mul_f64(0.5 + rand::random::<f64>())
}

async fn agent_loop(mut a: AgentLoop) {
    let mut hint_open = true;
    // The snapshot is acknowledged like any version: later, with jitter.
    let mut ack_at = Some(ack_deadline());
    loop {
        tokio::select! {
            received = a.inbound.message() => {
                let Ok(Some(response)) = received else { return };
                if let Some(subscribe_response::Message::Credential(update)) = response.message {
                    if let (Some(deferred), Some(gate)) = (&a.deferred, &a.gate) {
                        a.held = update.version;
                        ack_at.get_or_insert_with(ack_deadline);
                        let arrived_ns = a.recorder.now_ns();
                        deferred.push(
                            PendingOpen { index: a.index, gate: gate.clone(), update, arrived_ns },
                            &a.recorder,
                        );
                        continue;
                    }
                    let update = match &a.gate {
                        None => update,
                        Some(gate) => match gate.admit(subscribe_response::Message::Credential(update)) {
                            Some(subscribe_response::Message::Credential(opened)) => opened,
                            _ => {
                                a.not_opened.fetch_add(1, Ordering::AcqRel);
                                continue;
                            }
                        },
                    };
                    let round = payload::round_of(&update).or_else(|| {
                        // Relay: not opened; the round from the clear sequence.
                        let base = a.sequence_base?;
                        update.sealed.as_ref()?.sequence.checked_sub(base)
                    });
                    if let Some(round) = round {
                        a.recorder.record(a.index, round);
                    }
                    a.held = update.version;
                    ack_at.get_or_insert_with(ack_deadline);
                }
            }
            () = sleep_until_due(ack_at) => {
                ack_at = None;
                let ack = request(subscribe_request::Message::Ack(AgentAck { version: a.held }));
                if a.tx.send(ack).await.is_err() {
                    return;
                }
            }
            changed = a.hint.changed(), if hint_open => {
                if changed.is_err() {
                    hint_open = false;
                    continue;
                }
                let hint = request(subscribe_request::Message::RefreshHint(RefreshHint {
                    kind: CredentialKind::Aws as i32,
                    held_version: a.held,
                }));
                if a.tx.send(hint).await.is_ok() {
                    a.hints_sent.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }
}
