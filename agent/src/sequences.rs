//! The highest sealed sequences an agent accepted, kept across restarts in
//! the state file the user names (`--state-file F`).
//!
//! The rollback rule (`docs/sealing.md`) refuses a sealed item whose
//! sequence is not newer than the last one accepted for its slot. Held in
//! memory only, that rule starts over with every restart, and a broker
//! could then hand the restarted agent an older, unexpired sealed item
//! that the running agent had refused. With a state file, the agent starts
//! from the sequences it had accepted, and records each new one before the
//! item is served.
//!
//! The file holds no secret (three numbers and the cluster id), but
//! whoever may change it may lower them, so it gets the seal key file's
//! rule: accessible to its owner only ([`private_file`]), written as a new
//! 0600 file renamed over the old one, so a crash leaves the old or the
//! new, never half of one. A missing file is created at start (so that an
//! unwritable directory fails before anything is served); one for another
//! cluster, or one that does not parse, is refused: each agent needs its
//! own, and deleting it forgoes the protection once, as a fresh agent does.

use std::io::Write;
use std::path::{Path, PathBuf};

use credstream_proto::rules::private_file::{self, PrivateFileError};
use serde_json::{Value, json};

/// The slots, in the order of [`Sequences`].
const SLOTS: [&str; 3] = ["aws", "gcp", "env"];

/// The highest accepted sequence per slot: AWS, GCP, private env.
pub type Sequences = [u64; 3];

/// A state file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// Unreadable, or accessible to other users (the message says what to
    /// do).
    #[error(transparent)]
    File(#[from] PrivateFileError),
    /// It cannot be created or replaced: check that its directory exists
    /// and is writable.
    #[error("cannot write the state file {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not a state file of this format.
    #[error(
        "the state file {} is not an agent state file ({reason}): give a file of its own to each agent, or remove it to start afresh",
        path.display()
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// Another cluster's.
    #[error(
        "the state file {} is cluster {found}'s, not {expected}'s: give each agent a file of its own",
        path.display()
    )]
    OtherCluster {
        /// The file.
        path: PathBuf,
        /// The cluster it names.
        found: String,
        /// This agent's cluster.
        expected: String,
    },
}

/// The state file of one agent.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    cluster: String,
}

impl StateFile {
    /// Opens (or creates, with no sequence yet) the state file at `path`
    /// for `cluster`, and returns it with the sequences it holds.
    pub fn open(path: &Path, cluster: &str) -> Result<(Self, Sequences), StateFileError> {
        let file = StateFile {
            path: path.to_owned(),
            cluster: cluster.to_owned(),
        };
        if !path.exists() {
            let none = Sequences::default();
            file.save(&none)?;
            return Ok((file, none));
        }
        let text = private_file::read(path, "state file")?;
        let sequences = file.parse(&text)?;
        Ok((file, sequences))
    }

    fn parse(&self, text: &str) -> Result<Sequences, StateFileError> {
        let invalid = |reason| StateFileError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let value: Value = serde_json::from_str(text).map_err(|_| invalid("not JSON"))?;
        if value["format"] != json!(1) {
            return Err(invalid("no format 1"));
        }
        let found = value["cluster"]
            .as_str()
            .ok_or_else(|| invalid("no cluster"))?;
        if found != self.cluster {
            return Err(StateFileError::OtherCluster {
                path: self.path.clone(),
                found: credstream_proto::rules::text::printable(found, 100).into_owned(),
                expected: self.cluster.clone(),
            });
        }
        let mut sequences = Sequences::default();
        for (slot, held) in SLOTS.iter().zip(&mut sequences) {
            *held = value["sequences"][slot]
                .as_u64()
                .ok_or_else(|| invalid("a sequence is missing"))?;
        }
        Ok(sequences)
    }

    /// Replaces the file with `sequences` (a new 0600 file renamed over it).
    pub fn save(&self, sequences: &Sequences) -> Result<(), StateFileError> {
        let write = |source| StateFileError::Write {
            path: self.path.clone(),
            source,
        };
        let slots: serde_json::Map<String, Value> = SLOTS
            .iter()
            .zip(sequences)
            .map(|(slot, held)| ((*slot).to_owned(), json!(held)))
            .collect();
        let text = json!({ "format": 1, "cluster": self.cluster, "sequences": slots });
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        // tempfile creates it 0600.
        let mut file = tempfile::NamedTempFile::new_in(dir).map_err(write)?;
        writeln!(file, "{text}").map_err(write)?;
        file.as_file().sync_all().map_err(write)?;
        file.persist(&self.path).map_err(|e| write(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn sequences_survive_a_reopen_and_foreign_or_exposed_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.state");
        let (file, none) = StateFile::open(&path, "dev").unwrap();
        assert_eq!(none, [0, 0, 0]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        file.save(&[3, 0, 7]).unwrap();
        assert_eq!(StateFile::open(&path, "dev").unwrap().1, [3, 0, 7]);

        let other = StateFile::open(&path, "prod").unwrap_err();
        assert!(
            other.to_string().contains("is cluster dev's, not prod's"),
            "{other}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let exposed = StateFile::open(&path, "dev").unwrap_err();
        assert!(exposed.to_string().contains("chmod 600"), "{exposed}");
        std::fs::write(&path, "{}").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let invalid = StateFile::open(&path, "dev").unwrap_err();
        assert!(
            invalid.to_string().contains("not an agent state file"),
            "{invalid}"
        );
        let nowhere = StateFile::open(&dir.path().join("missing/agent.state"), "dev");
        assert!(matches!(nowhere, Err(StateFileError::Write { .. })));
    }
}
