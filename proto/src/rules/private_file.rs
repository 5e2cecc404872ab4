//! A file that holds a secret (a seal key) is used only if no other user
//! can read or change it: its mode must grant nothing to group or others
//! (`0600` or `0400`). Another user who could read it would hold the key;
//! one who could write it could swap in their own.
//!
//! The rule looks at the file that is actually read: links are followed
//! (a symbolic link to a world-readable file is refused like the file, and
//! `/dev/fd/N`, a pipe the Python plugin hands the agent, passes: a pipe is
//! `0600`), and the mode comes from the open descriptor, so a file swapped
//! between a check and the read cannot slip through. The error names the
//! file and the fix.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

/// Mode bits that must be clear: any access for group or others.
pub const OTHERS: u32 = 0o077;

/// Bytes read at most: a key line is 80; anything far longer is not one.
const MAX_LEN: u64 = 64 * 1024;

/// Why a private file was not read.
#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    /// It does not exist or cannot be opened or read (the reason is the
    /// source): check the path and that this user may read it.
    #[error("cannot read the {what} {}", path.display())]
    Unreadable {
        /// What the file is ("seal key file").
        what: &'static str,
        /// The file as given.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Group or others may access it: `chmod 600` it (the message says
    /// which file, and the file a link points to).
    #[error(
        "the {what} {}{} is accessible to other users (mode {mode:03o}); run `chmod 600 {}` and keep it readable by its owner only",
        path.display(),
        linked.as_ref().map(|t| format!(" (a link to {})", t.display())).unwrap_or_default(),
        linked.as_deref().unwrap_or(path).display()
    )]
    Exposed {
        /// What the file is ("seal key file").
        what: &'static str,
        /// The file as given.
        path: PathBuf,
        /// The file a link resolved to, when `path` is a link.
        linked: Option<PathBuf>,
        /// Its permission bits.
        mode: u32,
    },
}

/// The text of `path` (describing it as `what` in errors), if only its
/// owner may access the file; see the module documentation.
pub fn read(path: &Path, what: &'static str) -> Result<Zeroizing<String>, PrivateFileError> {
    let unreadable = |source| PrivateFileError::Unreadable {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let mode = file.metadata().map_err(unreadable)?.permissions().mode() & 0o777;
    if mode & OTHERS != 0 {
        let linked = std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.file_type().is_symlink())
            .then(|| std::fs::canonicalize(path).ok())
            .flatten();
        return Err(PrivateFileError::Exposed {
            what,
            path: path.to_owned(),
            linked,
            mode,
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_LEN)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, "secret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn only_a_file_its_owner_alone_may_access_is_read() {
        let dir = std::env::temp_dir().join(format!("credstream-private-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for mode in [0o600, 0o400] {
            let path = file(&dir, &format!("ok-{mode:o}"), mode);
            assert_eq!(read(&path, "key file").unwrap().as_str(), "secret\n");
        }
        for mode in [0o644, 0o640, 0o604, 0o620, 0o601] {
            let path = file(&dir, &format!("open-{mode:o}"), mode);
            let error = read(&path, "key file").unwrap_err();
            assert_eq!(
                error.to_string(),
                format!(
                    "the key file {p} is accessible to other users (mode {mode:03o}); run `chmod 600 {p}` and keep it readable by its owner only",
                    p = path.display()
                )
            );
        }

        // A link is judged by what it points to, and the fix names that.
        let target = file(&dir, "target", 0o644);
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let error = read(&link, "key file").unwrap_err().to_string();
        let target = std::fs::canonicalize(&target).unwrap();
        assert!(
            error.contains(&format!("(a link to {})", target.display()))
                && error.contains(&format!("run `chmod 600 {}`", target.display())),
            "{error}"
        );
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read(&link, "key file").unwrap().as_str(), "secret\n");

        std::fs::remove_dir_all(&dir).unwrap();
        let gone = read(&link, "key file").unwrap_err();
        assert!(
            matches!(gone, PrivateFileError::Unreadable { .. }),
            "{gone}"
        );
    }
}
