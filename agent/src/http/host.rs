//! The first check on every request: it must be addressed to this machine's
//! loopback by name or literal, and must not come from a web page.
//!
//! A loopback port is reachable from every browser on the machine. A page
//! on `attacker.example` whose DNS name is rebound to `127.0.0.1` is
//! same-origin with the agent: it may read responses and set any header,
//! `Metadata-Flavor: Google` included. What it cannot change is the `Host`
//! header its requests carry (its own name). So every request must name a
//! loopback literal (`127.0.0.0/8`, `[::1]`) or `localhost`, with or
//! without a port, case-insensitively for names; the GCE metadata paths
//! (`/` and `/computeMetadata…`) also accept `metadata.google.internal` and
//! `metadata`, the names the Google libraries use when a host mapping sends
//! them here. The SDKs reach the agent through the URLs it hands out
//! (`127.0.0.1:PORT` in `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
//! `GCE_METADATA_HOST`), so they send `Host: 127.0.0.1:PORT`. A request with
//! no `Host`, several, or an absolute-form target naming another host is
//! refused the same way (403 `host_not_allowed`).
//!
//! Browsers add `Origin` to every cross-origin request (and to CORS
//! preflights); no SDK sends one. A request with `Origin` is refused (403
//! `cross_origin_request`), and nothing the agent answers ever carries an
//! `Access-Control-*` header, so a preflight always fails in the browser.

use std::net::{Ipv4Addr, Ipv6Addr};

use axum::extract::Request;
use axum::http::header::{HOST, ORIGIN};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::HttpError;

/// Refuses requests for a foreign host or from a web page; see the module
/// documentation.
pub(super) async fn guard(request: Request, next: Next) -> Response {
    match check(&request) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

fn check(request: &Request) -> Result<(), HttpError> {
    let path = request.uri().path();
    let metadata_path = path == "/" || path.starts_with("/computeMetadata");
    let mut hosts = request.headers().get_all(HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return Err(HttpError::HostNotAllowed);
    };
    let host = host.to_str().map_err(|_| HttpError::HostNotAllowed)?;
    if !allowed(host, metadata_path) {
        return Err(HttpError::HostNotAllowed);
    }
    if let Some(authority) = request.uri().authority()
        && !allowed(authority.as_str(), metadata_path)
    {
        return Err(HttpError::HostNotAllowed);
    }
    if request.headers().contains_key(ORIGIN) {
        return Err(HttpError::CrossOrigin);
    }
    Ok(())
}

/// Whether `authority` (`host` or `host:port`) names this machine's
/// loopback, or a metadata server name when `metadata_path`.
fn allowed(authority: &str, metadata_path: bool) -> bool {
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((v6, rest)) => {
                let Ok(ip) = v6.parse::<Ipv6Addr>() else {
                    return false;
                };
                if !(ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())) {
                    return false;
                }
                match rest {
                    "" => return true,
                    rest => match rest.strip_prefix(':') {
                        Some(port) => return valid_port(port),
                        None => return false,
                    },
                }
            }
            None => return false,
        },
        None => match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|port| !valid_port(port)) {
        return false;
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return ip.is_loopback();
    }
    host.eq_ignore_ascii_case("localhost")
        || (metadata_path
            && (host.eq_ignore_ascii_case("metadata.google.internal")
                || host.eq_ignore_ascii_case("metadata")))
}

fn valid_port(port: &str) -> bool {
    !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::allowed;

    #[test]
    fn loopback_literals_and_localhost_are_allowed_everywhere() {
        for host in [
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.255.0.9:1",
            "localhost",
            "LOCALHOST:65535",
            "[::1]",
            "[::1]:80",
            "[0:0:0:0:0:0:0:1]:80",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(allowed(host, false), "{host}");
            assert!(allowed(host, true), "{host}");
        }
    }

    #[test]
    fn metadata_names_only_on_metadata_paths() {
        for host in ["metadata.google.internal", "metadata:80", "METADATA"] {
            assert!(allowed(host, true), "{host}");
            assert!(!allowed(host, false), "{host}");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        for host in [
            "",
            "attacker.example",
            "attacker.example:80",
            "127.0.0.1.attacker.example",
            "localhost.attacker.example",
            "localhost.",
            "127.1",
            "2130706433",
            "0.0.0.0",
            "10.0.0.1",
            "169.254.169.254",
            "[::2]",
            "[::1",
            "[::1]x",
            "::1",
            "127.0.0.1:",
            "127.0.0.1:99999",
            "127.0.0.1:80:80",
            "127.0.0.1:+80",
            "user@127.0.0.1",
        ] {
            assert!(!allowed(host, true), "{host:?}");
        }
    }
}
