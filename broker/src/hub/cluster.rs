//! [`Cluster`]: one cluster's latest state and everything that changes it —
//! publishes from its publisher, acks from its agents, the planner's
//! refresh requests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::{
    ClusterInfo, CredentialKind, CredentialUpdate, EnvVar, PrivateEnv, RefreshReason,
    RefreshRequest, UpdateAck,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tonic::Status;

use super::agents::{AgentRegistration, AgentTally};
use super::publisher::{HeldDown, PublisherEvent, PublisherRegistration, PublisherSlot};
use super::state::{ClusterState, Slot};
use crate::agent_wire::CredentialFrame;
use crate::bell::{Bell, BellHandle};
use crate::limits;
use crate::refresh::{RefreshConfig, RefreshPlanner};

/// Everything about a cluster but its state, under the cluster's lock.
pub(super) struct Inner {
    pub(super) publisher: PublisherSlot,
    pub(super) agents: AgentTally,
    pub(super) planner: RefreshPlanner,
    /// The id of the next publisher or agent stream.
    next_conn: u64,
    /// Since when the cluster has had no publisher, no agents and no live
    /// credential; `None` while it has any.
    pub(super) idle_since: Option<Instant>,
}

impl Inner {
    fn next_conn(&mut self) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        conn
    }
}

/// One cluster: latest state, publisher, agents, refresh planner.
pub struct Cluster {
    pub(super) id: String,
    heartbeat_interval: Duration,
    takeover_hold_down: Duration,
    pub(super) idle_grace: Duration,
    state: watch::Sender<Arc<ClusterState>>,
    acks: watch::Sender<UpdateAck>,
    inner: Mutex<Inner>,
    /// Wakes the cluster's task ([`super::driver`]) to run the planner.
    pub(super) wake_planner: Notify,
    bell: Arc<Bell>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The broker's wall clock in microseconds, the floor of the next version.
fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The version after `previous` at wall clock `clock`: the hybrid clock of
/// the module docs.
fn next_version(previous: u64, clock: u64) -> u64 {
    (previous + 1).max(clock)
}

impl Cluster {
    pub(super) fn new(id: String, refresh: RefreshConfig) -> Self {
        Self {
            id,
            heartbeat_interval: refresh.heartbeat_interval,
            takeover_hold_down: refresh.takeover_hold_down,
            idle_grace: refresh.idle_cluster_grace,
            state: watch::Sender::new(Arc::new(ClusterState::default())),
            acks: watch::Sender::new(UpdateAck::default()),
            inner: Mutex::new(Inner {
                publisher: PublisherSlot::default(),
                agents: AgentTally::default(),
                planner: RefreshPlanner::new(refresh),
                next_conn: 1,
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
    /// waits on the returned [`BellHandle`], which every change rings (and
    /// the broker's shutdown).
    pub fn watch(&self) -> (watch::Receiver<Arc<ClusterState>>, BellHandle) {
        (self.state.subscribe(), self.bell.register())
    }

    /// Wakes every agent stream of the cluster.
    pub(super) fn ring(&self) {
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

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies `change` to a copy of the state under the cluster lock and
    /// publishes it with the next version after `clock` (the wall clock in
    /// microseconds, read by the caller). Returns that version.
    fn publish_at(
        &self,
        inner: &mut Inner,
        clock: u64,
        change: impl FnOnce(&mut ClusterState, u64),
    ) -> u64 {
        let mut version = 0;
        self.state.send_modify(|state| {
            let mut next = (**state).clone();
            version = next_version(next.version, clock);
            next.version = version;
            change(&mut next, version);
            *state = Arc::new(next);
        });
        self.ring();
        // Nobody holds the new version yet.
        inner.agents.new_version();
        self.publish_acks(inner);
        version
    }

    /// [`publish_at`](Self::publish_at) the wall clock of now.
    fn publish_with(&self, inner: &mut Inner, change: impl FnOnce(&mut ClusterState, u64)) -> u64 {
        self.publish_at(inner, wall_micros(), change)
    }

    fn publish_acks(&self, inner: &Inner) {
        let ack = inner.agents.progress(self.state.borrow().version);
        self.acks.send_if_modified(|held| {
            let changed = *held != ack;
            *held = ack;
            changed
        });
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
        let responsive = inner.planner.publisher_responsive();
        if let Err(HeldDown { holder, wait_s }) = inner.publisher.admit(name, responsive, now) {
            tracing::info!(cluster = %self.id, publisher = ?name, holder = ?holder, wait_s,
                "takeover refused: the publisher was displaced within the hold-down");
            return Err(Status::resource_exhausted(format!(
                "publisher {name:?} was displaced from cluster {:?} by {holder:?} and may not take it back for {wait_s}s (takeover hold-down); stop the other publisher, or retry later",
                self.id
            )));
        }
        let conn = inner.next_conn();
        inner.idle_since = None;
        if let Some(displaced) =
            inner
                .publisher
                .connect(conn, name, events, now, self.takeover_hold_down)
        {
            tracing::info!(cluster = %self.id, publisher = ?name, displaced = ?displaced, "a new publisher takes over the cluster");
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

    pub(super) fn publisher_unresponsive(&self, conn: u64) {
        let mut inner = self.lock();
        if !inner.publisher.is(conn) || !inner.planner.publisher_responsive() {
            return;
        }
        tracing::warn!(cluster = %self.id, "the publisher left a heartbeat unanswered; holding refresh requests until it answers");
        inner.planner.publisher_unresponsive();
        drop(inner);
        self.wake_planner.notify_one();
    }

    pub(super) fn publisher_resumed(&self, conn: u64) {
        let mut inner = self.lock();
        if !inner.publisher.is(conn) || inner.planner.publisher_responsive() {
            return;
        }
        tracing::info!(cluster = %self.id, "the publisher answers again");
        let requests = inner.planner.publisher_resumed(Instant::now());
        self.send_requests(&inner, requests.into_iter());
        drop(inner);
        self.wake_planner.notify_one();
    }

    pub(super) fn publisher_gone(&self, conn: u64) {
        let mut inner = self.lock();
        if !inner.publisher.is(conn) {
            return; // taken over: the new publisher owns the slot
        }
        inner.publisher.disconnect();
        inner.planner.publisher_disconnected();
        let info = self.state.borrow().info.clone();
        if let Some(mut info) = info {
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
    ///
    /// The agent-bound frame is encoded before the cluster lock is taken,
    /// with the version the update will get unless another change comes
    /// first (then it is encoded again, under the lock).
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
        let clock = wall_micros();
        let (live, expected) = {
            let state = self.state.borrow();
            (
                state.live(kind, now).is_some(),
                next_version(state.version, clock),
            )
        };
        update.version = expected;
        let mut encoded = CredentialFrame::encode(&update);
        let mut inner = self.lock();
        if !inner
            .planner
            .accepts_answer(kind, &update.refresh_request_id, live)
        {
            return None;
        }
        let version = self.publish_at(&mut inner, clock, |state, version| {
            if version != expected {
                update.version = version;
                encoded = CredentialFrame::encode(&update);
            }
            *state.credentials.get_mut(kind).expect("checked kind") = Slot::Credential {
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
        }
        self.publish_with(&mut inner, |state, version| {
            for kind in kinds {
                if let Some(slot) = state.credentials.get_mut(*kind) {
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

    pub(super) fn send_requests(
        &self,
        inner: &Inner,
        requests: impl Iterator<Item = RefreshRequest>,
    ) {
        for request in requests {
            tracing::info!(cluster = %self.id, id = %request.id, kind = request.kind().label(),
                reason = ?request.reason(), "asking the publisher to refresh");
            inner.publisher.send(PublisherEvent::Refresh(request));
        }
    }

    /// Registers an agent stream.
    pub fn connect_agent(self: &Arc<Self>, agent_id: String) -> AgentRegistration {
        let mut inner = self.lock();
        let conn = inner.next_conn();
        inner.idle_since = None;
        let latest = self.state.borrow().version;
        inner.agents.connect(agent_id.clone(), conn, latest);
        self.publish_acks(&inner);
        AgentRegistration {
            cluster: self.clone(),
            agent_id,
            conn,
        }
    }

    pub(super) fn ack(&self, agent_id: &str, conn: u64, version: u64) {
        let latest = self.state.borrow().version;
        let mut inner = self.lock();
        if inner.agents.ack(agent_id, conn, version, latest) {
            self.publish_acks(&inner);
        }
    }

    pub(super) fn agent_gone(&self, agent_id: &str, conn: u64) {
        let latest = self.state.borrow().version;
        let mut inner = self.lock();
        if inner.agents.gone(agent_id, conn, latest) {
            self.publish_acks(&inner);
            if inner.agents.is_empty() && !inner.publisher.is_connected() {
                drop(inner);
                // The cluster may have become idle.
                self.wake_planner.notify_one();
            }
        }
    }

    /// Drops expired credentials from the state without a new version:
    /// agents check expiry themselves; later snapshots simply no longer
    /// carry them. Called under the cluster lock, by the planner's driver.
    pub(super) fn drop_expired(&self, kinds: &[CredentialKind], now: Instant) {
        for kind in kinds {
            tracing::info!(cluster = %self.id, kind = kind.label(), "credential expired; dropped");
        }
        self.state.send_if_modified(|state| {
            let mut next = (**state).clone();
            let mut changed = false;
            for kind in kinds {
                let slot = next.credentials.get_mut(*kind).expect("known kind");
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

    /// Requests created for `reason` so far (tests, metrics).
    pub fn refresh_requested(&self, reason: RefreshReason) -> u64 {
        self.lock().planner.requested(reason)
    }
}
