//! Per-cluster latest state and its fan-out.
//!
//! [`ClusterHub`] maps cluster ids to [`Cluster`]s. A cluster's state as
//! agents see it is one immutable [`ClusterState`] behind a `watch` channel:
//! publishing replaces it, and every agent stream diffs the newest state
//! against what it already sent. That is the design's "latest value, not a
//! queue": a slow agent skips intermediate versions, nothing is buffered per
//! agent beyond the transport's own window, and a fast agent is never held
//! back by a slow one.
//!
//! Versions are a hybrid clock: each change gets `max(previous + 1, the
//! broker's wall clock in microseconds)`. They increase strictly within a
//! broker's life and keep increasing across a restart (as long as the wall
//! clock does not jump back), so an agent's plain "newer than what I hold"
//! rule accepts what a restarted broker re-publishes.
//!
//! Everything else about a cluster — the publisher slot, the agent tally,
//! the refresh planner — lives in its mutex-protected inner part; the fan-out
//! path takes no lock. Agent streams do not wait on the `watch` itself (its
//! waiter list is one shared lock); each change rings the cluster's
//! [`Bell`], which wakes every stream through its own atomic waker.
//!
//! Clusters end: a cluster with no publisher, no agents and no live
//! credential for the grace period (`RefreshConfig::idle_cluster_grace`) is
//! removed from the hub by its own task, which then ends. The private env
//! does not keep a cluster alive: a publisher re-sends it on every connect,
//! as after a broker restart. The removal happens under the hub's write
//! lock and only while nothing but the map and the task holds the cluster,
//! so a hello that just looked the cluster up never registers into a
//! removed one.
//!
//! Each credential is encoded as its agent-bound `SubscribeResponse`, in
//! gRPC's length-prefixed framing, once, when it is published (the
//! `encoded` field of [`Slot::Credential`]); agent streams send those shared
//! bytes ([`SentVersions::catch_up`]) as they are, instead of cloning and
//! encoding the message once per agent.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::{
    AgentStatus, ClusterInfo, ClusterSnapshot, ClusterStatus, ClusterSummary, CredentialKind,
    CredentialStatus, CredentialUpdate, EnvVar, PrivateEnv, PrivateEnvStatus, RefreshCount,
    RefreshReason, RefreshRequest, Revocation, SubscribeResponse, TakeoverStatus, UpdateAck,
    credential_update::Credential, subscribe_response,
};
use prost::bytes::Bytes;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tonic::Status;
use zeroize::Zeroize;

use crate::bell::{Bell, BellHandle};
use crate::limits;
use crate::refresh::{RefreshConfig, RefreshPlanner};

/// One slot of a cluster's state.
#[derive(Clone, Debug, Default)]
pub enum Slot {
    /// Nothing held (never published, or expired).
    #[default]
    Empty,
    /// A live credential and when it expires on the broker's clock.
    Credential {
        /// The update as agents receive it (version set).
        update: Arc<CredentialUpdate>,
        /// Expiry on the tokio clock.
        expires: Instant,
        /// `update` encoded once as the `SubscribeResponse` agents receive,
        /// with its gRPC message prefix, shared by every agent stream;
        /// zeroized when the last one drops.
        encoded: Bytes,
    },
    /// The whole private env (replace_all set).
    Env(Arc<PrivateEnv>),
    /// Revoked at this version.
    Revoked(u64),
}

impl Slot {
    /// The version of what the slot holds; 0 when empty.
    pub fn version(&self) -> u64 {
        match self {
            Slot::Empty => 0,
            Slot::Credential { update, .. } => update.version,
            Slot::Env(env) => env.version,
            Slot::Revoked(version) => *version,
        }
    }
}

/// A cluster's state as agents see it. Immutable once published.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// The latest version of anything in the cluster.
    pub version: u64,
    /// The publisher's declaration.
    pub info: Option<ClusterInfo>,
    /// The AWS credential slot.
    pub aws: Slot,
    /// The GCP credential slot.
    pub gcp: Slot,
    /// The private env slot.
    pub env: Slot,
}

impl ClusterState {
    fn credential_slot(&self, kind: CredentialKind) -> Option<&Slot> {
        match kind {
            CredentialKind::Aws => Some(&self.aws),
            CredentialKind::Gcp => Some(&self.gcp),
            CredentialKind::Unspecified => None,
        }
    }

    fn credential_slot_mut(&mut self, kind: CredentialKind) -> Option<&mut Slot> {
        match kind {
            CredentialKind::Aws => Some(&mut self.aws),
            CredentialKind::Gcp => Some(&mut self.gcp),
            CredentialKind::Unspecified => None,
        }
    }

    /// The live credential of `kind` at `now`, if any.
    pub fn live(&self, kind: CredentialKind, now: Instant) -> Option<&Arc<CredentialUpdate>> {
        match self.credential_slot(kind)? {
            Slot::Credential {
                update, expires, ..
            } if *expires > now => Some(update),
            _ => None,
        }
    }

    /// The full snapshot an agent receives first.
    pub fn snapshot(&self, now: Instant) -> ClusterSnapshot {
        ClusterSnapshot {
            version: self.version,
            info: self.info.clone(),
            credentials: [CredentialKind::Aws, CredentialKind::Gcp]
                .into_iter()
                .filter_map(|kind| self.live(kind, now).map(|u| (**u).clone()))
                .collect(),
            private_env: match &self.env {
                Slot::Env(env) => Some((**env).clone()),
                _ => None,
            },
        }
    }
}

/// What an agent stream has already sent, per slot.
#[derive(Clone, Copy, Debug, Default)]
pub struct SentVersions {
    info: u64,
    aws: u64,
    gcp: u64,
    env: u64,
}

impl SentVersions {
    /// The versions a snapshot of `state` covers.
    pub fn of(state: &ClusterState) -> Self {
        Self {
            info: state.info.as_ref().map_or(0, |i| i.version),
            aws: state.aws.version(),
            gcp: state.gcp.version(),
            env: state.env.version(),
        }
    }

    /// The messages that bring an agent from `self` to `state`, oldest slot
    /// first; updates `self`. Expired credentials are skipped, never sent.
    /// Credentials come as their shared, already encoded `SubscribeResponse`
    /// bytes: no clone and no encoding per agent.
    pub fn catch_up(&mut self, state: &ClusterState, now: Instant, out: &mut impl Extend<CatchUp>) {
        self.walk(state, now, |item| out.extend(std::iter::once(item)));
    }

    fn walk(&mut self, state: &ClusterState, now: Instant, mut emit: impl FnMut(CatchUp)) {
        use subscribe_response::Message;
        if let Some(info) = &state.info
            && info.version > self.info
        {
            self.info = info.version;
            emit(CatchUp::Message(Message::ClusterInfo(info.clone())));
        }
        for (kind, sent) in [
            (CredentialKind::Aws, &mut self.aws),
            (CredentialKind::Gcp, &mut self.gcp),
        ] {
            let slot = state.credential_slot(kind).expect("known kind");
            if slot.version() <= *sent {
                continue;
            }
            *sent = slot.version();
            match slot {
                Slot::Credential {
                    expires, encoded, ..
                } if *expires > now => {
                    emit(CatchUp::Encoded(encoded.clone()));
                }
                Slot::Revoked(version) => emit(CatchUp::Message(Message::Revocation(Revocation {
                    kinds: vec![kind as i32],
                    private_env: false,
                    version: *version,
                }))),
                _ => {}
            }
        }
        if state.env.version() > self.env {
            self.env = state.env.version();
            match &state.env {
                Slot::Env(env) => emit(CatchUp::Message(Message::PrivateEnv((**env).clone()))),
                Slot::Revoked(version) => emit(CatchUp::Message(Message::Revocation(Revocation {
                    kinds: vec![],
                    private_env: true,
                    version: *version,
                }))),
                _ => {}
            }
        }
    }
}

/// One message of an agent's catch-up, as [`SentVersions::catch_up`] yields
/// it.
#[derive(Debug)]
// A stream queues at most a few of these; boxing the message would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
pub enum CatchUp {
    /// A credential's whole `SubscribeResponse` as a gRPC length-prefixed
    /// message, encoded once when it was published and shared by every
    /// agent stream.
    Encoded(Bytes),
    /// Any other message (cluster info, private env, revocation, the
    /// snapshot), encoded per stream.
    Message(subscribe_response::Message),
}

/// Owns encoded secret bytes and zeroizes them when the last [`Bytes`]
/// sharing them drops.
struct ZeroizedOnDrop(Vec<u8>);

impl AsRef<[u8]> for ZeroizedOnDrop {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for ZeroizedOnDrop {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// `update` as the `SubscribeResponse` an agent receives, encoded once.
fn encode_for_agents(update: &CredentialUpdate) -> Bytes {
    let response = SubscribeResponse {
        message: Some(subscribe_response::Message::Credential(update.clone())),
    };
    let mut framed = Vec::new();
    grpc_frame_into(&response, &mut framed);
    Bytes::from_owner(ZeroizedOnDrop(framed))
}

/// Appends `message` to `out` as one gRPC message: a zero byte (not
/// compressed), the length as a big-endian u32, the encoded message.
pub fn grpc_frame_into(message: &impl prost::Message, out: &mut Vec<u8>) {
    let len = message.encoded_len();
    out.reserve(5 + len);
    out.push(0);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message.encode(out).expect("a Vec grows to fit the message");
}

/// Messages the broker pushes to the connected publisher.
#[derive(Debug)]
pub enum PublisherEvent {
    /// Send this refresh request.
    Refresh(RefreshRequest),
    /// Another publisher took over: end the stream with ABORTED.
    TakenOver,
}

struct PublisherSlot {
    conn: u64,
    name: String,
    events: mpsc::UnboundedSender<PublisherEvent>,
}

/// The most displaced publisher names a cluster remembers for the hold-down
/// (oldest forgotten first), so that a token cycling through names cannot
/// grow the list without bound.
const MAX_HELD_DOWN_NAMES: usize = 16;

struct AgentEntry {
    conn: u64,
    acked: u64,
    connected_at: SystemTime,
}

struct Inner {
    publisher: Option<PublisherSlot>,
    agents: HashMap<String, AgentEntry>,
    /// Agents whose ack covers the latest version.
    agents_current: u32,
    planner: RefreshPlanner,
    /// Lifetimes of the held credentials, for `GetCluster`.
    issued: BTreeMap<i32, SystemTime>,
    expires_wall: BTreeMap<i32, SystemTime>,
    next_conn: u64,
    /// Publisher names displaced recently, and until when they may not take
    /// the cluster back.
    held_down: Vec<(String, Instant)>,
    takeovers: u64,
    takeovers_refused: u64,
    last_takeover: Option<(SystemTime, String)>,
    /// Since when the cluster has had no publisher, no agents and no live
    /// credential; `None` while it has any.
    idle_since: Option<Instant>,
}

/// One cluster: latest state, publisher, agents, refresh planner.
pub struct Cluster {
    id: String,
    heartbeat_interval: Duration,
    takeover_hold_down: Duration,
    idle_grace: Duration,
    state: watch::Sender<Arc<ClusterState>>,
    acks: watch::Sender<UpdateAck>,
    inner: Mutex<Inner>,
    wake_planner: Notify,
    bell: Arc<Bell>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Registration of a live publisher stream; ends it in the cluster on drop.
#[derive(Debug)]
pub struct PublisherRegistration {
    cluster: Arc<Cluster>,
    conn: u64,
}

impl PublisherRegistration {
    /// The publisher left a heartbeat unanswered: hold refresh requests and
    /// suspend the deadlines of those it was sent.
    pub fn unresponsive(&self) {
        self.cluster.publisher_unresponsive(self.conn);
    }

    /// The publisher answered a heartbeat: send what was held.
    pub fn resumed(&self) {
        self.cluster.publisher_resumed(self.conn);
    }
}

impl Drop for PublisherRegistration {
    fn drop(&mut self) {
        self.cluster.publisher_gone(self.conn);
    }
}

/// Registration of a live agent stream; removes it from the tally on drop
/// (dropping the response stream unsubscribes).
#[derive(Debug)]
pub struct AgentRegistration {
    cluster: Arc<Cluster>,
    agent_id: String,
    conn: u64,
}

impl AgentRegistration {
    /// The cluster.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Records an ack from this agent.
    pub fn ack(&self, version: u64) {
        self.cluster.ack(&self.agent_id, self.conn, version);
    }
}

impl Drop for AgentRegistration {
    fn drop(&mut self) {
        self.cluster.agent_gone(&self.agent_id, self.conn);
    }
}

impl Cluster {
    fn new(id: String, refresh: RefreshConfig) -> Self {
        Self {
            id,
            heartbeat_interval: refresh.heartbeat_interval,
            takeover_hold_down: refresh.takeover_hold_down,
            idle_grace: refresh.idle_cluster_grace,
            state: watch::Sender::new(Arc::new(ClusterState::default())),
            acks: watch::Sender::new(UpdateAck::default()),
            inner: Mutex::new(Inner {
                publisher: None,
                agents: HashMap::new(),
                agents_current: 0,
                planner: RefreshPlanner::new(refresh),
                issued: BTreeMap::new(),
                expires_wall: BTreeMap::new(),
                next_conn: 1,
                held_down: Vec::new(),
                takeovers: 0,
                takeovers_refused: 0,
                last_takeover: None,
                idle_since: None,
            }),
            wake_planner: Notify::new(),
            bell: Arc::new(Bell::default()),
        }
    }

    /// The cluster id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How often a publisher that answers heartbeats gets one.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// A receiver of the cluster's state, for an agent stream: the stream
    /// reads the state with it (`has_changed`, `borrow_and_update`) and
    /// waits on the returned [`BellHandle`], which every change rings.
    pub fn watch(&self) -> (watch::Receiver<Arc<ClusterState>>, BellHandle) {
        (self.state.subscribe(), self.bell.register())
    }

    fn ring(&self) {
        self.bell.ring();
    }

    /// A receiver of ack progress, for the publisher stream.
    pub fn watch_acks(&self) -> watch::Receiver<UpdateAck> {
        self.acks.subscribe()
    }

    /// The current state.
    pub fn state(&self) -> Arc<ClusterState> {
        self.state.borrow().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change` to a copy of the state under the cluster lock and
    /// publishes it with the next version. Returns that version.
    fn publish_with(&self, inner: &mut Inner, change: impl FnOnce(&mut ClusterState, u64)) -> u64 {
        let mut version = 0;
        self.state.send_modify(|state| {
            let mut next = (**state).clone();
            version = (next.version + 1).max(wall_micros());
            next.version = version;
            change(&mut next, version);
            *state = Arc::new(next);
        });
        self.ring();
        // Nobody holds the new version yet.
        inner.agents_current = 0;
        self.publish_acks(inner);
        version
    }

    fn publish_acks(&self, inner: &Inner) {
        let ack = UpdateAck {
            version: self.state.borrow().version,
            agents_current: inner.agents_current,
            agents_connected: inner.agents.len() as u32,
        };
        self.acks.send_if_modified(|held| {
            let changed = *held != ack;
            *held = ack;
            changed
        });
    }

    fn info(&self) -> Option<ClusterInfo> {
        self.state.borrow().info.clone()
    }

    /// Registers a publisher after its hello; takes over from an older one.
    /// Returns the registration, the event receiver and the refresh
    /// requests to send right after the welcome.
    ///
    /// A publisher `name` displaced from this cluster less than the takeover
    /// hold-down ago may not take it back from a responsive publisher:
    /// `RESOURCE_EXHAUSTED` naming the wait, and nothing changes. That
    /// bounds two supervised publishers that keep restarting to one
    /// takeover per hold-down, instead of one per restart.
    #[allow(clippy::type_complexity)]
    pub fn connect_publisher(
        self: &Arc<Self>,
        kinds: Vec<CredentialKind>,
        private_env: bool,
        name: &str,
    ) -> Result<
        (
            PublisherRegistration,
            mpsc::UnboundedReceiver<PublisherEvent>,
            Vec<RefreshRequest>,
        ),
        Status,
    > {
        let (events, receiver) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut inner = self.lock();
        inner.held_down.retain(|(_, until)| *until > now);
        if let Some(current) = &inner.publisher
            && inner.planner.publisher_responsive()
            && let Some((_, until)) = inner.held_down.iter().find(|(held, _)| held == name)
        {
            let wait = until.duration_since(now).as_secs().max(1);
            let holder = current.name.clone();
            inner.takeovers_refused += 1;
            tracing::info!(cluster = %self.id, publisher = ?name, holder = ?holder, wait_s = wait,
                "takeover refused: the publisher was displaced within the hold-down");
            return Err(Status::resource_exhausted(format!(
                "publisher {name:?} was displaced from cluster {:?} by {holder:?} and may not take it back for {wait}s (takeover hold-down); stop the other publisher, or retry later",
                self.id
            )));
        }
        let conn = inner.next_conn;
        inner.next_conn += 1;
        inner.idle_since = None;
        let slot = PublisherSlot {
            conn,
            name: name.to_owned(),
            events,
        };
        if let Some(old) = inner.publisher.replace(slot) {
            tracing::info!(cluster = %self.id, publisher = ?name, displaced = ?old.name, "a new publisher takes over the cluster");
            let _ = old.events.send(PublisherEvent::TakenOver);
            inner.takeovers += 1;
            inner.last_takeover = Some((SystemTime::now(), old.name.clone()));
            inner.held_down.retain(|(held, _)| *held != old.name);
            if inner.held_down.len() >= MAX_HELD_DOWN_NAMES {
                inner.held_down.remove(0);
            }
            inner
                .held_down
                .push((old.name, now + self.takeover_hold_down));
        }
        let kind_values: Vec<i32> = kinds.iter().map(|k| *k as i32).collect();
        self.publish_with(&mut inner, |state, version| {
            state.info = Some(ClusterInfo {
                kinds: kind_values,
                private_env,
                publisher_connected: true,
                version,
            });
        });
        let now = Instant::now();
        let state = self.state();
        let requests =
            inner
                .planner
                .publisher_connected(&kinds, |kind| state.live(kind, now).is_some(), now);
        drop(inner);
        self.wake_planner.notify_one();
        Ok((
            PublisherRegistration {
                cluster: self.clone(),
                conn,
            },
            receiver,
            requests,
        ))
    }

    fn publisher_unresponsive(&self, conn: u64) {
        let mut inner = self.lock();
        if inner.publisher.as_ref().is_none_or(|p| p.conn != conn)
            || !inner.planner.publisher_responsive()
        {
            return;
        }
        tracing::warn!(cluster = %self.id, "the publisher left a heartbeat unanswered; holding refresh requests until it answers");
        inner.planner.publisher_unresponsive();
        drop(inner);
        self.wake_planner.notify_one();
    }

    fn publisher_resumed(&self, conn: u64) {
        let mut inner = self.lock();
        if inner.publisher.as_ref().is_none_or(|p| p.conn != conn)
            || inner.planner.publisher_responsive()
        {
            return;
        }
        tracing::info!(cluster = %self.id, "the publisher answers again");
        let requests = inner.planner.publisher_resumed(Instant::now());
        self.send_requests(&inner, requests.into_iter());
        drop(inner);
        self.wake_planner.notify_one();
    }

    fn publisher_gone(&self, conn: u64) {
        let mut inner = self.lock();
        if inner.publisher.as_ref().is_none_or(|p| p.conn != conn) {
            return; // taken over: the new publisher owns the slot
        }
        inner.publisher = None;
        inner.planner.publisher_disconnected();
        if let Some(mut info) = self.info() {
            self.publish_with(&mut inner, |state, version| {
                info.publisher_connected = false;
                info.version = version;
                state.info = Some(info);
            });
        }
        drop(inner);
        // The cluster may have become idle.
        self.wake_planner.notify_one();
    }

    /// The welcome for a publisher that just connected.
    pub fn missing(&self, kinds: &[CredentialKind]) -> (Vec<CredentialKind>, bool, u32) {
        let state = self.state();
        let now = Instant::now();
        let missing = kinds
            .iter()
            .copied()
            .filter(|k| state.live(*k, now).is_none())
            .collect();
        let env_missing = !matches!(state.env, Slot::Env(_));
        (missing, env_missing, self.lock().agents.len() as u32)
    }

    /// Accepts a checked credential from the publisher; returns its version,
    /// or `None` if it answers a refresh request that is no longer the
    /// kind's current one (superseded: dropped, so that a backlog of answers
    /// does not fan out one version each).
    pub fn publish_credential(
        &self,
        mut update: CredentialUpdate,
        lifetime: limits::CheckedLifetime,
    ) -> Option<u64> {
        let kind = update.kind();
        let now = Instant::now();
        let now_wall = SystemTime::now();
        let remaining = lifetime
            .expires_at
            .duration_since(now_wall)
            .unwrap_or_default();
        update.issued_at = Some(timestamp(lifetime.issued_at));
        let live = self.state().live(kind, now).is_some();
        let mut inner = self.lock();
        if !inner
            .planner
            .accepts_answer(kind, &update.refresh_request_id, live)
        {
            return None;
        }
        let version = self.publish_with(&mut inner, |state, version| {
            update.version = version;
            let encoded = encode_for_agents(&update);
            *state.credential_slot_mut(kind).expect("checked kind") = Slot::Credential {
                update: Arc::new(update),
                expires: now + remaining,
                encoded,
            };
        });
        inner.planner.credential_accepted(
            kind,
            lifetime.issued_at,
            lifetime.expires_at,
            now,
            now_wall,
        );
        inner.issued.insert(kind as i32, lifetime.issued_at);
        inner.expires_wall.insert(kind as i32, lifetime.expires_at);
        drop(inner);
        self.wake_planner.notify_one();
        Some(version)
    }

    /// Applies a checked private env change; returns the version that holds
    /// it (unchanged if the change changed nothing).
    pub fn publish_env(&self, change: PrivateEnv) -> Result<u64, Status> {
        let mut inner = self.lock();
        if change.sealed.is_some() {
            // Sealed: the whole env, which the broker cannot read or merge;
            // relayed as it came (checked by `limits::check_env_change`).
            return Ok(self.publish_with(&mut inner, |state, version| {
                state.env = Slot::Env(Arc::new(PrivateEnv {
                    set: vec![],
                    unset: vec![],
                    replace_all: true,
                    version,
                    sealed: change.sealed,
                }));
            }));
        }
        let state = self.state();
        let current: &[EnvVar] = match &state.env {
            Slot::Env(env) => &env.set,
            _ => &[],
        };
        let mut vars: BTreeMap<&str, &str> = if change.replace_all {
            BTreeMap::new()
        } else {
            current
                .iter()
                .map(|v| (v.name.as_str(), v.value.as_str()))
                .collect()
        };
        for var in &change.set {
            vars.insert(&var.name, &var.value);
        }
        if !change.replace_all {
            for name in &change.unset {
                vars.remove(name.as_str());
            }
        }
        let set: Vec<EnvVar> = vars
            .into_iter()
            .map(|(name, value)| EnvVar {
                name: name.to_owned(),
                value: value.to_owned(),
            })
            .collect();
        limits::check_env_result(&set)?;
        if matches!(state.env, Slot::Env(_)) && set.as_slice() == current {
            return Ok(state.env.version());
        }
        Ok(self.publish_with(&mut inner, |state, version| {
            state.env = Slot::Env(Arc::new(PrivateEnv {
                set,
                unset: vec![],
                replace_all: true,
                version,
                sealed: None,
            }));
        }))
    }

    /// Revokes credential kinds (and the env); agents stop serving them at
    /// once. Returns the revocation's version.
    pub fn revoke(&self, kinds: &[CredentialKind], env: bool) -> u64 {
        let mut inner = self.lock();
        for kind in kinds {
            inner.planner.revoked(*kind);
            inner.issued.remove(&(*kind as i32));
            inner.expires_wall.remove(&(*kind as i32));
        }
        self.publish_with(&mut inner, |state, version| {
            for kind in kinds {
                if let Some(slot) = state.credential_slot_mut(*kind) {
                    *slot = Slot::Revoked(version);
                }
            }
            if env {
                state.env = Slot::Revoked(version);
            }
        })
    }

    /// Records a publisher's refresh error; a `permanent` one stops the
    /// kind until the publisher reconnects or publishes it.
    pub fn refresh_failed(&self, id: &str, message: String, permanent: bool) {
        let known = self
            .lock()
            .planner
            .refresh_failed(id, message, permanent, Instant::now());
        if known {
            self.wake_planner.notify_one();
        } else {
            tracing::debug!(cluster = %self.id, request = id, "refresh error for an unknown or superseded request");
        }
    }

    /// An agent's hint: asks for a refresh unless the broker already holds a
    /// newer credential than the agent, or one is in flight.
    pub fn hint(&self, kind: CredentialKind, held_version: u64) {
        let state = self.state();
        let now = Instant::now();
        let mut inner = self.lock();
        let newer_and_fresh = state
            .live(kind, now)
            .is_some_and(|held| held.version > held_version)
            && inner.planner.due(kind).is_none_or(|due| due > now);
        if newer_and_fresh {
            return;
        }
        let request = inner
            .planner
            .trigger(kind, RefreshReason::AgentRequested, now);
        self.send_requests(&inner, request.into_iter());
        drop(inner);
        self.wake_planner.notify_one();
    }

    fn send_requests(&self, inner: &Inner, requests: impl Iterator<Item = RefreshRequest>) {
        for request in requests {
            tracing::info!(cluster = %self.id, id = %request.id, kind = request.kind().label(),
                reason = ?request.reason(), "asking the publisher to refresh");
            if let Some(publisher) = &inner.publisher {
                let _ = publisher.events.send(PublisherEvent::Refresh(request));
            }
        }
    }

    /// Registers an agent stream.
    pub fn connect_agent(self: &Arc<Self>, agent_id: String) -> AgentRegistration {
        let mut inner = self.lock();
        let conn = inner.next_conn;
        inner.next_conn += 1;
        inner.idle_since = None;
        let previous = inner.agents.insert(
            agent_id.clone(),
            AgentEntry {
                conn,
                acked: 0,
                connected_at: SystemTime::now(),
            },
        );
        let latest = self.state.borrow().version;
        if previous.is_some_and(|p| p.acked >= latest && latest > 0) {
            inner.agents_current = inner.agents_current.saturating_sub(1);
        }
        self.publish_acks(&inner);
        AgentRegistration {
            cluster: self.clone(),
            agent_id,
            conn,
        }
    }

    fn ack(&self, agent_id: &str, conn: u64, version: u64) {
        let latest = self.state.borrow().version;
        let mut inner = self.lock();
        let Some(entry) = inner.agents.get_mut(agent_id).filter(|e| e.conn == conn) else {
            return;
        };
        // An ack beyond the latest version (an agent still holding what a
        // previous broker sent) covers no more than the latest.
        let version = version.min(latest);
        if version <= entry.acked {
            return;
        }
        let was_current = entry.acked >= latest;
        entry.acked = version;
        if !was_current && version >= latest {
            inner.agents_current += 1;
            self.publish_acks(&inner);
        }
    }

    fn agent_gone(&self, agent_id: &str, conn: u64) {
        let latest = self.state.borrow().version;
        let mut inner = self.lock();
        if inner.agents.get(agent_id).is_some_and(|e| e.conn == conn) {
            let entry = inner.agents.remove(agent_id).expect("checked");
            if entry.acked >= latest && latest > 0 {
                inner.agents_current = inner.agents_current.saturating_sub(1);
            }
            self.publish_acks(&inner);
            if inner.agents.is_empty() && inner.publisher.is_none() {
                drop(inner);
                // The cluster may have become idle.
                self.wake_planner.notify_one();
            }
        }
    }

    /// True if the cluster has no publisher, no agents and no live
    /// credential.
    fn idle(&self, inner: &Inner, now: Instant) -> bool {
        let state = self.state.borrow();
        inner.publisher.is_none()
            && inner.agents.is_empty()
            && state.live(CredentialKind::Aws, now).is_none()
            && state.live(CredentialKind::Gcp, now).is_none()
    }

    /// When the cluster may be dropped, if it is idle.
    fn idle_until(&self, inner: &mut Inner, now: Instant) -> Option<Instant> {
        if !self.idle(inner, now) {
            inner.idle_since = None;
            return None;
        }
        let since = *inner.idle_since.get_or_insert(now);
        Some(since + self.idle_grace)
    }

    /// Runs the planner's due work; returns when to run again and when the
    /// cluster may be dropped (if idle).
    fn plan(&self) -> (Option<Instant>, Option<Instant>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let (plan, next) = inner.planner.tick(now);
        if !plan.expired.is_empty() {
            // Drop expired credentials from the state without a new
            // version: agents check expiry themselves; later snapshots
            // simply no longer carry them.
            for kind in &plan.expired {
                tracing::info!(cluster = %self.id, kind = kind.label(), "credential expired; dropped");
                inner.issued.remove(&(*kind as i32));
                inner.expires_wall.remove(&(*kind as i32));
            }
            self.state.send_if_modified(|state| {
                let mut next = (**state).clone();
                let mut changed = false;
                for kind in &plan.expired {
                    let slot = next.credential_slot_mut(*kind).expect("known kind");
                    if matches!(slot, Slot::Credential { expires, .. } if *expires <= now) {
                        *slot = Slot::Empty;
                        changed = true;
                    }
                }
                if changed {
                    *state = Arc::new(next);
                }
                changed
            });
        }
        self.send_requests(&inner, plan.send.into_iter());
        let idle_until = self.idle_until(&mut inner, now);
        (next, idle_until)
    }

    /// Everything about the cluster except secrets.
    pub fn status(&self) -> ClusterStatus {
        let state = self.state();
        let now = Instant::now();
        let inner = self.lock();
        let credentials = [CredentialKind::Aws, CredentialKind::Gcp]
            .into_iter()
            .filter_map(|kind| {
                let update = state.live(kind, now)?;
                let (principal, account) = match &update.credential {
                    Some(Credential::Aws(aws)) => {
                        (aws.principal_arn.clone(), aws.account_id.clone())
                    }
                    Some(Credential::Gcp(gcp)) => {
                        (gcp.principal_email.clone(), gcp.project_id.clone())
                    }
                    None => Default::default(),
                };
                Some(CredentialStatus {
                    kind: kind as i32,
                    version: update.version,
                    issued_at: update.issued_at,
                    expires_at: update.expires_at,
                    principal,
                    account,
                    sealed: update.sealed.is_some(),
                    access_end: update.access_end.clone(),
                })
            })
            .collect();
        let private_env = match &state.env {
            Slot::Env(env) => Some(PrivateEnvStatus {
                version: env.version,
                names: env.set.iter().map(|v| v.name.clone()).collect(),
                sealed: env.sealed.is_some(),
            }),
            _ => None,
        };
        let mut agents: Vec<AgentStatus> = inner
            .agents
            .iter()
            .map(|(id, entry)| AgentStatus {
                agent_id: id.clone(),
                acked_version: entry.acked,
                connected_at: Some(timestamp(entry.connected_at)),
            })
            .collect();
        agents.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        let (last_at, last_displaced) = match &inner.last_takeover {
            Some((at, name)) => (Some(timestamp(*at)), name.clone()),
            None => (None, String::new()),
        };
        ClusterStatus {
            cluster_id: self.id.clone(),
            version: state.version,
            info: state.info.clone(),
            credentials,
            private_env,
            agents,
            pending_refreshes: inner.planner.pending(),
            refresh_counts: inner.planner.counts(),
            last_refresh_error: inner.planner.last_error().to_owned(),
            publisher_name: inner
                .publisher
                .as_ref()
                .map(|p| p.name.clone())
                .unwrap_or_default(),
            publisher_responsive: inner.planner.publisher_responsive(),
            takeovers: Some(TakeoverStatus {
                count: inner.takeovers,
                last_at,
                last_displaced,
                refused: inner.takeovers_refused,
            }),
            stopped_refreshes: inner.planner.stopped(),
        }
    }

    /// One line of `ListClusters`.
    pub fn summary(&self) -> ClusterSummary {
        let state = self.state();
        ClusterSummary {
            cluster_id: self.id.clone(),
            version: state.version,
            publisher_connected: state.info.as_ref().is_some_and(|i| i.publisher_connected),
            agents_connected: self.lock().agents.len() as u32,
        }
    }

    /// What `--metrics-listen` reports of the cluster ([`crate::metrics`]):
    /// the state's `Arc` and a few figures copied under the lock, without
    /// building the whole [`ClusterStatus`] (no agent list), so a scrape
    /// stays cheap at many clusters and agents.
    pub fn metrics(&self) -> ClusterMetrics {
        let state = self.state();
        let inner = self.lock();
        ClusterMetrics {
            state,
            agents: inner.agents.len(),
            publisher_responsive: inner.planner.publisher_responsive(),
            takeovers: inner.takeovers,
            takeovers_refused: inner.takeovers_refused,
            stopped: inner.planner.stopped().iter().map(|s| s.kind()).collect(),
            refresh_counts: inner.planner.counts(),
        }
    }

    /// Requests created for `reason` so far (tests, metrics).
    pub fn refresh_requested(&self, reason: RefreshReason) -> u64 {
        self.lock().planner.requested(reason)
    }
}

/// One cluster's figures for the metrics endpoint ([`Cluster::metrics`]).
/// The counts only grow while the cluster lives.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// The state as agents see it (version, declaration, credentials).
    pub state: Arc<ClusterState>,
    /// Agents subscribed.
    pub agents: usize,
    /// False while the connected publisher has a heartbeat unanswered.
    pub publisher_responsive: bool,
    /// Hellos that took the cluster from a connected publisher.
    pub takeovers: u64,
    /// Hellos refused by the takeover hold-down.
    pub takeovers_refused: u64,
    /// Kinds the broker stopped asking for after a permanent error.
    pub stopped: Vec<CredentialKind>,
    /// Refresh requests by reason and outcome.
    pub refresh_counts: Vec<RefreshCount>,
}

/// Hub-wide settings.
#[derive(Clone, Debug, Default)]
pub struct HubConfig {
    /// Refresh planning.
    pub refresh: RefreshConfig,
}

/// All clusters of this broker.
#[derive(Debug)]
pub struct ClusterHub {
    clusters: RwLock<HashMap<String, Arc<Cluster>>>,
    config: HubConfig,
    shutdown: watch::Sender<bool>,
    /// Clusters dropped after their idle grace period.
    dropped: AtomicU64,
}

impl ClusterHub {
    /// An empty hub.
    pub fn new(config: HubConfig) -> Arc<Self> {
        Arc::new(Self {
            clusters: RwLock::new(HashMap::new()),
            config,
            shutdown: watch::Sender::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    /// How many clusters the hub holds.
    pub fn len(&self) -> usize {
        self.clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// True if the hub holds no cluster.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many clusters were dropped after their idle grace period.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Removes `cluster` if it is still idle past its grace period and
    /// nothing but the map and its own task holds it (so no hello is between
    /// looking it up and registering). Returns true once it is gone.
    fn remove_if_idle(&self, cluster: &Arc<Cluster>) -> bool {
        let mut clusters = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        match clusters.get(&cluster.id) {
            Some(held) if Arc::ptr_eq(held, cluster) => {}
            _ => return true,
        }
        // The map's reference and the task's.
        if Arc::strong_count(cluster) > 2 {
            return false;
        }
        let now = Instant::now();
        let mut inner = cluster.lock();
        if cluster
            .idle_until(&mut inner, now)
            .is_none_or(|at| at > now)
        {
            return false;
        }
        drop(inner);
        clusters.remove(&cluster.id);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cluster = %cluster.id, "cluster idle past its grace period; dropped");
        true
    }

    /// The cluster `id`, created (with its planner task) if new.
    pub fn cluster(self: &Arc<Self>, id: &str) -> Arc<Cluster> {
        if let Some(cluster) = self.get(id) {
            return cluster;
        }
        let mut clusters = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        if let Some(cluster) = clusters.get(id) {
            return cluster.clone();
        }
        let cluster = Arc::new(Cluster::new(id.to_owned(), self.config.refresh.clone()));
        clusters.insert(id.to_owned(), cluster.clone());
        tokio::spawn(drive_cluster(
            cluster.clone(),
            Arc::downgrade(self),
            self.shutdown.subscribe(),
        ));
        cluster
    }

    /// The cluster `id`, if the broker has state for it.
    pub fn get(&self, id: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every cluster, sorted by id.
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let mut all: Vec<_> = self
            .clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// Resolves when the broker starts shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Starts shutting down: every stream ends with UNAVAILABLE.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
        for cluster in self.all() {
            cluster.ring();
        }
    }
}

/// How soon an idle cluster that could not be dropped (something held it
/// for a moment: an admin call, a hello between lookup and registration)
/// is looked at again.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The cluster's task: runs its planner when due or woken, and drops the
/// cluster once it has been idle for the grace period, then ends.
async fn drive_cluster(
    cluster: Arc<Cluster>,
    hub: Weak<ClusterHub>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut next, idle_until) = cluster.plan();
        if let Some(at) = idle_until {
            if at <= Instant::now() {
                let Some(hub) = hub.upgrade() else { return };
                if hub.remove_if_idle(&cluster) {
                    return;
                }
                let recheck = Instant::now() + IDLE_RECHECK;
                next = Some(next.map_or(recheck, |n| n.min(recheck)));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = cluster.wake_planner.notified() => {}
            _ = shutdown.wait_for(|down| *down) => return,
        }
    }
}
