//! A token given as a flag or in a file, read the same way by every
//! program: the flag wins (clap makes them exclusive anyway), surrounding
//! whitespace (a file's trailing newline) is dropped, and an empty token is
//! an error here rather than an `UNAUTHENTICATED` from the broker later.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Why no token could be read. `flags` names the ways to give it, for the
/// message (e.g. "--token-file or --token").
#[derive(Debug, thiserror::Error)]
pub enum TokenSourceError {
    /// Neither was given.
    #[error("give the {role} token with {flags}")]
    Missing {
        /// "agent", "publisher".
        role: &'static str,
        /// The flags that take it.
        flags: &'static str,
    },
    /// The file could not be read (the reason is the error's source).
    #[error("cannot read the token file {}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// What was given is empty or only whitespace.
    #[error("the token is empty; give the {role} token with {flags}")]
    Empty {
        /// "agent", "publisher".
        role: &'static str,
        /// The flags that take it.
        flags: &'static str,
    },
}

/// The token from `flag` or else `file`, trimmed and non-empty.
pub fn read(
    flag: Option<&str>,
    file: Option<&Path>,
    role: &'static str,
    flags: &'static str,
) -> Result<Zeroizing<String>, TokenSourceError> {
    let token = match (flag, file) {
        (Some(token), _) => Zeroizing::new(token.trim().to_owned()),
        (None, Some(path)) => {
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                TokenSourceError::Unreadable {
                    path: path.to_path_buf(),
                    source,
                }
            })?);
            Zeroizing::new(text.trim().to_owned())
        }
        (None, None) => return Err(TokenSourceError::Missing { role, flags }),
    };
    if token.is_empty() {
        return Err(TokenSourceError::Empty { role, flags });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FLAGS: &str = "--token-file or --token";

    #[test]
    fn the_flag_or_the_file_trimmed() {
        let dir = std::env::temp_dir().join(format!("credstream-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "file-token\n").unwrap();
        let read_file = read(None, Some(&file), "agent", FLAGS).unwrap();
        assert_eq!(read_file.as_str(), "file-token");
        let from_flag = read(Some(" flag-token "), Some(&file), "agent", FLAGS).unwrap();
        assert_eq!(from_flag.as_str(), "flag-token");

        std::fs::write(&file, " \n").unwrap();
        let empty = read(None, Some(&file), "agent", FLAGS).unwrap_err();
        assert_eq!(
            empty.to_string(),
            "the token is empty; give the agent token with --token-file or --token"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let gone = read(None, Some(&file), "agent", FLAGS).unwrap_err();
        assert_eq!(
            gone.to_string(),
            format!("cannot read the token file {}", file.display())
        );
        let reason = std::error::Error::source(&gone).expect("the io error");
        assert!(reason.to_string().contains("No such file"), "{reason}");
        let missing = read(None, None, "publisher", FLAGS).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "give the publisher token with --token-file or --token"
        );
    }
}
