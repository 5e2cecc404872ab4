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
//! The endpoint stops with the broker: [`serve`] follows the hub's shutdown
//! signal, so once `RunningBroker::shutdown` has begun the listener is
//! closed and open connections end; [`MetricsServer::stopped`] waits for it.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
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

/// Serves `GET /metrics` on `listen` until the broker behind `hub` shuts
/// down (its shutdown signal, set by `RunningBroker::shutdown`).
pub async fn serve(listen: SocketAddr, hub: Arc<ClusterHub>) -> anyhow::Result<MetricsServer> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for metrics"))?;
    let local_addr = listener.local_addr()?;
    let mut shutdown = hub.shutdown_signal();
    let registry = Arc::new(registry(hub));
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move { ([(CONTENT_TYPE, CONTENT_TYPE_TEXT)], render(&registry)).into_response() }
        }),
    );
    let task = tokio::spawn(async move {
        let stop = async move {
            // An error means the hub is gone: stop as well.
            let _ = shutdown.wait_for(|down| *down).await;
        };
        match axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            Ok(()) => tracing::info!("metrics endpoint stopped"),
            Err(error) => tracing::warn!(%error, "metrics endpoint failed"),
        }
    });
    tracing::info!(%local_addr, "metrics endpoint listening");
    Ok(MetricsServer { local_addr, task })
}
