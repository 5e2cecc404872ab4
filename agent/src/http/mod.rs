//! The agent's one loopback HTTP listener: every local surface that user
//! processes reach without knowing about credstream.
//!
//! | path | module | guard |
//! |------|--------|-------|
//! | `GET /aws/credentials` | [`aws`] | `Authorization: <token>` |
//! | `GET /` and `/computeMetadata/v1/…` | [`gce`] | `Metadata-Flavor: Google`, no `X-Forwarded-For` |
//! | `GET /env` | `env` | `Authorization: <token>` |
//! | `GET /readyz` | `ready` | none (no secret in it) |
//!
//! Before any of them, [`host`] refuses (403) a request whose `Host` is not
//! this machine's loopback (`127.0.0.0/8`, `[::1]`, `localhost`; on the
//! metadata paths also `metadata.google.internal` and `metadata`) or that
//! carries `Origin`, so that a web page rebound to `127.0.0.1` gets nothing.
//! Everything else is 404; methods other than GET/HEAD are 405; every error
//! is JSON `{"code", "message"}` (see [`HttpError`]).
//!
//! The listener binds loopback only ([`LocalServer::bind`] refuses anything
//! else): the AWS SDKs accept plain http only to loopback, and nothing off
//! the machine should ever reach these secrets. Input is bounded by the
//! HTTP/1 parser (header block at most [`MAX_HEADER_BYTES`], at most
//! [`MAX_HEADERS`] headers, [`HEADER_READ_TIMEOUT`] to send them) and by
//! [`MAX_CONNECTIONS`] concurrent connections, past which the least recently
//! active idle connection is closed to make room; no handler reads a body.

pub mod advertised;
pub mod aws;
mod child_env;
mod env;
mod error;
pub mod gce;
pub mod host;
mod ready;
mod slots;
mod token;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::middleware::from_fn;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};

pub use child_env::{ChildEnv, LocalEndpoints};
pub use error::HttpError;
pub use token::{AuthToken, TokenFile};

use crate::store::CredentialStore;

/// The path of the AWS container credential endpoint.
pub const AWS_CREDENTIALS_PATH: &str = "/aws/credentials";
/// The path of the private env as JSON.
pub const ENV_PATH: &str = "/env";
/// The readiness path.
pub const READY_PATH: &str = "/readyz";

/// The largest request head (request line and headers) accepted. Requests
/// over it are answered 431 by hyper. hyper's minimum is 8 KiB; 16 KiB is
/// ample for the few short headers these clients send.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// The most headers one request may carry.
pub const MAX_HEADERS: usize = 64;
/// How long a client has to send a request head (after connecting, or
/// after the previous response on a kept-alive connection) before the
/// connection is closed. The SDKs send theirs at once, and boto3 gives up on
/// the whole request after 2 s anyway.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections kept open at once. Past it, a new connection closes the
/// least recently active idle one (see [`LocalServer::serve`]), so holding
/// connections open never blocks another client.
pub const MAX_CONNECTIONS: usize = 512;
/// The kernel's queue of connections not yet accepted (the standard
/// library's 128 filled up when the accept loop waited for a slot).
pub const LISTEN_BACKLOG: u32 = 1024;
/// How long open connections get to finish after shutdown is signalled.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors starting or running the listener.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `--listen` names an address that is not loopback. Use `127.0.0.1:PORT`
    /// or `[::1]:PORT`: the secrets served here must not leave the machine.
    #[error(
        "refusing to listen on {addr}: the agent serves credentials on loopback only (use 127.0.0.1:PORT)"
    )]
    NotLoopback {
        /// The address given.
        addr: SocketAddr,
    },
    /// The address could not be bound (in use, or no permission).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address given.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
}

/// What the handlers share.
#[derive(Clone)]
struct AppState {
    store: CredentialStore,
    token: AuthToken,
}

/// The routes, with `gce_metadata` deciding whether the metadata emulation
/// is mounted (off: `/` and `/computeMetadata/…` are plain 404s, so a real
/// GCE worker's libraries are never pointed here by mistake).
pub fn router(store: CredentialStore, token: AuthToken, gce_metadata: bool) -> Router {
    let state = AppState { store, token };
    let mut router = Router::new()
        .route(AWS_CREDENTIALS_PATH, get(aws::credentials))
        .route(ENV_PATH, get(env::private_env))
        .route(READY_PATH, get(ready::readyz));
    if gce_metadata {
        let metadata = Router::new()
            .route("/", get(gce::ping))
            .route("/computeMetadata", get(gce::metadata))
            .route("/computeMetadata/", get(gce::metadata))
            .route("/computeMetadata/{*path}", get(gce::metadata))
            .layer(from_fn(gce::guard));
        router = router.merge(metadata);
    }
    router
        .fallback(|| async { HttpError::NotFound })
        .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed })
        .layer(from_fn(host::guard))
        .with_state(state)
}

/// A bound loopback listener and its routes, ready to serve.
pub struct LocalServer {
    listener: TcpListener,
    router: Router,
    max_connections: usize,
}

impl LocalServer {
    /// Binds `addr` (port 0 picks a free port) after checking it is loopback.
    pub async fn bind(addr: SocketAddr, router: Router) -> Result<Self, ServeError> {
        if !addr.ip().is_loopback() {
            return Err(ServeError::NotLoopback { addr });
        }
        let bind = || -> io::Result<TcpListener> {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        };
        let listener = bind().map_err(|source| ServeError::Bind { addr, source })?;
        Ok(Self {
            listener,
            router,
            max_connections: MAX_CONNECTIONS,
        })
    }

    /// Sets how many connections are kept open at once (at least 1; the
    /// default is [`MAX_CONNECTIONS`]), for a process with few descriptors.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max.max(1);
        self
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound TCP listener has an address")
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives open
    /// connections [`DRAIN_TIMEOUT`] to finish.
    ///
    /// Accepting never waits for a free slot: a connection past the limit
    /// closes the least recently active *idle* one (no request in
    /// progress: never sent a complete request head, or waiting for its
    /// next one), so local processes holding connections open cannot keep
    /// a legitimate client out. When every open connection is in the middle
    /// of a request, the new one is closed instead. Running out of file
    /// descriptors also closes the least recently active idle connection.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Self {
            listener,
            router,
            max_connections,
        } = self;
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEADER_BYTES)
            .max_headers(MAX_HEADERS);
        let slots = Arc::new(slots::Slots::new(max_connections));
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) if matches!(error.raw_os_error(), Some(23 | 24)) => {
                        // EMFILE/ENFILE: make room and try again soon,
                        // instead of spinning on the error.
                        tracing::warn!(%error, "out of file descriptors for local connections");
                        slots.evict_one();
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "cannot accept a local connection");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = slots.admit() else {
                tracing::debug!("every local connection is busy: closing a new one");
                drop(stream);
                continue;
            };
            let service = slots::Tracked::new(router.clone(), slot.clone(), slots.clone());
            let connection =
                graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
            let slots = slots.clone();
            tokio::spawn(async move {
                tokio::select! {
                    ended = connection => if let Err(error) = ended {
                        tracing::debug!(%error, "local connection ended with an error");
                    },
                    () = slot.evicted() => {
                        tracing::debug!("closed an idle local connection to make room");
                    }
                }
                slots.release(&slot);
            });
        }
        drop(listener);
        if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("local connections still open after the drain timeout");
        }
    }
}
