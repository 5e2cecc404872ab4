//! The local authorization token that guards the secret-bearing endpoints.
//!
//! Every local process can reach a loopback port, so the AWS endpoint and
//! `/env` answer only callers that present the token the agent generated at
//! start and handed to the processes it serves (through
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN(_FILE)`, the env file or `exec`). The
//! AWS SDKs send it as the whole `Authorization` header value, without a
//! `Bearer ` prefix (docs/facts.md, fact 2), so that is the one form accepted.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use rand::RngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::HttpError;

/// A random token, generated once per agent run. Cheap to clone; the bytes
/// are zeroized when the last clone drops, and `Debug` never shows them.
#[derive(Clone)]
pub struct AuthToken(Arc<Zeroizing<String>>);

impl AuthToken {
    /// 32 random bytes from the OS, hex-encoded: header-safe (no CR/LF, no
    /// spaces) and unguessable.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        let mut hex = String::with_capacity(64);
        for byte in bytes.iter() {
            hex.push(char::from_digit(u32::from(byte >> 4), 16).expect("nibble"));
            hex.push(char::from_digit(u32::from(byte & 0xf), 16).expect("nibble"));
        }
        Self(Arc::new(Zeroizing::new(hex)))
    }

    /// The token's value, for the environment of the processes the agent
    /// serves. Never log it.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    /// Accepts a request whose `Authorization` header is exactly the token.
    /// Missing header: [`HttpError::MissingToken`] (401); anything else that
    /// does not match: [`HttpError::WrongToken`] (403). The comparison takes
    /// the same time wherever the first difference is.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        let Some(presented) = headers.get(AUTHORIZATION) else {
            return Err(HttpError::MissingToken);
        };
        if bool::from(presented.as_bytes().ct_eq(self.expose().as_bytes())) {
            Ok(())
        } else {
            Err(HttpError::WrongToken)
        }
    }
}

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

/// The token written to a file that only this user can read, in a private
/// directory that is removed when this value drops.
///
/// boto3 re-reads `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` on every fetch and
/// prefers it to the variable holding the token itself, so processes that
/// learn only the file's path (for example from `run`'s printed exports)
/// never see the token in their environment or in `ps e`.
#[derive(Debug)]
pub struct TokenFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl TokenFile {
    /// Writes `token` to `<dir>/aws-token` (mode 0600, no trailing newline:
    /// botocore sends the file's bytes unmodified and rejects a value with a
    /// newline) inside a new mode-0700 directory under `$XDG_RUNTIME_DIR`
    /// when set (a per-user tmpfs), else the system temp dir.
    pub fn create(token: &AuthToken) -> io::Result<Self> {
        let parent = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|dir| dir.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        Self::create_in(&parent, token)
    }

    /// As [`TokenFile::create`], under `parent`.
    pub fn create_in(parent: &Path, token: &AuthToken) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("credstream-agent-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)?;
        let path = dir.path().join("aws-token");
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.write_all(token.expose().as_bytes())?;
        file.sync_all()?;
        Ok(Self { dir, path })
    }

    /// The file's path, for `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The private directory holding the file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_hex_and_never_debug_printed() {
        let a = AuthToken::generate();
        let b = AuthToken::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn check_distinguishes_missing_from_wrong() {
        let token = AuthToken::generate();
        let mut headers = HeaderMap::new();
        assert!(matches!(
            token.check(&headers),
            Err(HttpError::MissingToken)
        ));
        headers.insert(AUTHORIZATION, "nope".parse().unwrap());
        assert!(matches!(token.check(&headers), Err(HttpError::WrongToken)));
        let bearer = format!("Bearer {}", token.expose());
        headers.insert(AUTHORIZATION, bearer.parse().unwrap());
        assert!(matches!(token.check(&headers), Err(HttpError::WrongToken)));
        headers.insert(AUTHORIZATION, token.expose().parse().unwrap());
        assert!(token.check(&headers).is_ok());
    }

    #[test]
    fn token_file_is_private_and_has_no_newline() {
        let parent = tempfile::tempdir().unwrap();
        let token = AuthToken::generate();
        let file = TokenFile::create_in(parent.path(), &token).unwrap();
        assert_eq!(
            std::fs::read_to_string(file.path()).unwrap(),
            token.expose()
        );
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(file.path()), 0o600);
        assert_eq!(mode(file.dir()), 0o700);
        let dir = file.dir().to_path_buf();
        drop(file);
        assert!(!dir.exists());
    }
}
