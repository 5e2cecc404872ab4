//! The broker's gRPC server: the tonic services, health, reflection, the
//! tower layers and shutdown, served by [`serving`](crate::serving) over the
//! connections [`connections`](crate::connections) admits (with TLS from
//! [`tls`](crate::tls)).
//!
//! [`start`] binds (port 0 works), spawns the server and returns a
//! [`RunningBroker`]; `main.rs` and the tests both use it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use credstream_proto::FILE_DESCRIPTOR_SET;
use credstream_proto::v1::admin_service_server::AdminServiceServer;
use credstream_proto::v1::publisher_service_server::PublisherServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::Routes;
use tower::ServiceBuilder;

use crate::auth::{Authenticator, TokenKey};
use crate::connections::{self, AdmissionCounts, ConnectionLimits};
use crate::gate::GateLayer;
use crate::hub::{ClusterHub, HubConfig};
use crate::limits::MAX_MESSAGE_BYTES;
use crate::rate_limit::{CallRate, ConnectionCalls, TokenRateLimiter};
use crate::refresh::RefreshConfig;
use crate::service::admin::AdminServer;
use crate::service::agent::{AgentServer, AgentServiceServer};
use crate::service::publisher::PublisherServer;
use crate::serving;

/// TLS files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate it
    /// signed (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

/// Everything the broker needs to run.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The token signing key.
    pub token_key: TokenKey,
    /// TLS, or plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// Allow plaintext on a non-loopback address.
    pub insecure: bool,
    /// Refresh planning.
    pub refresh: RefreshConfig,
    /// How often one agent may hint per kind.
    pub hint_interval: Duration,
    /// How long shutdown waits for connections to drain.
    pub drain_timeout: Duration,
    /// New calls per token.
    pub call_rate: CallRate,
    /// The connection cap, handshake deadline and calls per connection.
    pub connections: ConnectionLimits,
}

impl BrokerConfig {
    /// Defaults for a broker on `listen` with `token_key`.
    pub fn new(listen: SocketAddr, token_key: TokenKey) -> Self {
        Self {
            listen,
            token_key,
            tls: None,
            insecure: false,
            refresh: RefreshConfig::default(),
            hint_interval: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            call_rate: CallRate::default(),
            connections: ConnectionLimits::default(),
        }
    }

    /// Plaintext on 127.0.0.1, a free port: what tests use.
    pub fn for_tests(token_key: TokenKey) -> Self {
        Self::new(SocketAddr::from(([127, 0, 0, 1], 0)), token_key)
    }
}

/// A broker serving in the background.
#[derive(Debug)]
pub struct RunningBroker {
    /// The bound address.
    pub local_addr: SocketAddr,
    /// The hub, for in-process inspection by tests.
    pub hub: Arc<ClusterHub>,
    tls: bool,
    health: tonic_health::server::HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    accept_loop: JoinHandle<()>,
    /// What the accept loop refused, evicted and timed out.
    pub admissions: Arc<AdmissionCounts>,
    drain_timeout: Duration,
}

impl RunningBroker {
    /// The URL clients use (`http://` or `https://`).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.local_addr)
    }

    /// Stops accepting connections (the listener closes), health
    /// NOT_SERVING, new streams refused with UNAVAILABLE and no snapshot,
    /// every connection sent a GOAWAY and every stream ended with
    /// UNAVAILABLE, then the server stops; waits at most the drain timeout.
    pub async fn shutdown(mut self) {
        self.accept_loop.abort();
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        for service in SERVICES {
            self.health
                .set_service_status(service, tonic_health::ServingStatus::NotServing)
                .await;
        }
        // GOAWAY first, so that agents do not open new streams on
        // connections whose streams are about to end; the hub's flag then
        // refuses any that still arrive.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.hub.shut_down();
        match tokio::time::timeout(self.drain_timeout, &mut self.task).await {
            Ok(Ok(())) => tracing::info!("broker stopped"),
            Ok(Err(error)) => tracing::warn!(%error, "server task failed"),
            Err(_) => {
                tracing::warn!("connections did not drain in time; closing them");
                self.task.abort();
            }
        }
    }

    /// Waits until the server task ends: on shutdown, or with an error if
    /// the task panicked.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.task).await.context("server task")
    }
}

const SERVICES: [&str; 3] = [
    "credstream.v1.PublisherService",
    "credstream.v1.AgentService",
    "credstream.v1.AdminService",
];

/// Rings every cluster's bell after each reload of the token keys, so that
/// each agent stream looks at its token (a removed key ends it, a promoted
/// one renews it) without a task of its own; publisher streams watch the
/// keys themselves. Ends with the broker's shutdown.
async fn wake_streams_on_key_reload(
    mut reloads: tokio::sync::watch::Receiver<u64>,
    hub: Arc<ClusterHub>,
) {
    let mut shutdown = hub.shutdown_signal();
    loop {
        tokio::select! {
            changed = reloads.changed() => {
                if changed.is_err() {
                    return;
                }
                hub.wake_agent_streams();
            }
            _ = shutdown.wait_for(|down| *down) => return,
        }
    }
}

/// Binds and starts the broker.
pub async fn start(config: BrokerConfig) -> anyhow::Result<RunningBroker> {
    if config.tls.is_none() && !config.insecure && !config.listen.ip().is_loopback() {
        bail!(
            "refusing to serve plaintext on {}: bearer tokens would cross the network in clear text; \
             give --tls-cert and --tls-key, listen on 127.0.0.1, or pass --insecure (behind a TLS-terminating proxy only)",
            config.listen
        );
    }
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr()?;

    let hub = ClusterHub::new(HubConfig {
        refresh: config.refresh.clone(),
    });
    tokio::spawn(wake_streams_on_key_reload(
        config.token_key.changes(),
        hub.clone(),
    ));
    let (health, health_service) = tonic_health::server::health_reporter();
    for service in SERVICES {
        health
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
    }
    // Each reflection service also describes the other, so that a client of
    // either version lists both.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection_v1 = reflection().build_v1().context("reflection v1")?;
    let reflection_v1alpha = reflection().build_v1alpha().context("reflection v1alpha")?;

    let tls = config.tls.is_some();
    let acceptor = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;

    let routes = Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PublisherServiceServer::new(PublisherServer::new(
                hub.clone(),
                config.token_key.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AgentServiceServer::new(AgentServer::new(
                hub.clone(),
                config.hint_interval,
                config.token_key.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            AdminServiceServer::new(AdminServer::new(hub.clone(), config.token_key.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        )
        .prepare();
    let limiter = Arc::new(TokenRateLimiter::new(
        config.call_rate,
        config.connections.call_rate,
    ));
    let service = ServiceBuilder::new()
        // Layers added first run first: the connection's call limit, which
        // so counts refused calls too; authentication; then the token's,
        // which so counts verified tokens only.
        .layer(GateLayer::new(ConnectionCalls(limiter.clone())))
        .layer(GateLayer::new(Authenticator::new(config.token_key.clone())))
        .layer(GateLayer::new(limiter))
        .service(routes);

    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = connections::incoming(listener, acceptor, config.connections);
    let task = tokio::spawn(serving::serve(service, incoming.connections, async {
        let _ = stopped.await;
    }));
    tracing::info!(
        %local_addr,
        tls,
        max_connections = config.connections.max_connections,
        handshake_timeout = ?config.connections.handshake_timeout,
        "broker listening"
    );
    Ok(RunningBroker {
        local_addr,
        hub,
        tls,
        health,
        stop: Some(stop),
        task,
        accept_loop: incoming.accept_loop,
        admissions: incoming.counts,
        drain_timeout: config.drain_timeout,
    })
}
