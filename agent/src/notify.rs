//! Telling a service manager that the agent is ready: systemd's
//! `sd_notify(3)` protocol, `READY=1` in one datagram to the Unix socket
//! named by `$NOTIFY_SOCKET`.
//!
//! Under `Type=notify` a unit ordered after the agent's starts only once the
//! agent sends it, so the workload unit (`deploy/systemd/`) is started when
//! the agent holds every declared credential and has written the env file
//! that unit reads, not when the agent's process merely exists. The
//! protocol is one `sendto`, so no crate is needed: a path names a socket
//! in the file system, a leading `@` an abstract one. Without
//! `$NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends `READY=1` to `$NOTIFY_SOCKET`. `Ok(false)`: the variable is unset
/// (no service manager listens), nothing was sent.
pub fn ready() -> io::Result<bool> {
    match std::env::var_os(NOTIFY_SOCKET) {
        Some(socket) if !socket.is_empty() => send(&socket, "READY=1\n").map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the socket named
/// `socket`, as `sd_notify` does.
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let address = match socket.as_bytes() {
        [b'@', name @ ..] => abstract_address(name)?,
        [b'/', ..] => SocketAddr::from_pathname(socket)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "$NOTIFY_SOCKET is neither an absolute path nor an abstract name (@...)",
            ));
        }
    };
    let sender = UnixDatagram::unbound()?;
    let sent = sender.send_to_addr(state.as_bytes(), &address)?;
    if sent == state.len() {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "the notification was cut short",
        ))
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_address(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_address(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract Unix sockets exist on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1\n").unwrap();
        let mut buffer = [0u8; 64];
        let n = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1\n");

        let name = format!("credstream-notify-test-{}", std::process::id());
        let address = abstract_address(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&address).unwrap();
        send(OsStr::new(&format!("@{name}")), "READY=1\n").unwrap();
        let n = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1\n");

        let error = send(OsStr::new("relative/path"), "READY=1\n").unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
    }
}
