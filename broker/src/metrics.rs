//! `--metrics-listen`: a Prometheus text endpoint (`GET /metrics`) with what
//! an operator alerts on — clusters, connected agents and publishers,
//! credential expiry, when access ends, refresh outcomes, takeovers — and
//! never a secret.
//!
//! The exposition is `prometheus-client`'s (the Prometheus text format
//! 0.0.4): it writes the names, the `_total` of every counter and the
//! escaping of label values. Counters are counters (they only grow while a
//! cluster lives) and gauges are gauges.
//!
//! A scrape rebuilds nothing: the numbers are kept where the events happen
//! (the refresh planner counts each request and outcome, the hub each
//! takeover, refused hello and dropped cluster), and one [`Collector`]
//! reads them when scraped: the hub's cluster list, then per cluster its
//! state's `Arc` and a few figures copied under its lock
//! ([`Cluster::metrics`](crate::hub::Cluster::metrics)), never a whole
//! `ClusterStatus` with its agent list.
//!
//! **Who can reach it.** The endpoint has no authentication and names every
//! cluster and when its credentials expire, so it listens on loopback only
//! unless `--metrics-public` allows another address
//! ([`MetricsConfig::check`]). Its own accept loop holds at most
//! [`MAX_CONNECTIONS`] connections (beyond them a new one is closed at
//! once), gives each [`HEADER_TIMEOUT`] to send a request's headers and
//! [`MAX_CONNECTION_TIME`] in all: idle or slow clients can keep the
//! endpoint busy, but never take the descriptors the gRPC port needs.
//!
//! The endpoint stops with the broker: [`serve`] follows the hub's shutdown
//! signal, so once `RunningBroker::shutdown` has begun the listener is
//! closed and open connections end; [`MetricsServer::stopped`] waits for it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use credstream_proto::v1::{CredentialKind, RefreshReason};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
    MetricEncoder, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::hub::{ClusterHub, ClusterMetrics};

/// The `Content-Type` of `GET /metrics`: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = prometheus_text::CONTENT_TYPE;

fn reason_label(reason: RefreshReason) -> &'static str {
    match reason {
        RefreshReason::Expiring => "expiring",
        RefreshReason::AgentRequested => "agent_requested",
        RefreshReason::Missing => "missing",
        RefreshReason::Unspecified => "unspecified",
    }
}

/// Reads the hub on every scrape; see the module doc.
#[derive(Debug)]
struct HubCollector {
    hub: Arc<ClusterHub>,
}

/// Writes one family: its `# HELP`/`# TYPE` lines, then one sample per
/// label set. `name` is without `_total` (the encoder adds it to counters)
/// and without the unit (added from `unit`).
fn write_family<L: EncodeLabelSet, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, V)>,
    encode: impl Fn(V, MetricEncoder) -> fmt::Result,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, unit, metric_type)?;
    for (labels, value) in samples {
        encode(value, family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    write_family(
        encoder,
        name,
        help,
        unit,
        MetricType::Gauge,
        samples,
        |value, metric| ConstGauge::new(value).encode(metric),
    )
}

fn counters<L: EncodeLabelSet, V: EncodeCounterValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    write_family(
        encoder,
        name,
        help,
        None,
        MetricType::Counter,
        samples,
        |value, metric| ConstCounter::new(value).encode(metric),
    )
}

type ClusterLabel<'a> = [(&'static str, &'a str); 1];
type KindLabels<'a> = [(&'static str, &'a str); 2];

fn by_cluster(id: &str) -> ClusterLabel<'_> {
    [("cluster", id)]
}

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let clusters: Vec<(String, ClusterMetrics)> = self
            .hub
            .all()
            .iter()
            .map(|c| (c.id().to_owned(), c.metrics()))
            .collect();
        let now = tokio::time::Instant::now();

        // A family without labels: written directly, not through a family.
        let metric = encoder.encode_descriptor(
            "credstream_clusters",
            "Clusters the broker holds state for.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(clusters.len() as i64).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "credstream_clusters_dropped",
            "Clusters dropped after their idle grace period (no publisher, no agents, no live credential).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.hub.dropped()).encode(metric)?;
        let metric = encoder.encode_descriptor(
            "credstream_audit_records_dropped",
            "Audit records lost because the trail's output did not keep up or failed (--audit-log).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(crate::audit::dropped()).encode(metric)?;

        gauges(
            &mut encoder,
            "credstream_agents_connected",
            "Agents subscribed to the cluster.",
            None,
            clusters
                .iter()
                .map(|(id, m)| (by_cluster(id), m.agents as i64)),
        )?;
        let connected = |m: &ClusterMetrics| {
            m.state
                .info
                .as_ref()
                .is_some_and(|info| info.publisher_connected)
        };
        gauges(
            &mut encoder,
            "credstream_publisher_connected",
            "1 while a publisher stream is connected.",
            None,
            clusters
                .iter()
                .map(|(id, m)| (by_cluster(id), i64::from(connected(m)))),
        )?;
        gauges(
            &mut encoder,
            "credstream_publisher_responsive",
            "0 while the connected publisher has left a heartbeat unanswered (refresh requests are held).",
            None,
            clusters
                .iter()
                .filter(|(_, m)| connected(m))
                .map(|(id, m)| (by_cluster(id), i64::from(m.publisher_responsive))),
        )?;
        counters(
            &mut encoder,
            "credstream_takeovers",
            "Hellos that took the cluster from a connected publisher.",
            clusters.iter().map(|(id, m)| (by_cluster(id), m.takeovers)),
        )?;
        counters(
            &mut encoder,
            "credstream_takeovers_refused",
            "Hellos refused by the takeover hold-down.",
            clusters
                .iter()
                .map(|(id, m)| (by_cluster(id), m.takeovers_refused)),
        )?;
        gauges(
            &mut encoder,
            "credstream_refresh_stopped",
            "1 for a kind the broker stopped asking for after a permanent refresh error.",
            None,
            clusters.iter().flat_map(|(id, m)| {
                m.stopped.iter().map(move |kind| -> (KindLabels<'_>, i64) {
                    ([("cluster", id), ("kind", kind.label())], 1)
                })
            }),
        )?;
        gauges(
            &mut encoder,
            "credstream_cluster_version",
            "The cluster's latest version.",
            None,
            clusters
                .iter()
                .map(|(id, m)| (by_cluster(id), m.state.version)),
        )?;
        let live = |m: &ClusterMetrics| {
            let state = m.state.clone();
            CredentialKind::KNOWN
                .into_iter()
                .filter_map(move |kind| Some((kind, state.live(kind, now)?.clone())))
        };
        gauges(
            &mut encoder,
            "credstream_credential_expiry_timestamp",
            "When the held credential of a kind expires (Unix time).",
            Some(&Unit::Seconds),
            clusters.iter().flat_map(|(id, m)| {
                live(m).map(move |(kind, update)| -> (KindLabels<'_>, i64) {
                    let expires = update.expires_at.as_ref().map_or(0, |t| t.seconds);
                    ([("cluster", id), ("kind", kind.label())], expires)
                })
            }),
        )?;
        gauges(
            &mut encoder,
            "credstream_access_end_timestamp",
            "When workers lose a kind of access unless the user logs in again (Unix time), as the publisher reported it; absent while the publisher can keep minting.",
            Some(&Unit::Seconds),
            clusters.iter().flat_map(|(id, m)| {
                live(m).filter_map(move |(kind, update)| -> Option<(KindLabels<'_>, i64)> {
                    let at = update.access_end.as_ref()?.at.as_ref()?.seconds;
                    Some(([("cluster", id), ("kind", kind.label())], at))
                })
            }),
        )?;
        counters(
            &mut encoder,
            "credstream_refresh",
            "Refresh requests by reason and outcome.",
            clusters.iter().flat_map(|(id, m)| {
                m.refresh_counts.iter().map(move |c| {
                    (
                        [
                            ("cluster", id.as_str()),
                            ("reason", reason_label(c.reason())),
                            ("outcome", c.outcome.as_str()),
                        ],
                        c.count,
                    )
                })
            }),
        )?;
        Ok(())
    }
}

/// The registry `GET /metrics` encodes: one collector over `hub`.
pub fn registry(hub: Arc<ClusterHub>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubCollector { hub }));
    registry
}

/// Encodes `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String fails only if a collector does, and ours only
    // propagate the writer's errors.
    let _ = prometheus_text::encode(&mut out, registry);
    out
}

/// The running endpoint of [`serve`].
#[derive(Debug)]
pub struct MetricsServer {
    /// The bound address.
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Waits until the endpoint has stopped, which it does once the broker
    /// shuts down: the listener is closed at once, then open connections
    /// finish the response they are writing. Past `grace` the connections
    /// left are closed.
    pub async fn stopped(mut self, grace: Duration) {
        if tokio::time::timeout(grace, &mut self.task).await.is_err() {
            tracing::warn!("metrics connections did not finish in time; closing them");
            self.task.abort();
        }
    }
}

/// Connections the endpoint holds at most; more are closed at once. A
/// Prometheus server needs one; they come out of the descriptors kept
/// for what is not a gRPC connection
/// ([`RESERVED_FDS`](crate::connections::RESERVED_FDS)), so no number of
/// metrics connections can take a descriptor the gRPC port needs.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a connection has to send a request's headers (the first, and each
/// next one on a kept-alive connection) before it is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may stay open at all, whatever it does (a client that
/// stops reading its answer would otherwise hold its place for ever).
pub const MAX_CONNECTION_TIME: Duration = Duration::from_secs(60);
/// Refused connections are warned about at most this often.
const REFUSED_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Where and how the endpoint listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    /// The address (`--metrics-listen`).
    pub listen: SocketAddr,
    /// Allow an address that is not loopback (`--metrics-public`).
    pub public: bool,
    /// Connections held at most.
    pub max_connections: usize,
    /// Time allowed for a request's headers.
    pub header_timeout: Duration,
}

impl MetricsConfig {
    /// The defaults on `listen`, loopback only.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            public: false,
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
        }
    }

    /// Refuses a non-loopback address unless it was allowed: the endpoint
    /// answers anyone who can connect, without a token, with every
    /// cluster's name and when its credentials expire.
    pub fn check(&self) -> Result<(), MetricsError> {
        if self.public || self.listen.ip().is_loopback() {
            Ok(())
        } else {
            Err(MetricsError::NotLoopback(self.listen))
        }
    }
}

/// Why the metrics endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `--metrics-listen` names an address that is not loopback, without
    /// `--metrics-public`.
    #[error(
        "refusing to serve metrics on {0}: the endpoint answers anyone who can connect, without a token, with every cluster's name and when its credentials expire; listen on 127.0.0.1 (and scrape through a local agent or a tunnel), or pass --metrics-public to serve it on this address"
    )]
    NotLoopback(SocketAddr),
    /// The address cannot be bound.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Serves `GET /metrics` on `listen` (loopback only) with the default
/// limits; see [`serve_with`].
pub async fn serve(
    listen: SocketAddr,
    hub: Arc<ClusterHub>,
) -> Result<MetricsServer, MetricsError> {
    serve_with(MetricsConfig::new(listen), hub).await
}

/// Serves `GET /metrics` as `config` says until the broker behind `hub`
/// shuts down (its shutdown signal, set by `RunningBroker::shutdown`).
///
/// Its own accept loop holds at most `max_connections` connections and
/// closes any beyond at once; each must send its request's headers within
/// `header_timeout` and is closed after [`MAX_CONNECTION_TIME`] whatever
/// it does. Idle or slow connections so cost the endpoint a bounded number
/// of descriptors for a bounded time, and never the gRPC port.
pub async fn serve_with(
    config: MetricsConfig,
    hub: Arc<ClusterHub>,
) -> Result<MetricsServer, MetricsError> {
    config.check()?;
    let bind = |source| MetricsError::Bind {
        addr: config.listen,
        source,
    };
    let listener = TcpListener::bind(config.listen).await.map_err(bind)?;
    let local_addr = listener.local_addr().map_err(bind)?;
    let shutdown = hub.shutdown_signal();
    let registry = Arc::new(registry(hub));
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], render(&registry)).into_response() }
        }),
    );
    let task = tokio::spawn(accept_loop(listener, app, config, shutdown));
    tracing::info!(%local_addr, max_connections = config.max_connections, "metrics endpoint listening");
    Ok(MetricsServer { local_addr, task })
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    config: MetricsConfig,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut refused = 0u64;
    let mut last_warned: Option<std::time::Instant> = None;
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // An error means the hub is gone: stop as well.
            _ = shutdown.wait_for(|down| *down) => break,
        };
        // Reap finished connections as we go, so the set stays small.
        while connections.try_join_next().is_some() {}
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = Duration::from_millis(10);
                stream
            }
            Err(error) => {
                // Out of descriptors or memory, or a connection that died
                // before it was accepted: back off instead of spinning.
                tracing::debug!(%error, "metrics accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused += 1;
            if last_warned.is_none_or(|at| at.elapsed() >= REFUSED_WARN_INTERVAL) {
                last_warned = Some(std::time::Instant::now());
                tracing::warn!(
                    max_connections = config.max_connections,
                    refused,
                    "metrics connection cap reached: closing new metrics connections"
                );
            }
            drop(stream);
            continue;
        };
        let mut stop = stop.subscribe();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(config.header_timeout);
            let connection =
                builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let serve = async {
                tokio::pin!(connection);
                tokio::select! {
                    _ = &mut connection => {}
                    // Sent once, when the endpoint stops (or dropped).
                    _ = stop.changed() => {
                        // Finish the answer being written, then close.
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                    }
                }
            };
            let _ = tokio::time::timeout(MAX_CONNECTION_TIME, serve).await;
        });
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    tracing::info!("metrics endpoint stopped");
}
