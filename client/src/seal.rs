//! The publisher's side of sealed delivery (`docs/sealing.md`): the
//! cluster's seal key on disk, and a [`Sealer`] that seals every credential
//! and every private env change once, before it reaches the broker.
//!
//! Keys live in `<config>/credstream/seal-keys/<cluster>.key` (mode 0600 in
//! a 0700 directory), where `<config>` is `$CREDSTREAM_CONFIG_DIR`, else
//! `$XDG_CONFIG_HOME`, else `~/.config`; or in a file the user names. The
//! first publish to a cluster creates its key; `credstream seal-key
//! --cluster ID` prints it for the agents. The broker never sees it.
//!
//! Sequences: each slot (AWS, GCP, the private env) gets
//! `max(previous + 1, wall clock in µs)`, so a restarted publisher keeps
//! increasing without remembering anything (unless the clock goes back by
//! more than the time since its last seal).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use credstream_proto::convert::timestamp;
use credstream_proto::rules::private_file::{self, PrivateFileError};
use credstream_proto::seal::{self, KeyError, SealKey, SealSlot};
use credstream_proto::v1::{CredentialUpdate, PrivateEnv};

/// A seal key that cannot be read, created or used.
#[derive(Debug, thiserror::Error)]
pub enum SealKeyError {
    /// No directory to keep keys in.
    #[error(
        "no config directory for seal keys: set HOME, XDG_CONFIG_HOME or CREDSTREAM_CONFIG_DIR, or pass --seal-key-file"
    )]
    NoConfigDir,
    /// Reading or writing the file failed.
    #[error("seal key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It cannot be read, or group or others may access it (the message
    /// names the file and `chmod 600`): the one rule the agent applies to
    /// its copy too ([`credstream_proto::rules::private_file`]).
    #[error(transparent)]
    Private(#[from] PrivateFileError),
    /// The file's content is not a key for this cluster.
    #[error("seal key file {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        source: KeyError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SealKeyError + '_ {
    move |source| SealKeyError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where `credstream` keeps the key of `cluster_id` when no file is named.
pub fn default_key_path(cluster_id: &str) -> Result<PathBuf, SealKeyError> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let base = if let Some(dir) = var("CREDSTREAM_CONFIG_DIR") {
        PathBuf::from(dir)
    } else if let Some(dir) = var("XDG_CONFIG_HOME") {
        PathBuf::from(dir).join("credstream")
    } else if let Some(home) = var("HOME") {
        PathBuf::from(home).join(".config").join("credstream")
    } else {
        return Err(SealKeyError::NoConfigDir);
    };
    Ok(base.join("seal-keys").join(format!("{cluster_id}.key")))
}

/// Reads the key in `path`, which must be for `cluster_id` and readable by
/// its owner only.
pub fn load(path: &Path, cluster_id: &str) -> Result<SealKey, SealKeyError> {
    let text = private_file::read(path, "seal key file")?;
    SealKey::parse_for(&text, cluster_id).map_err(|source| SealKeyError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// Reads the key in `path`, or creates one there (mode 0600; missing
/// directories 0700) if there is no file. Returns the key and whether it was
/// created.
pub fn load_or_create(path: &Path, cluster_id: &str) -> Result<(SealKey, bool), SealKeyError> {
    if path.exists() {
        return load(path, cluster_id).map(|key| (key, false));
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
    }
    let key = SealKey::generate(cluster_id);
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(file) => file,
        // Another publish created it meanwhile: use that one.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            return load(path, cluster_id).map(|key| (key, false));
        }
        Err(error) => return Err(io(path)(error)),
    };
    let mut line = key.encode();
    line.push('\n');
    file.write_all(line.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))?;
    Ok((key, true))
}

/// Seals what a publish session sends. One per session; sequences per slot.
#[derive(Debug)]
pub struct Sealer {
    key: SealKey,
    /// The last sequence used per slot (AWS, GCP, env).
    last: Mutex<[u64; 3]>,
}

impl Sealer {
    /// A sealer for `key`'s cluster.
    pub fn new(key: SealKey) -> Self {
        Self {
            key,
            last: Mutex::new([0; 3]),
        }
    }

    /// The key in use.
    pub fn key(&self) -> &SealKey {
        &self.key
    }

    fn next_sequence(&self, slot: SealSlot) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let held = &mut last[slot as usize - 1];
        *held = (*held + 1).max(now);
        *held
    }

    /// Seals a credential (setting `issued_at` to now if the minter left it
    /// empty, since it is bound into the seal).
    pub fn seal_credential(&self, update: &CredentialUpdate) -> Result<CredentialUpdate, KeyError> {
        let slot = SealSlot::of_kind(update.kind())
            .ok_or(KeyError::Seal("the update carries no credential"))?;
        if update.issued_at.is_none() {
            let mut stamped = update.clone();
            stamped.issued_at = Some(timestamp(SystemTime::now()));
            return seal::seal_credential(&self.key, &stamped, self.next_sequence(slot));
        }
        seal::seal_credential(&self.key, update, self.next_sequence(slot))
    }

    /// Seals the whole private env (`env.set`).
    pub fn seal_env(&self, env: &PrivateEnv) -> Result<PrivateEnv, KeyError> {
        seal::seal_env(&self.key, env, self.next_sequence(SealSlot::Env))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_created_key_is_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys").join("dev.key");
        let (created, new) = load_or_create(&path, "dev").unwrap();
        assert!(new);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (again, new) = load_or_create(&path, "dev").unwrap();
        assert!(!new);
        assert_eq!(again.key_id_hex(), created.key_id_hex());
        // Another cluster's name is refused, and the file is left as it was.
        let error = load(&path, "prod").unwrap_err().to_string();
        assert!(error.contains("for cluster dev, not prod"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        // The shared rule's message: the file, its mode and the fix.
        let error = load(&path, "dev").unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "the seal key file {p} is accessible to other users (mode 644); run `chmod 600 {p}` and keep it readable by its owner only",
                p = path.display()
            )
        );
        // Read-only for its owner (as systemd's LoadCredential= leaves a
        // copy) is private too.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(
            load(&path, "dev").unwrap().key_id_hex(),
            created.key_id_hex()
        );
    }

    #[test]
    fn sequences_increase_per_slot() {
        let sealer = Sealer::new(SealKey::generate("dev"));
        let a = sealer.next_sequence(SealSlot::Aws);
        let b = sealer.next_sequence(SealSlot::Aws);
        assert!(b > a);
        let e = sealer.next_sequence(SealSlot::Env);
        assert!(e >= a);
    }
}
