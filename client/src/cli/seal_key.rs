//! `credstream seal-key`: print a cluster's seal key (creating it if there
//! is none), for the agents' `--seal-key-file`, and resolve the key
//! `credstream publish` seals with.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use credstream_client::seal;
use credstream_proto::seal::SealKey;

/// Where the key of a cluster is: the named file, or the default path.
pub fn key_path(cluster: &str, file: Option<&Path>) -> Result<PathBuf> {
    match file {
        Some(path) => Ok(path.to_owned()),
        None => Ok(seal::default_key_path(cluster)?),
    }
}

/// The key `publish` seals with (created on first use), and a line saying
/// so; `None` with `--no-seal`.
pub fn for_publish(
    cluster: &str,
    file: Option<&Path>,
    no_seal: bool,
) -> Result<Option<(SealKey, String)>> {
    if no_seal {
        return Ok(None);
    }
    let path = key_path(cluster, file)?;
    let (key, created) = seal::load_or_create(&path, cluster)
        .with_context(|| "cannot use the seal key (or pass --no-seal to publish unsealed)")?;
    let line = format!(
        "sealing every credential and env change for cluster {cluster} (key {} in {}{}); agents need it: `credstream seal-key --cluster {cluster}` > F, then `credstream-agent --seal-key-file F`",
        key.key_id_hex(),
        path.display(),
        if created { ", created now" } else { "" }
    );
    Ok(Some((key, line)))
}

/// Runs `credstream seal-key`: the key file's line on stdout, where it was
/// (and whether it was just created) on stderr.
pub fn run(cluster: &str, file: Option<&Path>) -> Result<ExitCode> {
    let path = key_path(cluster, file)?;
    let (key, created) = seal::load_or_create(&path, cluster)?;
    println!("{}", key.encode().as_str());
    eprintln!(
        "credstream: seal key {} for cluster {cluster} {} {}; give it to the agents out of band (--seal-key-file / CREDSTREAM_SEAL_KEY_FILE), never through the broker",
        key.key_id_hex(),
        if created { "created in" } else { "from" },
        path.display()
    );
    Ok(ExitCode::SUCCESS)
}
