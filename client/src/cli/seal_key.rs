//! `credstream seal-key`: print a cluster's seal key (creating it if there
//! is none), for the agents' `--seal-key-file`. Which key that is, and the
//! key `credstream publish` seals with, is [`credstream_client::seal_key`].

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use credstream_client::seal;
use credstream_client::seal_key::key_path;

pub use credstream_client::seal_key::for_publish;

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
