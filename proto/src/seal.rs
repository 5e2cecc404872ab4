//! Sealed delivery: credentials and private environments encrypted by the
//! publisher for the agents of one cluster, so that the broker relays what
//! it can neither read nor forge nor roll back undetected.
//!
//! This module is the one implementation of the construction (format 1)
//! documented in `docs/sealing.md` and in the comment of `SealedPayload` in
//! `credstream.proto`; the client seals with it and the agent opens with it.
//! In short: ChaCha20-Poly1305 (RFC 8439, RustCrypto's `chacha20poly1305`)
//! under a 32-byte per-cluster key, a random 12-byte nonce per seal, and
//! associated data that binds every clear field the broker still reads
//! (cluster, slot, sequence, issue and expiry times, principal, account).
//!
//! What is *not* here: choosing sequence numbers (the client's) and
//! remembering which sequence was accepted last per slot (the agent's). The
//! functions here check one item against the key; [`OpenedCredential`] and
//! [`OpenedEnv`] return the authenticated sequence for the caller's rollback
//! rule.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use prost::Message as _;
use prost_types::Timestamp;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::v1::credential_update::Credential;
use crate::v1::{
    AwsCredential, CredentialKind, CredentialUpdate, GcpCredential, PrivateEnv, SealedPayload,
};

/// The construction this module implements (`SealedPayload.format`).
pub const FORMAT: u32 = 1;
/// Bytes of a seal key.
pub const KEY_LEN: usize = 32;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 12;
/// Bytes of a key id.
pub const KEY_ID_LEN: usize = 8;
/// The first bytes of the associated data.
pub const AAD_MAGIC: &[u8] = b"credstream.v1.seal";
/// The prefix of a key file's line.
pub const KEY_FILE_PREFIX: &str = "credstream-seal-v1:";

/// Largest plaintext sealed (the broker's limit on a message is 256 KiB).
const MAX_PLAINTEXT: usize = 240 * 1024;

/// What a seal protects: one credential kind, or the private environment.
/// The number is the `slot` byte of the associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SealSlot {
    /// The AWS credential.
    Aws = 1,
    /// The GCP credential.
    Gcp = 2,
    /// The private environment.
    Env = 3,
}

impl SealSlot {
    /// The slot of a credential kind; `None` for `Unspecified`.
    pub fn of_kind(kind: CredentialKind) -> Option<Self> {
        match kind {
            CredentialKind::Aws => Some(SealSlot::Aws),
            CredentialKind::Gcp => Some(SealSlot::Gcp),
            CredentialKind::Unspecified => None,
        }
    }

    /// A short name for logs (`aws`, `gcp`, `private env`).
    pub fn label(self) -> &'static str {
        match self {
            SealSlot::Aws => "aws",
            SealSlot::Gcp => "gcp",
            SealSlot::Env => "private env",
        }
    }
}

/// A key file that cannot be used, or a seal that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The text is not `credstream-seal-v1:<cluster>:<base64>`.
    #[error(
        "not a credstream seal key: expected one line `credstream-seal-v1:<cluster>:<base64 of 32 bytes>` ({0})"
    )]
    Malformed(&'static str),
    /// The key is for another cluster than the one asked for.
    #[error("the seal key is for cluster {found}, not {expected}")]
    OtherCluster {
        /// The cluster the key file names.
        found: String,
        /// The cluster in use.
        expected: String,
    },
    /// Sealing failed (a plaintext too large to relay).
    #[error("cannot seal: {0}")]
    Seal(&'static str),
}

/// Why an agent refuses an item. Never carries secret content: only
/// identifiers, sequence numbers and which check failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// An unsealed credential or environment while a key is held.
    #[error(
        "it is not sealed, but this agent holds a seal key (a downgrade: only the publisher's sealed updates are accepted)"
    )]
    Unsealed,
    /// A construction this agent does not know.
    #[error("it is sealed with unknown format {0}")]
    UnknownFormat(u32),
    /// Sealed for another cluster.
    #[error("it was sealed for cluster {sealed_for}, not this agent's cluster {ours}")]
    OtherCluster {
        /// The cluster the payload names.
        sealed_for: String,
        /// This agent's cluster.
        ours: String,
    },
    /// Sealed with another key.
    #[error("it was sealed with another key (key id {found}; this agent's key is {ours})")]
    OtherKey {
        /// The payload's key id (hex).
        found: String,
        /// This agent's key id (hex).
        ours: String,
    },
    /// Structurally wrong (missing times, secret fields in clear, …).
    #[error("it is malformed: {0}")]
    Malformed(&'static str),
    /// The AEAD did not verify: the ciphertext, or a clear field bound into
    /// the associated data, was altered.
    #[error(
        "the seal does not verify: the payload or its clear metadata (kind, sequence, issue or expiry time, principal, account) was altered"
    )]
    Forged,
    /// Opened, but the sealed message is not what the clear one claims.
    #[error("its sealed content does not match its clear metadata: {0}")]
    Mismatch(&'static str),
    /// The sequence is not newer than the last one accepted for the slot.
    #[error(
        "its sequence {sequence} is not newer than {held}, already accepted (a replay or rollback)"
    )]
    NotNewer {
        /// The item's sequence.
        sequence: u64,
        /// The last accepted sequence for the slot.
        held: u64,
    },
}

/// A cluster's seal key. `Debug` shows the cluster and the key id only.
#[derive(Clone)]
pub struct SealKey {
    cluster_id: String,
    key: Zeroizing<[u8; KEY_LEN]>,
    id: [u8; KEY_ID_LEN],
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealKey")
            .field("cluster_id", &self.cluster_id)
            .field("key_id", &self.key_id_hex())
            .finish_non_exhaustive()
    }
}

fn key_id(key: &[u8; KEY_LEN]) -> [u8; KEY_ID_LEN] {
    let digest = Sha256::digest(key);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest[..KEY_ID_LEN]);
    id
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl SealKey {
    /// A new random key (the operating system's generator) for a cluster.
    pub fn generate(cluster_id: &str) -> Self {
        let generated = ChaCha20Poly1305::generate_key(&mut OsRng);
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&generated);
        let mut generated = generated;
        generated.as_mut_slice().zeroize();
        Self::from_bytes(cluster_id, key)
    }

    fn from_bytes(cluster_id: &str, key: Zeroizing<[u8; KEY_LEN]>) -> Self {
        let id = key_id(&key);
        Self {
            cluster_id: cluster_id.to_owned(),
            key,
            id,
        }
    }

    /// Reads a key file's text: `credstream-seal-v1:<cluster>:<base64>`.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let line = text.trim();
        let rest = line
            .strip_prefix(KEY_FILE_PREFIX)
            .ok_or(KeyError::Malformed(
                "it does not start with credstream-seal-v1:",
            ))?;
        let (cluster_id, encoded) = rest
            .split_once(':')
            .ok_or(KeyError::Malformed("no cluster id"))?;
        if cluster_id.is_empty()
            || cluster_id.len() > 128
            || !cluster_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(KeyError::Malformed("the cluster id is not valid"));
        }
        let decoded = Zeroizing::new(
            STANDARD
                .decode(encoded)
                .map_err(|_| KeyError::Malformed("the key is not base64"))?,
        );
        if decoded.len() != KEY_LEN {
            return Err(KeyError::Malformed("the key is not 32 bytes"));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(&decoded);
        Ok(Self::from_bytes(cluster_id, key))
    }

    /// [`SealKey::parse`], then checks that the key is for `cluster_id`.
    pub fn parse_for(text: &str, cluster_id: &str) -> Result<Self, KeyError> {
        let key = Self::parse(text)?;
        if key.cluster_id != cluster_id {
            return Err(KeyError::OtherCluster {
                found: key.cluster_id,
                expected: cluster_id.to_owned(),
            });
        }
        Ok(key)
    }

    /// The key file's line (without a newline). Secret.
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{KEY_FILE_PREFIX}{}:{}",
            self.cluster_id,
            STANDARD.encode(self.key.as_slice())
        ))
    }

    /// The cluster the key is for.
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The key id (first 8 bytes of SHA-256 of the key), in hex.
    pub fn key_id_hex(&self) -> String {
        hex(&self.id)
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(self.key.as_slice()))
    }
}

/// The clear fields bound into a seal's associated data.
#[derive(Clone, Copy, Debug)]
pub struct ClearMetadata<'a> {
    /// Which slot.
    pub slot: SealSlot,
    /// The cluster.
    pub cluster_id: &'a str,
    /// The publisher's sequence.
    pub sequence: u64,
    /// When minted (absent: zeros).
    pub issued_at: Option<&'a Timestamp>,
    /// When it expires (absent: zeros).
    pub expires_at: Option<&'a Timestamp>,
    /// AWS principal ARN or GCP principal email; empty for the env.
    pub principal: &'a str,
    /// AWS account id or GCP project id; empty for the env.
    pub account: &'a str,
}

fn push_str(out: &mut Vec<u8>, text: &str) -> Result<(), &'static str> {
    let len = u16::try_from(text.len()).map_err(|_| "a clear field is longer than 65535 bytes")?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    Ok(())
}

fn push_time(out: &mut Vec<u8>, time: Option<&Timestamp>) {
    let (seconds, nanos) = time.map_or((0, 0), |t| (t.seconds, t.nanos));
    out.extend_from_slice(&seconds.to_be_bytes());
    out.extend_from_slice(&(nanos as u32).to_be_bytes());
}

/// The associated data of format 1, byte for byte as `docs/sealing.md`
/// describes it.
pub fn associated_data(meta: &ClearMetadata<'_>) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(96 + meta.principal.len() + meta.account.len());
    out.extend_from_slice(AAD_MAGIC);
    out.push(FORMAT as u8);
    out.push(meta.slot as u8);
    push_str(&mut out, meta.cluster_id)?;
    out.extend_from_slice(&meta.sequence.to_be_bytes());
    push_time(&mut out, meta.issued_at);
    push_time(&mut out, meta.expires_at);
    push_str(&mut out, meta.principal)?;
    push_str(&mut out, meta.account)?;
    Ok(out)
}

fn seal_bytes(
    key: &SealKey,
    meta: &ClearMetadata<'_>,
    plaintext: &[u8],
) -> Result<SealedPayload, KeyError> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(KeyError::Seal("the plaintext is over 240 KiB"));
    }
    let aad = associated_data(meta).map_err(KeyError::Seal)?;
    let nonce = ChaCha20Poly1305::generate_nonce(&mut OsRng);
    let ciphertext = key
        .cipher()
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| KeyError::Seal("the AEAD refused the input"))?;
    Ok(SealedPayload {
        format: FORMAT,
        cluster_id: meta.cluster_id.to_owned(),
        sequence: meta.sequence,
        key_id: key.id.to_vec(),
        nonce: nonce.to_vec(),
        ciphertext,
    })
}

/// The clear principal and account of a credential.
fn principal_and_account(credential: &Credential) -> (&str, &str) {
    match credential {
        Credential::Aws(aws) => (&aws.principal_arn, &aws.account_id),
        Credential::Gcp(gcp) => (&gcp.principal_email, &gcp.project_id),
    }
}

/// Seals a credential: returns the update the publisher sends, whose
/// `credential` holds only the clear metadata and whose `sealed` holds the
/// whole credential. `update.issued_at` must be set (the broker would
/// otherwise fill it in, and the agent's associated data would differ).
pub fn seal_credential(
    key: &SealKey,
    update: &CredentialUpdate,
    sequence: u64,
) -> Result<CredentialUpdate, KeyError> {
    let credential = update
        .credential
        .as_ref()
        .ok_or(KeyError::Seal("the update carries no credential"))?;
    if update.issued_at.is_none() {
        return Err(KeyError::Seal("issued_at must be set on a sealed update"));
    }
    let (slot, plaintext, clear) = match credential {
        Credential::Aws(aws) => (
            SealSlot::Aws,
            Zeroizing::new(aws.encode_to_vec()),
            Credential::Aws({
                let mut clear = AwsCredential::default();
                clear.principal_arn = aws.principal_arn.clone();
                clear.account_id = aws.account_id.clone();
                clear
            }),
        ),
        Credential::Gcp(gcp) => (
            SealSlot::Gcp,
            Zeroizing::new(gcp.encode_to_vec()),
            Credential::Gcp({
                let mut clear = GcpCredential::default();
                clear.principal_email = gcp.principal_email.clone();
                clear.project_id = gcp.project_id.clone();
                clear
            }),
        ),
    };
    let (principal, account) = principal_and_account(credential);
    let meta = ClearMetadata {
        slot,
        cluster_id: key.cluster_id(),
        sequence,
        issued_at: update.issued_at.as_ref(),
        expires_at: update.expires_at.as_ref(),
        principal,
        account,
    };
    let sealed = seal_bytes(key, &meta, &plaintext)?;
    // Every other field (the refresh request id, `access_end`) travels in
    // clear as it is.
    let mut out = update.clone();
    out.credential = Some(clear);
    out.version = 0;
    out.sealed = Some(sealed);
    Ok(out)
}

/// Seals a whole private environment (`env.set`; `unset` and `replace_all`
/// are ignored): returns the change the publisher sends.
pub fn seal_env(key: &SealKey, env: &PrivateEnv, sequence: u64) -> Result<PrivateEnv, KeyError> {
    let whole = PrivateEnv {
        set: env.set.clone(),
        unset: vec![],
        replace_all: true,
        ..Default::default()
    };
    let plaintext = Zeroizing::new(whole.encode_to_vec());
    drop(whole);
    let meta = ClearMetadata {
        slot: SealSlot::Env,
        cluster_id: key.cluster_id(),
        sequence,
        issued_at: None,
        expires_at: None,
        principal: "",
        account: "",
    };
    Ok(PrivateEnv {
        set: vec![],
        unset: vec![],
        replace_all: true,
        version: 0,
        sealed: Some(seal_bytes(key, &meta, &plaintext)?),
    })
}

/// The structural checks every sealed payload must pass before the AEAD.
fn check_payload<'a>(
    key: &SealKey,
    sealed: Option<&'a SealedPayload>,
) -> Result<&'a SealedPayload, Refusal> {
    let sealed = sealed.ok_or(Refusal::Unsealed)?;
    if sealed.format != FORMAT {
        return Err(Refusal::UnknownFormat(sealed.format));
    }
    if sealed.cluster_id != key.cluster_id {
        return Err(Refusal::OtherCluster {
            sealed_for: sealed.cluster_id.clone(),
            ours: key.cluster_id.clone(),
        });
    }
    if sealed.key_id.as_slice() != key.id.as_slice() {
        return Err(Refusal::OtherKey {
            found: hex(&sealed.key_id),
            ours: key.key_id_hex(),
        });
    }
    if sealed.nonce.len() != NONCE_LEN {
        return Err(Refusal::Malformed("the nonce is not 12 bytes"));
    }
    Ok(sealed)
}

fn open_bytes(
    key: &SealKey,
    sealed: &SealedPayload,
    meta: &ClearMetadata<'_>,
) -> Result<Zeroizing<Vec<u8>>, Refusal> {
    let aad = associated_data(meta).map_err(Refusal::Malformed)?;
    key.cipher()
        .decrypt(
            Nonce::from_slice(&sealed.nonce),
            Payload {
                msg: &sealed.ciphertext,
                aad: &aad,
            },
        )
        .map(Zeroizing::new)
        .map_err(|_| Refusal::Forged)
}

/// An opened credential: the update to serve (whole credential, the clear
/// times and the broker's version) and its authenticated sequence.
#[derive(Debug)]
pub struct OpenedCredential {
    /// The update with its whole credential; `sealed` is cleared.
    pub update: CredentialUpdate,
    /// The publisher's sequence, authenticated.
    pub sequence: u64,
}

/// Opens a sealed credential as an agent of `key`'s cluster receives it.
/// Refuses an unsealed one ([`Refusal::Unsealed`]), one for another cluster
/// or key, one whose seal or clear metadata was altered, and one whose
/// sealed credential is of another kind or names another principal or
/// account than the clear one. The rollback rule is the caller's.
pub fn open_credential(
    key: &SealKey,
    update: &CredentialUpdate,
) -> Result<OpenedCredential, Refusal> {
    let sealed = check_payload(key, update.sealed.as_ref())?;
    let clear = update
        .credential
        .as_ref()
        .ok_or(Refusal::Malformed("no clear credential kind"))?;
    let slot = match clear {
        Credential::Aws(aws) => {
            if !aws.access_key_id.is_empty()
                || !aws.secret_access_key.is_empty()
                || !aws.session_token.is_empty()
                || !aws.region.is_empty()
            {
                return Err(Refusal::Malformed("secret fields are set in clear"));
            }
            SealSlot::Aws
        }
        Credential::Gcp(gcp) => {
            if !gcp.access_token.is_empty() || !gcp.token_type.is_empty() || !gcp.scopes.is_empty()
            {
                return Err(Refusal::Malformed("secret fields are set in clear"));
            }
            SealSlot::Gcp
        }
    };
    if update.issued_at.is_none() || update.expires_at.is_none() {
        return Err(Refusal::Malformed("issued_at and expires_at are required"));
    }
    let (principal, account) = principal_and_account(clear);
    let meta = ClearMetadata {
        slot,
        cluster_id: key.cluster_id(),
        sequence: sealed.sequence,
        issued_at: update.issued_at.as_ref(),
        expires_at: update.expires_at.as_ref(),
        principal,
        account,
    };
    let plaintext = open_bytes(key, sealed, &meta)?;
    let credential = match slot {
        SealSlot::Aws => {
            let aws = AwsCredential::decode(plaintext.as_slice())
                .map_err(|_| Refusal::Mismatch("the sealed AWS credential does not decode"))?;
            if aws.principal_arn != principal || aws.account_id != account {
                return Err(Refusal::Mismatch("principal or account differ"));
            }
            Credential::Aws(aws)
        }
        _ => {
            let gcp = GcpCredential::decode(plaintext.as_slice())
                .map_err(|_| Refusal::Mismatch("the sealed GCP credential does not decode"))?;
            if gcp.principal_email != principal || gcp.project_id != account {
                return Err(Refusal::Mismatch("principal or account differ"));
            }
            Credential::Gcp(gcp)
        }
    };
    let mut opened = update.clone();
    opened.credential = Some(credential);
    opened.sealed = None;
    Ok(OpenedCredential {
        update: opened,
        sequence: sealed.sequence,
    })
}

/// An opened private environment: the whole env (`replace_all`, the
/// broker's version) and its authenticated sequence.
#[derive(Debug)]
pub struct OpenedEnv {
    /// The whole environment; `sealed` is cleared.
    pub env: PrivateEnv,
    /// The publisher's sequence, authenticated.
    pub sequence: u64,
}

/// Opens a sealed private environment (see [`open_credential`]).
pub fn open_env(key: &SealKey, env: &PrivateEnv) -> Result<OpenedEnv, Refusal> {
    let sealed = check_payload(key, env.sealed.as_ref())?;
    if !env.set.is_empty() || !env.unset.is_empty() {
        return Err(Refusal::Malformed("variables are set in clear"));
    }
    let meta = ClearMetadata {
        slot: SealSlot::Env,
        cluster_id: key.cluster_id(),
        sequence: sealed.sequence,
        issued_at: None,
        expires_at: None,
        principal: "",
        account: "",
    };
    let plaintext = open_bytes(key, sealed, &meta)?;
    let opened = PrivateEnv::decode(plaintext.as_slice())
        .map_err(|_| Refusal::Mismatch("the sealed environment does not decode"))?;
    if opened.sealed.is_some() || !opened.replace_all {
        return Err(Refusal::Mismatch(
            "the sealed environment is not a whole one",
        ));
    }
    Ok(OpenedEnv {
        env: PrivateEnv {
            set: opened.set,
            unset: vec![],
            replace_all: true,
            version: env.version,
            sealed: None,
        },
        sequence: sealed.sequence,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::convert::timestamp;
    use crate::v1::EnvVar;

    fn aws_update() -> CredentialUpdate {
        let now = SystemTime::now();
        CredentialUpdate {
            credential: Some(Credential::Aws(AwsCredential {
                access_key_id: "ASIAEXAMPLE".into(),
                secret_access_key: "secret-key".into(),
                session_token: "session-token".into(),
                principal_arn: "arn:aws:sts::123456789012:assumed-role/r/s".into(),
                account_id: "123456789012".into(),
                region: "eu-west-1".into(),
            })),
            issued_at: Some(timestamp(now)),
            expires_at: Some(timestamp(now + Duration::from_secs(3600))),
            ..Default::default()
        }
    }

    #[test]
    fn a_key_file_round_trips_and_names_its_cluster() {
        let key = SealKey::generate("dev");
        let text = key.encode();
        assert!(text.starts_with("credstream-seal-v1:dev:"));
        let back = SealKey::parse_for(&format!("  {}\n", text.as_str()), "dev").unwrap();
        assert_eq!(back.key_id_hex(), key.key_id_hex());
        assert!(matches!(
            SealKey::parse_for(&text, "prod"),
            Err(KeyError::OtherCluster { .. })
        ));
        assert!(SealKey::parse("credstream-seal-v1:dev:AAAA").is_err());
        assert!(
            !format!("{key:?}").contains(&text[23..]),
            "Debug shows no key"
        );
    }

    #[test]
    fn a_sealed_credential_opens_to_the_original_and_hides_it_in_clear() {
        let key = SealKey::generate("dev");
        let update = aws_update();
        let sealed = seal_credential(&key, &update, 7).unwrap();
        let wire = sealed.encode_to_vec();
        let text = String::from_utf8_lossy(&wire);
        assert!(!text.contains("secret-key") && !text.contains("session-token"));
        assert!(!text.contains("ASIAEXAMPLE") && !text.contains("eu-west-1"));
        let opened = open_credential(&key, &sealed).unwrap();
        assert_eq!(opened.sequence, 7);
        assert_eq!(opened.update.credential, update.credential);
        assert_eq!(opened.update.expires_at, update.expires_at);
    }

    #[test]
    fn every_tampering_is_refused() {
        let key = SealKey::generate("dev");
        let sealed = seal_credential(&key, &aws_update(), 7).unwrap();

        let mut flipped = sealed.clone();
        flipped.sealed.as_mut().unwrap().ciphertext[3] ^= 1;
        assert_eq!(
            open_credential(&key, &flipped).unwrap_err(),
            Refusal::Forged
        );

        let mut later = sealed.clone();
        later.expires_at.as_mut().unwrap().seconds += 3600;
        assert_eq!(open_credential(&key, &later).unwrap_err(), Refusal::Forged);

        let mut resequenced = sealed.clone();
        resequenced.sealed.as_mut().unwrap().sequence += 1;
        assert_eq!(
            open_credential(&key, &resequenced).unwrap_err(),
            Refusal::Forged
        );

        let mut principal = sealed.clone();
        if let Some(Credential::Aws(aws)) = principal.credential.as_mut() {
            aws.account_id = "999999999999".into();
        }
        assert_eq!(
            open_credential(&key, &principal).unwrap_err(),
            Refusal::Forged
        );

        let mut unsealed = aws_update();
        unsealed.version = 9;
        assert_eq!(
            open_credential(&key, &unsealed).unwrap_err(),
            Refusal::Unsealed
        );

        let other = SealKey::generate("other");
        assert!(matches!(
            open_credential(&other, &sealed).unwrap_err(),
            Refusal::OtherCluster { .. }
        ));
        let same_cluster_other_key = SealKey::generate("dev");
        assert!(matches!(
            open_credential(&same_cluster_other_key, &sealed).unwrap_err(),
            Refusal::OtherKey { .. }
        ));
        // A payload relabelled for this cluster still fails the AEAD.
        let mut relabelled = seal_credential(&other, &aws_update(), 7).unwrap();
        let payload = relabelled.sealed.as_mut().unwrap();
        payload.cluster_id = "dev".into();
        payload.key_id = key.id.to_vec();
        assert_eq!(
            open_credential(&key, &relabelled).unwrap_err(),
            Refusal::Forged
        );
    }

    #[test]
    fn an_env_seals_whole_and_opens_with_its_sequence() {
        let key = SealKey::generate("dev");
        let env = PrivateEnv {
            set: vec![EnvVar {
                name: "DB".into(),
                value: "s3cret".into(),
            }],
            ..Default::default()
        };
        let sealed = seal_env(&key, &env, 11).unwrap();
        assert!(sealed.set.is_empty() && sealed.replace_all);
        let opened = open_env(&key, &sealed).unwrap();
        assert_eq!(opened.sequence, 11);
        assert_eq!(opened.env.set, env.set);
        let mut flipped = sealed.clone();
        flipped.sealed.as_mut().unwrap().ciphertext[0] ^= 0x80;
        assert_eq!(open_env(&key, &flipped).unwrap_err(), Refusal::Forged);
        assert_eq!(open_env(&key, &env).unwrap_err(), Refusal::Unsealed);
    }

    #[test]
    fn the_associated_data_has_the_documented_layout() {
        let ts = Timestamp {
            seconds: 0x0102,
            nanos: 5,
        };
        let aad = associated_data(&ClearMetadata {
            slot: SealSlot::Gcp,
            cluster_id: "c1",
            sequence: 3,
            issued_at: Some(&ts),
            expires_at: None,
            principal: "p",
            account: "",
        })
        .unwrap();
        let mut expected = b"credstream.v1.seal".to_vec();
        expected.extend([1, 2, 0, 2, b'c', b'1']);
        expected.extend(3u64.to_be_bytes());
        expected.extend(0x0102i64.to_be_bytes());
        expected.extend(5u32.to_be_bytes());
        expected.extend([0u8; 12]);
        expected.extend([0, 1, b'p', 0, 0]);
        assert_eq!(aad, expected);
    }
}
