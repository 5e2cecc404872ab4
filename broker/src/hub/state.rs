//! [`ClusterState`]: a cluster as its agents see it, one immutable value per
//! version, and [`SentVersions`], how far one agent stream has got.

use std::sync::Arc;

use credstream_proto::kind::PerKind;
use credstream_proto::v1::{
    ClusterInfo, ClusterSnapshot, CredentialKind, CredentialUpdate, PrivateEnv, Revocation,
    subscribe_response,
};
use tokio::time::Instant;

use crate::agent_wire::{AgentFrame, CredentialFrame};

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
        /// `update` framed once as the `SubscribeResponse` agents receive,
        /// shared by every agent stream; zeroized when the last one drops.
        encoded: CredentialFrame,
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
    /// One credential slot per kind.
    pub credentials: PerKind<Slot>,
    /// The private env slot.
    pub env: Slot,
}

impl ClusterState {
    /// The live credential of `kind` at `now`, if any.
    pub fn live(&self, kind: CredentialKind, now: Instant) -> Option<&Arc<CredentialUpdate>> {
        match self.credentials.get(kind)? {
            Slot::Credential {
                update, expires, ..
            } if *expires > now => Some(update),
            _ => None,
        }
    }

    /// True if the state holds a live credential of any kind at `now`.
    pub fn any_live(&self, now: Instant) -> bool {
        CredentialKind::KNOWN
            .into_iter()
            .any(|kind| self.live(kind, now).is_some())
    }

    /// The full snapshot an agent receives first.
    pub fn snapshot(&self, now: Instant) -> ClusterSnapshot {
        ClusterSnapshot {
            version: self.version,
            info: self.info.clone(),
            credentials: CredentialKind::KNOWN
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
    credentials: PerKind<u64>,
    env: u64,
}

impl SentVersions {
    /// The versions a snapshot of `state` covers.
    pub fn of(state: &ClusterState) -> Self {
        Self {
            info: state.info.as_ref().map_or(0, |i| i.version),
            credentials: state.credentials.as_ref().map(|_, slot| slot.version()),
            env: state.env.version(),
        }
    }

    /// The messages that bring an agent from `self` to `state`, oldest slot
    /// first; updates `self`. Expired credentials are skipped, never sent.
    /// Credentials come as their shared, already framed bytes: no clone and
    /// no encoding per agent.
    pub fn catch_up(
        &mut self,
        state: &ClusterState,
        now: Instant,
        out: &mut impl Extend<AgentFrame>,
    ) {
        use subscribe_response::Message;
        let mut emit = |frame| out.extend(std::iter::once(frame));
        if let Some(info) = &state.info
            && info.version > self.info
        {
            self.info = info.version;
            emit(AgentFrame::message(Message::ClusterInfo(info.clone())));
        }
        for ((kind, slot), (_, sent)) in state.credentials.iter().zip(self.credentials.iter_mut()) {
            if slot.version() <= *sent {
                continue;
            }
            *sent = slot.version();
            match slot {
                Slot::Credential {
                    expires, encoded, ..
                } if *expires > now => emit(AgentFrame::Credential(encoded.clone())),
                Slot::Revoked(version) => {
                    emit(AgentFrame::message(Message::Revocation(Revocation {
                        kinds: vec![kind as i32],
                        private_env: false,
                        version: *version,
                    })))
                }
                _ => {}
            }
        }
        if state.env.version() > self.env {
            self.env = state.env.version();
            match &state.env {
                Slot::Env(env) => emit(AgentFrame::message(Message::PrivateEnv((**env).clone()))),
                Slot::Revoked(version) => {
                    emit(AgentFrame::message(Message::Revocation(Revocation {
                        kinds: vec![],
                        private_env: true,
                        version: *version,
                    })))
                }
                _ => {}
            }
        }
    }
}
