//! The env file: the child environment ([`ChildEnv`]) written to a file for
//! processes the agent does not start — `set -a; . FILE; set +a` in a shell,
//! or `EnvironmentFile=FILE` in a systemd unit.
//!
//! # Format
//! One `NAME='value'` line per variable, sorted by name. Values are single
//! quoted, so the shell expands nothing (`$`, backticks, `\` and newlines are
//! all literal), and an embedded `'` is written `'"'"'` (close the single
//! quotes, a double-quoted `'`, reopen). The usual shell idiom `'\''` is
//! *not* used: systemd's parser (`parse_env_file_internal` in
//! `src/basic/env-file.c`) returns to its pre-value state after a closing
//! `'`, where `\'` appends a quote and then switches to the unquoted state,
//! in which later quotes are taken literally — `'it'\''s'` reads as
//! `it''s'`. The `'"'"'` form reads as `it's` in both (checked with systemd
//! 252 through `ConditionOSRelease=` on a bind-mounted os-release, and with
//! dash and bash; the unit tests replay systemd's rules and run both
//! shells). Names that are not `[A-Za-z_][A-Za-z0-9_]*` and values with a
//! NUL byte cannot be represented and are skipped with a warning (the
//! broker rejects both, so this is defence in depth). systemd additionally
//! drops values containing control characters other than tab and newline.
//!
//! # Writes
//! The file holds secrets, so it is created with mode 0600 and replaced
//! atomically: the new content goes to a temporary file (mode 0600) in the
//! same directory, is fsynced, and is renamed over the old one, then the
//! directory is fsynced. A reader sees the old file or the new one, never a
//! mix. [`EnvFile::run`] removes a stale file at start, writes the first
//! time the agent is ready (so the file's existence means "ready"), rewrites
//! on every change of content (including a credential expiring: the expired
//! `CLOUDSDK_AUTH_ACCESS_TOKEN` is removed), and removes the file at
//! shutdown so that no secret outlives the agent on disk.

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::http::{ChildEnv, LocalEndpoints};
use crate::store::{AgentState, CredentialStore};

/// Errors maintaining the env file.
#[derive(Debug, thiserror::Error)]
pub enum EnvFileError {
    /// The file's directory does not exist; create it or choose another
    /// `--env-file` path.
    #[error("the directory of the env file {path} does not exist")]
    NoDirectory {
        /// The env file path.
        path: PathBuf,
    },
    /// Writing, syncing, renaming or removing failed (permissions, full
    /// disk).
    #[error("cannot write the env file {path}: {source}")]
    Write {
        /// The env file path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Renders `env` in the format described in the module documentation.
pub fn render(env: &ChildEnv) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::new());
    for (name, value) in env.iter() {
        if !is_valid_name(name) {
            tracing::warn!(
                name,
                "skipping a variable whose name is not valid in an env file"
            );
            continue;
        }
        if value.contains('\0') {
            tracing::warn!(name, "skipping a variable whose value contains a NUL byte");
            continue;
        }
        out.push_str(name);
        out.push('=');
        quote_into(value, &mut out);
        out.push('\n');
    }
    out
}

/// Appends `value` single-quoted, each `'` written as `'"'"'`.
fn quote_into(value: &str, out: &mut String) {
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str("'\"'\"'");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
}

/// `[A-Za-z_][A-Za-z0-9_]*`, the names both shells and systemd accept.
fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces `path` with `contents` atomically, mode 0600 (see the module
/// documentation). Blocking: call it from a blocking context.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the env file path has no file name",
        )
    })?;
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name.to_string_lossy()))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)?;
    {
        let mut file = temp.as_file();
        file.write_all(contents)?;
        file.sync_all()?;
    }
    temp.persist(path).map_err(|e| e.error)?;
    File::open(dir)?.sync_all()
}

/// Keeps one env file current with the agent's state.
pub struct EnvFile {
    path: PathBuf,
    store: CredentialStore,
    endpoints: Arc<LocalEndpoints>,
    writes: watch::Sender<u64>,
}

impl EnvFile {
    /// An env file at `path` for processes that use `endpoints`. Checks that
    /// the directory exists, so a typo fails at start rather than at the
    /// first write.
    pub fn new(
        path: PathBuf,
        store: CredentialStore,
        endpoints: Arc<LocalEndpoints>,
    ) -> Result<Self, EnvFileError> {
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(EnvFileError::NoDirectory { path });
        }
        Ok(Self {
            path,
            store,
            endpoints,
            writes: watch::Sender::new(0),
        })
    }

    /// Counts the writes made so far; changes after each one (for tests and
    /// for callers that wait for the file to appear).
    pub fn writes(&self) -> watch::Receiver<u64> {
        self.writes.subscribe()
    }

    /// Maintains the file until `shutdown` resolves, then removes it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), EnvFileError> {
        let result = self.maintain(shutdown).await;
        let removed = self.remove().await;
        result.and(removed)
    }

    async fn maintain(&self, shutdown: impl Future<Output = ()>) -> Result<(), EnvFileError> {
        self.remove().await?;
        tokio::pin!(shutdown);
        let mut changes = self.store.subscribe();
        let mut written: Option<Zeroizing<String>> = None;
        loop {
            let now = SystemTime::now();
            let state = changes.borrow_and_update().clone();
            if written.is_some() || state.readiness(now).is_ok() {
                let contents = render(&self.endpoints.child_env(&state, now));
                if written.as_ref() != Some(&contents) {
                    self.write(contents.clone()).await?;
                    written = Some(contents);
                }
            }
            let wake = next_expiry(&state, now);
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                changed = changes.changed() => if changed.is_err() { return Ok(()) },
                () = sleep_opt(wake) => {}
            }
        }
    }

    async fn write(&self, contents: Zeroizing<String>) -> Result<(), EnvFileError> {
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || write_atomic(&path, contents.as_bytes()))
            .await
            .unwrap_or_else(|join| Err(io::Error::other(join)));
        result.map_err(|source| EnvFileError::Write {
            path: self.path.clone(),
            source,
        })?;
        tracing::info!(path = %self.path.display(), "env file written");
        self.writes.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn remove(&self) -> Result<(), EnvFileError> {
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(EnvFileError::Write {
                path: self.path.clone(),
                source,
            }),
        }
    }
}

/// How long until the earliest held credential that is still live expires:
/// the content changes then even though no message arrives.
fn next_expiry(state: &AgentState, now: SystemTime) -> Option<Duration> {
    state
        .credentials
        .iter()
        .filter_map(|(_, held)| held.as_ref())
        .filter_map(|c| c.expiry())
        .filter_map(|expiry| expiry.duration_since(now).ok())
        .filter(|left| !left.is_zero())
        .min()
}

async fn sleep_opt(duration: Option<Duration>) {
    match duration {
        // A little past the expiry, so that `live` sees it expired.
        Some(d) => tokio::time::sleep(d + Duration::from_millis(10)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// systemd's value rules from `parse_env_file_internal` (systemd 252
    /// through current), for the states our quoting can reach: enough to
    /// show that what we write reads back as written.
    fn systemd_value(raw: &str) -> String {
        #[derive(Clone, Copy)]
        enum S {
            Pre,
            Value,
            Escape,
            Single,
            Double,
            DoubleEscape,
        }
        let mut state = S::Pre;
        let mut value = String::new();
        let mut trailing_ws: Option<usize> = None;
        for c in raw.chars() {
            state = match (state, c) {
                (S::Pre, '\'') => S::Single,
                (S::Pre, '"') => S::Double,
                (S::Pre, '\\') => S::Escape,
                (S::Pre, c) if c == ' ' || c == '\t' => S::Pre,
                (S::Pre | S::Value, c) => {
                    if c == ' ' || c == '\t' {
                        trailing_ws.get_or_insert(value.len());
                    } else {
                        trailing_ws = None;
                    }
                    if matches!(state, S::Value) && c == '\\' {
                        trailing_ws = None;
                        S::Escape
                    } else {
                        value.push(c);
                        S::Value
                    }
                }
                (S::Escape, c) => {
                    if c != '\n' {
                        value.push(c);
                    }
                    S::Value
                }
                (S::Single, '\'') => S::Pre,
                (S::Single, c) => {
                    value.push(c);
                    S::Single
                }
                (S::Double, '"') => S::Pre,
                (S::Double, '\\') => S::DoubleEscape,
                (S::Double, c) => {
                    value.push(c);
                    S::Double
                }
                (S::DoubleEscape, c) => {
                    if "\"\\`$".contains(c) {
                        value.push(c);
                    } else if c != '\n' {
                        value.push('\\');
                        value.push(c);
                    }
                    S::Double
                }
            };
        }
        if let (S::Value, Some(at)) = (state, trailing_ws) {
            value.truncate(at);
        }
        value
    }

    const TRICKY: &[&str] = &[
        "plain",
        "",
        "it's",
        "''",
        "a'b'c'",
        "$HOME `id` $(id) \\n \\",
        "line one\nline two\n",
        "  spaces  ",
        "tab\tand \"double\" quotes",
        "#not a comment",
        "ünïcödé",
    ];

    #[test]
    fn quoting_reads_back_under_systemd_rules() {
        for value in TRICKY {
            let mut quoted = String::new();
            quote_into(value, &mut quoted);
            assert_eq!(systemd_value(&quoted), *value, "{quoted}");
        }
        // The shell idiom that systemd misreads, for the record.
        assert_eq!(systemd_value("'it'\\''s'"), "it''s'");
    }

    #[test]
    fn names_are_checked() {
        assert!(is_valid_name("AWS_REGION"));
        assert!(is_valid_name("_x1"));
        assert!(!is_valid_name("1x"));
        assert!(!is_valid_name("A-B"));
        assert!(!is_valid_name(""));
    }
}
