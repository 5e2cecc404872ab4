//! The agent's side of sealed delivery (`docs/sealing.md`): every message
//! from the broker passes [`Gate::admit`] before the store applies it.
//!
//! With a seal key, a credential or private env is applied only if it opens
//! with the key (so it was sealed by the cluster's publisher, for this
//! cluster and slot, with the clear metadata it arrived with) and its
//! sealed sequence is newer than the last one accepted for its slot.
//! Anything else — an unsealed item (a downgrade), another cluster's, a
//! flipped byte, an altered expiry, an older sealed item re-sent under a
//! newer broker version — is refused: the store keeps what it holds, the
//! refusal is logged with its reason (never the content) and counted
//! ([`crate::refusals`]: bounded text, a bounded number of lines).
//!
//! Without a key, unsealed items pass as before, and a *sealed* item is
//! refused (the agent cannot open it, and its clear part has no secret to
//! serve), with a log line naming `--seal-key-file`.
//!
//! Revocations and the cluster declaration are not sealed: a broker can
//! always withhold credentials, and these can do no more than that (see the
//! threat model in `docs/sealing.md`).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use credstream_proto::rules;
use credstream_proto::rules::private_file::{self, PrivateFileError};
use credstream_proto::seal::{self, Refusal, SealKey, SealSlot};
use credstream_proto::v1::{CredentialUpdate, PrivateEnv, subscribe_response::Message};

use crate::agent::chain;
use crate::refusals::Refusals;
use crate::sequences::{Sequences, StateFile};

/// The last sealed item accepted for one slot.
#[derive(Clone, Copy, Debug, Default)]
struct Held {
    sequence: u64,
    version: u64,
    /// Read from the state file: the item with this very sequence was
    /// accepted before the restart and may be accepted once more (the
    /// first snapshot re-sends it).
    restored: bool,
}

/// What happened to one item.
enum Verdict<T> {
    /// Apply it.
    Accept(T),
    /// The same item again (a reconnect's snapshot): nothing to do.
    Duplicate,
    /// Refused, with the reason.
    Refuse(String),
}

/// Checks messages against the seal key (if any) before they are applied.
#[derive(Debug)]
pub struct Gate {
    key: Option<SealKey>,
    held: Mutex<[Held; 3]>,
    refusals: Refusals,
    /// Where the held sequences are kept across restarts, if anywhere.
    state: Option<StateFile>,
}

impl Default for Gate {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Gate {
    /// A gate for `key` (`None`: the agent accepts unsealed items only).
    pub fn new(key: Option<SealKey>) -> Self {
        Self {
            key,
            held: Mutex::new([Held::default(); 3]),
            refusals: Refusals::default(),
            state: None,
        }
    }

    /// A gate for `key` that starts from the sequences accepted before a
    /// restart, read from `state`, and records every newly accepted one
    /// there before the item is applied ([`crate::sequences`]).
    pub fn with_state(key: SealKey, state: StateFile, accepted: Sequences) -> Self {
        let held = accepted.map(|sequence| Held {
            sequence,
            version: 0,
            restored: sequence != 0,
        });
        Self {
            key: Some(key),
            held: Mutex::new(held),
            refusals: Refusals::default(),
            state: Some(state),
        }
    }

    /// True if the agent holds a seal key.
    pub fn sealed(&self) -> bool {
        self.key.is_some()
    }

    /// How many items were refused so far.
    pub fn refused(&self) -> u64 {
        self.refusals.count()
    }

    /// The reason of the last refusal (no secret content; printable and
    /// bounded), if any.
    pub fn last_refusal(&self) -> Option<String> {
        self.refusals.last()
    }

    /// The refusals: counted, and logged at a bounded rate.
    pub fn refusals(&self) -> &Refusals {
        &self.refusals
    }

    /// The message to apply in place of `message`: credentials and the env
    /// opened (or dropped when refused; a snapshot keeps what passes), and
    /// any item whose version is far ahead of the agent's clock refused
    /// ([`rules::version`]). `None` when nothing of it is to be applied.
    pub fn admit(&self, message: Message) -> Option<Message> {
        self.admit_at(message, SystemTime::now())
    }

    /// [`Gate::admit`] with the agent's clock reading `now`.
    pub fn admit_at(&self, message: Message, now: SystemTime) -> Option<Message> {
        match message {
            Message::Snapshot(mut snapshot) => {
                snapshot.info = snapshot
                    .info
                    .filter(|info| self.in_time("cluster info", info.version, now));
                snapshot.credentials = std::mem::take(&mut snapshot.credentials)
                    .into_iter()
                    .filter(|update| self.in_time(kind_label(update), update.version, now))
                    .filter_map(|update| self.credential(update))
                    .collect();
                snapshot.private_env = snapshot
                    .private_env
                    .filter(|env| self.in_time(SealSlot::Env.label(), env.version, now))
                    .and_then(|env| self.env(env));
                Some(Message::Snapshot(snapshot))
            }
            Message::Credential(update) => {
                if !self.in_time(kind_label(&update), update.version, now) {
                    return None;
                }
                self.credential(update).map(Message::Credential)
            }
            Message::PrivateEnv(env) => {
                if !self.in_time(SealSlot::Env.label(), env.version, now) {
                    return None;
                }
                self.env(env).map(Message::PrivateEnv)
            }
            Message::Revocation(revocation) => self
                .in_time("revocation", revocation.version, now)
                .then_some(Message::Revocation(revocation)),
            Message::ClusterInfo(info) => self
                .in_time("cluster info", info.version, now)
                .then_some(Message::ClusterInfo(info)),
            // Not state: the subscription keeps it for its reconnects.
            Message::TokenRenewal(_) => None,
        }
    }

    /// False (and a refusal) if `version` is too far ahead of `now`: the
    /// item would pin its slot, since only newer versions replace it.
    fn in_time(&self, what: &str, version: u64, now: SystemTime) -> bool {
        let Some(ahead) = rules::version::too_far_ahead(version, now) else {
            return true;
        };
        let ahead = if ahead > Duration::from_secs(100 * 365 * 24 * 3600) {
            "more than a century".to_owned()
        } else {
            humantime::format_duration(Duration::from_secs(ahead.as_secs())).to_string()
        };
        self.refuse(
            what,
            version,
            &format!(
                "its version is {ahead} ahead of this agent's clock (at most {} is accepted): \
                 a broker clock far off, or a version meant to pin this agent; \
                 check both clocks",
                humantime::format_duration(rules::version::MAX_AHEAD)
            ),
        );
        false
    }

    fn refuse(&self, what: &str, version: u64, reason: &str) {
        self.refusals.record(what, version, reason);
    }

    fn settle<T>(&self, what: &str, version: u64, verdict: Verdict<T>) -> Option<T> {
        match verdict {
            Verdict::Accept(item) => Some(item),
            Verdict::Duplicate => None,
            Verdict::Refuse(reason) => {
                self.refuse(what, version, &reason);
                None
            }
        }
    }

    /// The rollback rule: newer sequence (and broker version) than the last
    /// accepted item of the slot; the same pair again is a duplicate.
    fn fresh(&self, slot: SealSlot, sequence: u64, version: u64) -> Verdict<()> {
        let mut all = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let held = &mut all[slot as usize - 1];
        if sequence == held.sequence && version == held.version {
            return Verdict::Duplicate;
        }
        if version <= held.version {
            // The store ignores versions it has seen; nothing to refuse.
            return Verdict::Duplicate;
        }
        let again = sequence == held.sequence && held.restored;
        if sequence <= held.sequence && !again {
            return Verdict::Refuse(
                Refusal::NotNewer {
                    sequence,
                    held: held.sequence,
                }
                .to_string(),
            );
        }
        *held = Held {
            sequence,
            version,
            restored: false,
        };
        if let Some(state) = &self.state
            && let Err(error) = state.save(&all.map(|held| held.sequence))
        {
            // Serving what the publisher sealed beats refusing it; the
            // protection across a restart is what is lost, so say so.
            tracing::warn!(
                error = %chain(&error),
                "cannot record the accepted sealed sequence; a restarted agent would not know it"
            );
        }
        Verdict::Accept(())
    }

    fn credential(&self, update: CredentialUpdate) -> Option<CredentialUpdate> {
        let what = kind_label(&update);
        let version = update.version;
        let verdict = match &self.key {
            None if update.sealed.is_some() => Verdict::Refuse(no_key()),
            None => Verdict::Accept(update),
            Some(key) => match seal::open_credential(key, &update) {
                Err(refusal) => Verdict::Refuse(refusal.to_string()),
                Ok(opened) => {
                    let slot = SealSlot::of_kind(opened.update.kind()).expect("opened a kind");
                    match self.fresh(slot, opened.sequence, version) {
                        Verdict::Accept(()) => Verdict::Accept(opened.update),
                        Verdict::Duplicate => Verdict::Duplicate,
                        Verdict::Refuse(reason) => Verdict::Refuse(reason),
                    }
                }
            },
        };
        self.settle(what, version, verdict)
    }

    fn env(&self, env: PrivateEnv) -> Option<PrivateEnv> {
        let version = env.version;
        let verdict = match &self.key {
            None if env.sealed.is_some() => Verdict::Refuse(no_key()),
            None => Verdict::Accept(env),
            Some(key) => match seal::open_env(key, &env) {
                Err(refusal) => Verdict::Refuse(refusal.to_string()),
                Ok(opened) => match self.fresh(SealSlot::Env, opened.sequence, version) {
                    Verdict::Accept(()) => Verdict::Accept(opened.env),
                    Verdict::Duplicate => Verdict::Duplicate,
                    Verdict::Refuse(reason) => Verdict::Refuse(reason),
                },
            },
        };
        self.settle(SealSlot::Env.label(), version, verdict)
    }
}

/// How a credential is named in refusals.
fn kind_label(update: &CredentialUpdate) -> &'static str {
    SealSlot::of_kind(update.kind()).map_or("credential", SealSlot::label)
}

fn no_key() -> String {
    "it is sealed and this agent has no seal key: start it with --seal-key-file F (CREDSTREAM_SEAL_KEY_FILE), F from `credstream seal-key --cluster ID`".into()
}

/// Reads the agent's seal key file, which must name `cluster_id` and be
/// accessible to its owner only (the rule the publisher applies to its own
/// copy: [`credstream_proto::rules::private_file`]).
pub fn read_key_file(path: &std::path::Path, cluster_id: &str) -> Result<SealKey, KeyFileError> {
    let text = private_file::read(path, "seal key file")?;
    SealKey::parse_for(&text, cluster_id).map_err(|source| KeyFileError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// A seal key file the agent cannot use.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Unreadable, or accessible to other users (the message names the file
    /// and the fix: `chmod 600`).
    #[error(transparent)]
    File(#[from] PrivateFileError),
    /// Not a key for this cluster.
    #[error("the seal key file {path} is not usable: {source}")]
    Invalid {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: seal::KeyError,
    },
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use credstream_proto::convert::timestamp;
    use credstream_proto::v1::credential_update::Credential;
    use credstream_proto::v1::{AwsCredential, ClusterSnapshot, CredentialKind};

    use super::*;
    use crate::store::CredentialStore;

    fn minted(secret: &str) -> CredentialUpdate {
        let now = SystemTime::now();
        let mut aws = AwsCredential::default();
        aws.access_key_id = "ASIAEXAMPLE".into();
        aws.secret_access_key = secret.into();
        aws.session_token = "token".into();
        CredentialUpdate {
            credential: Some(Credential::Aws(aws)),
            issued_at: Some(timestamp(now)),
            expires_at: Some(timestamp(now + Duration::from_secs(3600))),
            ..Default::default()
        }
    }

    fn relayed(mut update: CredentialUpdate, version: u64) -> Message {
        update.version = version;
        Message::Credential(update)
    }

    fn secret_held(store: &CredentialStore) -> String {
        match store
            .current()
            .held(CredentialKind::Aws)
            .and_then(|u| u.credential.clone())
        {
            Some(Credential::Aws(aws)) => aws.secret_access_key.clone(),
            _ => String::new(),
        }
    }

    #[test]
    fn a_replayed_older_seal_is_refused_and_a_reconnect_duplicate_is_not() {
        let key = SealKey::generate("dev");
        let store = CredentialStore::with_gate(Gate::new(Some(key.clone())));
        let old = seal::seal_credential(&key, &minted("old"), 10).unwrap();
        let new = seal::seal_credential(&key, &minted("new"), 20).unwrap();
        assert!(store.apply(relayed(old.clone(), 1)));
        assert!(store.apply(relayed(new.clone(), 2)));
        assert_eq!(secret_held(&store), "new");
        // The same item in a reconnect's snapshot: no refusal.
        let snapshot = ClusterSnapshot {
            version: 2,
            credentials: vec![{
                let mut n = new.clone();
                n.version = 2;
                n
            }],
            ..Default::default()
        };
        store.apply(Message::Snapshot(snapshot));
        assert_eq!(store.gate().refused(), 0);
        // The old one under a newer version: refused, "new" still served.
        assert!(!store.apply(relayed(old, 3)));
        assert_eq!(secret_held(&store), "new");
        assert_eq!(store.gate().refused(), 1);
        assert!(store.gate().last_refusal().unwrap().contains("not newer"));
    }

    /// Finding 8 (issue 34): one version of 2^64−1 used to pin a slot until
    /// restart, since only newer versions replace what is held.
    #[test]
    fn a_version_far_ahead_of_the_clock_is_refused_and_pins_nothing() {
        use credstream_proto::rules::version::{self, MAX_AHEAD};
        use credstream_proto::v1::Revocation;

        let store = CredentialStore::new();
        let now = version::at(SystemTime::now());
        assert!(store.apply(relayed(minted("first"), now)));
        for pin in [u64::MAX, now + 2 * MAX_AHEAD.as_micros() as u64] {
            assert!(!store.apply(relayed(minted("pinned"), pin)));
            assert!(!store.apply(Message::Revocation(Revocation {
                kinds: vec![CredentialKind::Aws as i32],
                private_env: true,
                version: pin,
            })));
        }
        assert_eq!(secret_held(&store), "first");
        assert_eq!(store.gate().refused(), 4);
        let reason = store.gate().last_refusal().unwrap();
        assert!(
            reason.starts_with("revocation version ")
                && reason.contains("ahead of this agent's clock (at most 15m is accepted)"),
            "{reason}"
        );
        // In a snapshot, the far item alone is dropped.
        let snapshot = ClusterSnapshot {
            credentials: vec![{
                let mut far = minted("far");
                far.version = u64::MAX;
                far
            }],
            ..Default::default()
        };
        store.apply(Message::Snapshot(snapshot));
        assert_eq!(secret_held(&store), "first");
        assert_eq!(store.gate().refused(), 5);
        // The next real version still goes through: nothing was pinned.
        assert!(store.apply(relayed(minted("next"), now + 1)));
        assert_eq!(secret_held(&store), "next");
        assert_eq!(store.current().version, now + 1);
    }

    /// Finding 6 (issue 34): with a state file, a restarted agent refuses
    /// the older sealed item the running one refused, and accepts the one
    /// it held (the first snapshot re-sends it) and newer ones.
    #[test]
    fn with_a_state_file_a_restart_keeps_refusing_older_seals() {
        use crate::sequences::StateFile;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w1.state");
        let key = SealKey::generate("dev");
        let old = seal::seal_credential(&key, &minted("old"), 10).unwrap();
        let new = seal::seal_credential(&key, &minted("new"), 20).unwrap();
        let newer = seal::seal_credential(&key, &minted("newer"), 30).unwrap();
        let start = || {
            let (file, accepted) = StateFile::open(&path, "dev").unwrap();
            CredentialStore::with_gate(Gate::with_state(key.clone(), file, accepted))
        };

        let running = start();
        assert!(running.apply(relayed(old.clone(), 1)));
        assert!(running.apply(relayed(new.clone(), 2)));
        assert!(!running.apply(relayed(old.clone(), 3)));
        drop(running);

        let restarted = start();
        assert!(!restarted.apply(relayed(old.clone(), 4)), "rolled back");
        assert_eq!(restarted.gate().refused(), 1);
        assert!(restarted.current().held(CredentialKind::Aws).is_none());
        assert!(
            restarted.apply(relayed(new.clone(), 2)),
            "the held one again"
        );
        assert_eq!(secret_held(&restarted), "new");
        assert!(!restarted.apply(relayed(new, 5)), "but only once");
        assert!(restarted.apply(relayed(newer, 6)));
        assert_eq!(secret_held(&restarted), "newer");

        // Without the file, a fresh agent has nothing to compare with.
        let fresh = CredentialStore::with_gate(Gate::new(Some(key)));
        assert!(fresh.apply(relayed(old, 4)));
    }

    #[test]
    fn without_a_key_a_sealed_item_is_refused_and_unsealed_ones_pass() {
        let key = SealKey::generate("dev");
        let store = CredentialStore::new();
        let sealed = seal::seal_credential(&key, &minted("s"), 10).unwrap();
        assert!(!store.apply(relayed(sealed, 1)));
        assert!(store.current().held(CredentialKind::Aws).is_none());
        assert!(
            store
                .gate()
                .last_refusal()
                .unwrap()
                .contains("--seal-key-file")
        );
        assert!(store.apply(relayed(minted("plain"), 2)));
        assert_eq!(secret_held(&store), "plain");
    }
}
