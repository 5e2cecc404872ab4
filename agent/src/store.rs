//! The agent's latest state: what it serves to local processes.
//!
//! [`CredentialStore`] applies messages from the broker with the design's
//! rules — an item replaces what is held only if its version is newer (broker
//! versions keep increasing across broker restarts, see the broker's `hub`),
//! an empty snapshot (a restarted broker) wipes nothing, only a revocation
//! does —
//! and publishes every change on a `watch` channel that the HTTP surfaces, the
//! env file writer and `exec` read. Expiry is checked when reading: an
//! expired credential is held (for diagnostics) but never returned by the
//! `live_*` accessors.

use std::sync::Arc;
use std::time::SystemTime;

use credstream_proto::kind::PerKind;
use credstream_proto::v1::{
    ClusterInfo, ClusterSnapshot, CredentialKind, CredentialUpdate, PrivateEnv, Revocation,
    subscribe_response,
};
use tokio::sync::watch;

use crate::served::{Served, ServedTally};

/// Everything the agent holds. Cheap to clone (reference-counted items).
#[derive(Clone, Debug, Default)]
pub struct AgentState {
    /// What the publisher declared, once known.
    pub info: Option<ClusterInfo>,
    /// The latest credential of each kind (possibly expired; see
    /// [`AgentState::live`]).
    pub credentials: PerKind<Option<Arc<CredentialUpdate>>>,
    /// The whole private environment, once received.
    pub env: Option<Arc<PrivateEnv>>,
    /// The highest cluster version applied (what the agent acknowledges).
    pub version: u64,
    /// True once a snapshot from some broker was applied.
    pub snapshot_received: bool,
    /// Why the subscription ended for good, once it did: nothing held will
    /// be refreshed (`/readyz` says so).
    pub subscription_ended: Option<String>,
    /// Per-slot versions, including revocations, so that an older message
    /// never resurrects a revoked slot.
    slot_versions: SlotVersions,
}

#[derive(Clone, Copy, Debug, Default)]
struct SlotVersions {
    credentials: PerKind<u64>,
    env: u64,
    info: u64,
}

/// Why the agent is not ready, as `/readyz` and `exec` report it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// No snapshot yet and nothing held: the broker has not been reached.
    #[error("waiting for the first snapshot from the broker")]
    NoSnapshot,
    /// The broker has no publisher declaration for this cluster yet.
    #[error("waiting for a publisher to connect to the cluster")]
    NoPublisher,
    /// A declared credential is missing.
    #[error("no {0} credential received yet")]
    Missing(&'static str),
    /// A declared credential has expired.
    #[error("the {0} credential has expired; waiting for a refreshed one")]
    Expired(&'static str),
    /// The publisher declared a private env that has not arrived.
    #[error("the private environment has not arrived yet")]
    NoPrivateEnv,
    /// Not ready for one of the reasons above, and the subscription ended
    /// for good, so nothing will arrive: fix what the reason says and
    /// restart the agent.
    #[error(
        "{then}, and nothing will arrive: the subscription to the broker ended for good ({reason}); fix that and restart the agent"
    )]
    SubscriptionEnded {
        /// Why the subscription ended.
        reason: String,
        /// What is missing.
        then: Box<NotReady>,
    },
    /// Not ready for one of the reasons above, and the agent refused
    /// updates from the broker (the cause, more often than not: a sealed
    /// update and no `--seal-key-file`); `last` says why and what to do.
    #[error("{then}: refused {count} {} from the broker (last: {last})", if *.count == 1 { "update" } else { "updates" })]
    Refused {
        /// How many updates were refused so far.
        count: u64,
        /// The last refusal: what, its version, why (printable, bounded).
        last: String,
        /// What is missing.
        then: Box<NotReady>,
    },
}

impl NotReady {
    /// The reason without the refusals' count and last item: what a wait
    /// logs again only when it changes (a broker that keeps sending what
    /// the agent refuses must not make it log once per refusal).
    pub fn kind(&self) -> (&NotReady, bool) {
        match self {
            NotReady::Refused { then, .. } => (then, true),
            other => (other, false),
        }
    }
}

impl AgentState {
    /// The version of each item local requests are served (0: none held).
    fn served_versions(&self) -> [(Served, u64); 3] {
        [
            (Served::Aws, self.held_version(CredentialKind::Aws)),
            (Served::Gcp, self.held_version(CredentialKind::Gcp)),
            (Served::Env, self.env.as_ref().map_or(0, |e| e.version)),
        ]
    }

    /// The latest credential of `kind`, expired or not.
    pub fn held(&self, kind: CredentialKind) -> Option<&Arc<CredentialUpdate>> {
        self.credentials.get(kind)?.as_ref()
    }

    /// The credential of `kind` if it is unexpired at `now`.
    pub fn live(&self, kind: CredentialKind, now: SystemTime) -> Option<&Arc<CredentialUpdate>> {
        let held = self.held(kind)?;
        held.expiry().filter(|expiry| *expiry > now).map(|_| held)
    }

    /// The version held for a credential kind (0 if none or revoked).
    pub fn held_version(&self, kind: CredentialKind) -> u64 {
        self.held(kind).map_or(0, |c| c.version)
    }

    /// The latest expiry of the unexpired credentials held at `now`
    /// (`None`: nothing live is held).
    pub fn last_expiry(&self, now: SystemTime) -> Option<SystemTime> {
        [CredentialKind::Aws, CredentialKind::Gcp]
            .into_iter()
            .filter_map(|kind| self.live(kind, now)?.expiry())
            .max()
    }

    /// Ready means: an unexpired credential of every declared kind, and the
    /// private env if one was declared. Once the subscription ended for
    /// good, a reason not to be ready says so too.
    pub fn readiness(&self, now: SystemTime) -> Result<(), NotReady> {
        self.readiness_held(now)
            .map_err(|then| match &self.subscription_ended {
                Some(reason) => NotReady::SubscriptionEnded {
                    reason: reason.clone(),
                    then: Box::new(then),
                },
                None => then,
            })
    }

    fn readiness_held(&self, now: SystemTime) -> Result<(), NotReady> {
        let Some(info) = &self.info else {
            return Err(if !self.snapshot_received {
                NotReady::NoSnapshot
            } else {
                NotReady::NoPublisher
            });
        };
        for kind in info.kinds() {
            if self.live(kind, now).is_none() {
                if kind == CredentialKind::Unspecified {
                    continue;
                }
                return Err(if self.held(kind).is_some() {
                    NotReady::Expired(kind.label())
                } else {
                    NotReady::Missing(kind.label())
                });
            }
        }
        if info.private_env && self.env.is_none() {
            return Err(NotReady::NoPrivateEnv);
        }
        Ok(())
    }

    /// The private env as name/value pairs (empty if none).
    pub fn env_vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env
            .iter()
            .flat_map(|env| env.set.iter().map(|v| (v.name.as_str(), v.value.as_str())))
    }
}

/// The agent's state plus its change notifications.
#[derive(Clone, Debug)]
pub struct CredentialStore {
    state: Arc<watch::Sender<AgentState>>,
    /// Sealed delivery: what passes before anything is applied.
    gate: Arc<crate::seal::Gate>,
    /// Local requests served per version.
    served: Arc<ServedTally>,
}

impl Default for CredentialStore {
    fn default() -> Self {
        Self::new()
    }
}

impl CredentialStore {
    /// An empty store without a seal key (it refuses sealed items).
    pub fn new() -> Self {
        Self::with_gate(crate::seal::Gate::default())
    }

    /// An empty store whose messages pass `gate` first (sealed delivery:
    /// with a seal key, only the publisher's sealed items are applied).
    pub fn with_gate(gate: crate::seal::Gate) -> Self {
        Self {
            state: Arc::new(watch::Sender::new(AgentState::default())),
            gate: Arc::new(gate),
            served: Arc::new(ServedTally::default()),
        }
    }

    /// Local requests served per version (logged as each version retires).
    pub fn served(&self) -> &ServedTally {
        &self.served
    }

    /// The sealed-delivery gate (refusal count and last reason).
    pub fn gate(&self) -> &crate::seal::Gate {
        &self.gate
    }

    /// A copy of the current state.
    pub fn current(&self) -> AgentState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<AgentState> {
        self.state.subscribe()
    }

    /// Why `state` (of this store) is not ready at `now`, naming the
    /// updates the agent refused, if any ([`NotReady::Refused`]): what
    /// `/readyz`, `exec` and the HTTP errors report.
    pub fn readiness(&self, state: &AgentState, now: SystemTime) -> Result<(), NotReady> {
        state.readiness(now).map_err(
            |then| match (self.gate.refused(), self.gate.last_refusal()) {
                (count @ 1.., Some(last)) => NotReady::Refused {
                    count,
                    last,
                    then: Box::new(then),
                },
                _ => then,
            },
        )
    }

    /// Records that the subscription ended for good, and why (shown by
    /// `/readyz`).
    pub fn subscription_ended(&self, reason: String) {
        self.state
            .send_modify(|state| state.subscription_ended = Some(reason));
    }

    /// Applies one message from the broker. Returns true if anything changed.
    pub fn apply(&self, message: subscribe_response::Message) -> bool {
        use subscribe_response::Message;
        let Some(message) = self.gate.admit(message) else {
            return false;
        };
        let before = self.state.borrow().served_versions();
        let changed = self.state.send_if_modified(|state| match message {
            Message::Snapshot(snapshot) => {
                let first = !std::mem::replace(&mut state.snapshot_received, true);
                apply_snapshot(state, snapshot) || first
            }
            Message::Credential(update) => apply_credential(state, update),
            Message::PrivateEnv(env) => apply_env(state, env),
            Message::Revocation(revocation) => apply_revocation(state, revocation),
            Message::ClusterInfo(info) => apply_info(state, info),
            // Not state: the subscription keeps it (the gate drops it).
            Message::TokenRenewal(_) => false,
        });
        if changed {
            let after = self.state.borrow().served_versions();
            for ((item, old), (_, new)) in before.into_iter().zip(after) {
                if old != new {
                    self.served.replaced(item, new);
                }
            }
        }
        changed
    }
}

fn bump(state: &mut AgentState, version: u64) {
    state.version = state.version.max(version);
}

fn apply_snapshot(state: &mut AgentState, snapshot: ClusterSnapshot) -> bool {
    let mut changed = false;
    if let Some(info) = snapshot.info {
        changed |= apply_info(state, info);
    }
    for update in snapshot.credentials {
        changed |= apply_credential(state, update);
    }
    if let Some(env) = snapshot.private_env {
        changed |= apply_env(state, env);
    }
    changed
}

fn apply_info(state: &mut AgentState, info: ClusterInfo) -> bool {
    if info.version <= state.slot_versions.info && state.info.is_some() {
        return false;
    }
    state.slot_versions.info = info.version;
    bump(state, info.version);
    state.info = Some(info);
    true
}

fn apply_credential(state: &mut AgentState, update: CredentialUpdate) -> bool {
    let version = update.version;
    let kind = update.kind();
    let (Some(slot), Some(held_version)) = (
        state.credentials.get_mut(kind),
        state.slot_versions.credentials.get_mut(kind),
    ) else {
        return false;
    };
    if version <= *held_version {
        return false;
    }
    *held_version = version;
    *slot = Some(Arc::new(update));
    bump(state, version);
    true
}

fn apply_env(state: &mut AgentState, env: PrivateEnv) -> bool {
    if env.version <= state.slot_versions.env {
        return false;
    }
    state.slot_versions.env = env.version;
    bump(state, env.version);
    state.env = Some(Arc::new(env));
    true
}

fn apply_revocation(state: &mut AgentState, revocation: Revocation) -> bool {
    let version = revocation.version;
    let mut changed = false;
    for kind in revocation.kinds() {
        let (Some(slot), Some(held_version)) = (
            state.credentials.get_mut(kind),
            state.slot_versions.credentials.get_mut(kind),
        ) else {
            continue;
        };
        if version > *held_version {
            *held_version = version;
            changed |= slot.take().is_some();
        }
    }
    if revocation.private_env && version > state.slot_versions.env {
        state.slot_versions.env = version;
        changed |= state.env.take().is_some();
    }
    bump(state, revocation.version);
    changed
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use credstream_proto::convert::timestamp;
    use credstream_proto::v1::{AwsCredential, credential_update::Credential};

    use super::*;

    fn aws(version: u64, expires_in: Duration) -> subscribe_response::Message {
        let mut credential = AwsCredential::default();
        credential.access_key_id = format!("ASIA{version}");
        subscribe_response::Message::Credential(CredentialUpdate {
            credential: Some(Credential::Aws(credential)),
            expires_at: Some(timestamp(SystemTime::now() + expires_in)),
            version,
            ..Default::default()
        })
    }

    fn info(version: u64) -> subscribe_response::Message {
        subscribe_response::Message::ClusterInfo(ClusterInfo {
            kinds: vec![CredentialKind::Aws as i32],
            private_env: false,
            publisher_connected: true,
            version,
        })
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn an_empty_first_snapshot_means_waiting_for_a_publisher() {
        let store = CredentialStore::new();
        assert_eq!(
            store.current().readiness(SystemTime::now()),
            Err(NotReady::NoSnapshot)
        );
        assert!(store.apply(subscribe_response::Message::Snapshot(
            ClusterSnapshot::default()
        )));
        assert_eq!(
            store.current().readiness(SystemTime::now()),
            Err(NotReady::NoPublisher)
        );
    }

    #[test]
    fn older_versions_are_ignored() {
        let store = CredentialStore::new();
        assert!(store.apply(aws(5, HOUR)));
        assert!(!store.apply(aws(4, HOUR)));
        assert!(!store.apply(aws(5, HOUR)));
        assert_eq!(store.current().held_version(CredentialKind::Aws), 5);
    }

    #[test]
    fn an_empty_snapshot_wipes_nothing() {
        let store = CredentialStore::new();
        store.apply(info(1));
        store.apply(aws(2, HOUR));
        // The empty snapshot of a restarted broker: nothing is dropped.
        store.apply(subscribe_response::Message::Snapshot(
            ClusterSnapshot::default(),
        ));
        let state = store.current();
        assert!(state.readiness(SystemTime::now()).is_ok());
        assert_eq!(state.held_version(CredentialKind::Aws), 2);
    }

    #[test]
    fn revocation_stops_serving_at_once_and_is_not_undone_by_older_messages() {
        let store = CredentialStore::new();
        store.apply(info(1));
        store.apply(aws(2, HOUR));
        store.apply(subscribe_response::Message::Revocation(Revocation {
            kinds: vec![CredentialKind::Aws as i32],
            private_env: false,
            version: 3,
        }));
        let state = store.current();
        assert!(state.live(CredentialKind::Aws, SystemTime::now()).is_none());
        assert_eq!(
            state.readiness(SystemTime::now()),
            Err(NotReady::Missing("aws"))
        );
        assert!(
            !store.apply(aws(2, HOUR)),
            "a stale re-delivery does not resurrect it"
        );
        assert!(store.apply(aws(4, HOUR)), "a newer credential does");
    }

    #[test]
    fn expired_credentials_are_held_but_never_live() {
        let store = CredentialStore::new();
        store.apply(info(1));
        store.apply(aws(2, Duration::from_secs(1)));
        let later = SystemTime::now() + Duration::from_secs(2);
        let state = store.current();
        assert!(state.live(CredentialKind::Aws, later).is_none());
        assert_eq!(state.readiness(later), Err(NotReady::Expired("aws")));
    }
}
