//! What the agent does to its own process so that the processes it serves
//! (the `exec` child, and anything else running as the same user) cannot
//! take its broker token, and so that it has the descriptors it needs.
//!
//! - [`forbid_inspection`] marks the process non-dumpable
//!   (`prctl(PR_SET_DUMPABLE, 0)`): `/proc/PID/environ`, `/proc/PID/mem`,
//!   `/proc/PID/maps`, `/proc/PID/fd/*` and `ptrace` are then refused to
//!   every process without `CAP_SYS_PTRACE`, same user included, and no core
//!   dump is written. It does *not* hide `/proc/PID/cmdline`, which every
//!   local user can read, and `execve` resets it, so the agent calls it
//!   first thing after every start.
//! - [`hand_over`] takes the token out of the arguments and the environment:
//!   the agent re-executes itself (same pid, same binary) with
//!   `--token` / `--token-file` and `CREDSTREAM_TOKEN` / `CREDSTREAM_TOKEN_FILE`
//!   removed and the token in an anonymous memory file whose descriptor it
//!   names with `--token-fd N`. [`read_token_fd`] reads that descriptor and
//!   closes it, so nothing in the running agent's `cmdline`, `environ` or
//!   open descriptors leads to the token.
//! - [`raise_fd_limit`] raises the soft `RLIMIT_NOFILE` to the hard limit
//!   (systemd's default soft limit is 1,024), so that connections held open
//!   by local processes do not run the listener out of descriptors.
//!
//! What stays possible: a child running as root (or with `CAP_SYS_PTRACE`)
//! can read any process's memory, this one's included; run the command as
//! another user when that matters. A `--token` argument is visible to every
//! local user (`ps`) for the moment before the re-exec, and stays in shell
//! history: prefer `--token-file` or `--token-fd`. A token file stays
//! readable by its owner: once the agent runs, nothing points the child at
//! it, but a child of the same user that knows or guesses the path can read
//! it (a descriptor, `--token-fd 3 3<file` from a file the user then
//! removes, leaves nothing behind).

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;

use rustix::fs::MemfdFlags;
use rustix::io::FdFlags;
use rustix::process::{DumpableBehavior, Resource, Rlimit};
use zeroize::Zeroizing;

/// The variables that may carry the token or lead to it; removed from the
/// environment of the re-executed agent.
pub const TOKEN_VARIABLES: &[&str] = &[
    "CREDSTREAM_TOKEN",
    "CREDSTREAM_TOKEN_FILE",
    "CREDSTREAM_JOIN",
    "CREDSTREAM_JOIN_FILE",
];

/// The largest token read from a descriptor. Broker tokens are a few
/// hundred bytes.
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;

/// Marks this process non-dumpable; see the module documentation.
pub fn forbid_inspection() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and returns the soft
/// limit in force afterwards (`None`: unlimited or unknown).
pub fn raise_fd_limit() -> Option<u64> {
    let limit = rustix::process::getrlimit(Resource::Nofile);
    if let (Some(current), Some(maximum)) = (limit.current, limit.maximum)
        && current < maximum
    {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        if rustix::process::setrlimit(Resource::Nofile, raised).is_ok() {
            return Some(maximum);
        }
    }
    limit.current
}

/// The agent's arguments (after the program name) without the ones that
/// carry the token or its file, and whether the token itself was one of
/// them (`--token VALUE` or `--token=VALUE`). Everything from the first
/// `--` on (the `exec` command) is kept as it is.
pub fn without_token_arguments(args: &[OsString]) -> (Vec<OsString>, bool) {
    let mut kept = Vec::with_capacity(args.len());
    let mut token_given = false;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let bytes = arg.as_encoded_bytes();
        if bytes == b"--" {
            kept.push(arg.clone());
            kept.extend(iter.cloned());
            break;
        }
        if bytes == b"--token" {
            token_given = true;
            iter.next();
        } else if bytes.starts_with(b"--token=") {
            token_given = true;
        } else if bytes == b"--token-file" || bytes == b"--join-file" {
            iter.next();
        } else if !bytes.starts_with(b"--token-file=") && !bytes.starts_with(b"--join-file=") {
            kept.push(arg.clone());
        }
    }
    (kept, token_given)
}

/// Re-executes this binary with the token in a descriptor instead of the
/// arguments and environment (see the module documentation). `args` are
/// the process's arguments, program name first, then the subcommand.
/// Returns only if that fails, with the reason; the caller can go on with
/// the token it read.
pub fn hand_over(token: &str, args: &[OsString]) -> io::Error {
    match try_hand_over("--token-fd", token, args) {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

/// [`hand_over`] for a join string (from `--join-file` or
/// `CREDSTREAM_JOIN`): the whole string, address and pins with the token,
/// goes into the descriptor, named with `--join-fd N`.
pub fn hand_over_join(join: &str, args: &[OsString]) -> io::Error {
    match try_hand_over("--join-fd", join, args) {
        Ok(never) => match never {},
        Err(error) => error,
    }
}

fn try_hand_over(
    flag: &str,
    token: &str,
    args: &[OsString],
) -> io::Result<std::convert::Infallible> {
    let (Some(program), Some(subcommand)) = (args.first(), args.get(1)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no subcommand to re-execute",
        ));
    };
    let (rest, _) = without_token_arguments(&args[2..]);
    // An anonymous file: never on disk, gone once the last descriptor
    // closes (the re-executed agent closes it after reading).
    let memory = rustix::fs::memfd_create("credstream-agent-token", MemfdFlags::CLOEXEC)?;
    let mut file = File::from(memory);
    file.write_all(token.as_bytes())?;
    file.rewind()?;
    // The one descriptor that survives the exec.
    rustix::io::fcntl_setfd(&file, FdFlags::empty())?;
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg0(program)
        .arg(subcommand)
        .arg(flag)
        .arg(file.as_raw_fd().to_string())
        .args(rest);
    for name in TOKEN_VARIABLES {
        command.env_remove(name);
    }
    let error = command.exec();
    drop(file);
    Err(error)
}

/// Reads the token from descriptor `fd` (at most [`MAX_TOKEN_BYTES`],
/// surrounding whitespace trimmed) and closes it. Call once, at start,
/// before anything else in the process opens a file: `fd` must be a
/// descriptor this process inherited (from [`hand_over`] or from whoever
/// passed `--token-fd`). 0, 1 and 2 are refused: they are stdio.
pub fn read_token_fd(fd: RawFd) -> io::Result<Zeroizing<String>> {
    let mut file = File::from(inherited::adopt(fd)?);
    let mut token = Zeroizing::new(String::new());
    (&mut file)
        .take(MAX_TOKEN_BYTES + 1)
        .read_to_string(&mut token)?;
    if token.len() as u64 > MAX_TOKEN_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_TOKEN_BYTES} bytes"),
        ));
    }
    drop(file);
    let trimmed = token.trim();
    if trimmed.len() == token.len() {
        Ok(token)
    } else {
        Ok(Zeroizing::new(trimmed.to_owned()))
    }
}

/// Taking ownership of an inherited descriptor by number: the one place in
/// the agent that needs `unsafe`. No safe API can exist for it (I/O safety
/// makes every `RawFd` → `OwnedFd` conversion the caller's promise), and
/// the token's descriptor must be closed, not only read, or the `exec`
/// child would inherit it.
mod inherited {
    #![allow(unsafe_code)]

    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};

    /// `fd` as an owned descriptor, if it is open and not stdio.
    pub(super) fn adopt(fd: RawFd) -> io::Result<OwnedFd> {
        if fd <= 2 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "descriptors 0, 1 and 2 are stdin, stdout and stderr",
            ));
        }
        // `stat` opens nothing, so it cannot itself take the number.
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .or_else(|_| std::fs::metadata(format!("/dev/fd/{fd}")))
            .map_err(|_| io::Error::new(io::ErrorKind::NotFound, "descriptor not open"))?;
        // SAFETY: `fd` is open (checked just above) and above stdio. It was
        // inherited across exec: `read_token_fd` runs once, at start, before
        // the agent opens any file, so no object in this process owns the
        // number or will close it. The returned `OwnedFd` becomes its only
        // owner and closes it exactly once.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn token_arguments_are_removed_before_the_command_only() {
        let (kept, given) = without_token_arguments(&args(&[
            "--broker",
            "http://127.0.0.1:1",
            "--token",
            "secret-1",
            "--token=secret-2",
            "--token-file",
            "/path/one",
            "--token-file=/path/two",
            "--join-file",
            "/path/three",
            "--join-file=/path/four",
            "--agent-id",
            "w1",
            "--",
            "sh",
            "--token",
            "user-arg",
        ]));
        assert!(given);
        assert_eq!(
            kept,
            args(&[
                "--broker",
                "http://127.0.0.1:1",
                "--agent-id",
                "w1",
                "--",
                "sh",
                "--token",
                "user-arg"
            ])
        );
        let (kept, given) =
            without_token_arguments(&args(&["--token-file", "/p", "--listen", "x"]));
        assert!(!given);
        assert_eq!(kept, args(&["--listen", "x"]));
    }

    #[test]
    fn stdio_and_closed_descriptors_are_refused() {
        for fd in [0, 1, 2] {
            assert_eq!(
                read_token_fd(fd).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
        assert_eq!(
            read_token_fd(987_654).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn raising_the_fd_limit_never_lowers_it() {
        let before = rustix::process::getrlimit(Resource::Nofile).current;
        let after = raise_fd_limit();
        assert!(after >= before, "{before:?} -> {after:?}");
    }
}
