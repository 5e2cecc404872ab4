//! Which seal key a publisher uses: the file the user named or the
//! cluster's default one, and whether `publish` seals at all (`--no-seal`).
//! `credstream publish`, `credstream seal-key` and the Python `Publisher`
//! resolve it here, so they find the same key. The key file itself (where
//! the default is, its format, mode 0600, creating it) is [`crate::seal`]'s.

use std::path::{Path, PathBuf};

use credstream_proto::seal::SealKey;

use crate::seal::{self, SealKeyError};

/// Why `publish` cannot seal with the cluster's key.
#[derive(Debug, thiserror::Error)]
pub enum PublishKeyError {
    /// There is no default place for the key (no config directory).
    #[error(transparent)]
    NoPath(SealKeyError),
    /// The key file cannot be read or created, or holds no key for this
    /// cluster (the reason is the source).
    #[error("cannot use the seal key (or pass --no-seal to publish unsealed)")]
    Unusable(#[source] SealKeyError),
}

/// Where the key of a cluster is: the named file, or the default path.
pub fn key_path(cluster: &str, file: Option<&Path>) -> Result<PathBuf, SealKeyError> {
    match file {
        Some(path) => Ok(path.to_owned()),
        None => seal::default_key_path(cluster),
    }
}

/// The key `publish` seals with (created on first use), and a line saying
/// so; `None` with `--no-seal`.
pub fn for_publish(
    cluster: &str,
    file: Option<&Path>,
    no_seal: bool,
) -> Result<Option<(SealKey, String)>, PublishKeyError> {
    if no_seal {
        return Ok(None);
    }
    let path = key_path(cluster, file).map_err(PublishKeyError::NoPath)?;
    let (key, created) = seal::load_or_create(&path, cluster).map_err(PublishKeyError::Unusable)?;
    let line = format!(
        "sealing every credential and env change for cluster {cluster} (key {} in {}{}); agents need it: `credstream seal-key --cluster {cluster}` > F, then `credstream-agent --seal-key-file F`",
        key.key_id_hex(),
        path.display(),
        if created { ", created now" } else { "" }
    );
    Ok(Some((key, line)))
}
