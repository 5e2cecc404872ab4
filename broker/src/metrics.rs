//! `--metrics-listen`: a Prometheus text endpoint (`GET /metrics`) with what
//! an operator alerts on — clusters, connected agents and publishers,
//! credential expiry, when access ends, refresh outcomes — built from the same secret-free
//! `ClusterStatus` that `AdminService.GetCluster` returns.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use credstream_proto::v1::RefreshReason;
use tokio::net::TcpListener;

use crate::hub::ClusterHub;

fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = String>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for sample in samples {
        let _ = writeln!(out, "{name}{sample}");
    }
}

fn reason_label(reason: RefreshReason) -> &'static str {
    match reason {
        RefreshReason::Expiring => "expiring",
        RefreshReason::AgentRequested => "agent_requested",
        RefreshReason::Missing => "missing",
        RefreshReason::Unspecified => "unspecified",
    }
}

/// Renders every cluster's metrics in the Prometheus text format.
pub fn render(hub: &ClusterHub) -> String {
    let statuses: Vec<_> = hub.all().iter().map(|c| c.status()).collect();
    let mut out = String::new();
    family(
        &mut out,
        "credstream_clusters",
        "gauge",
        "Clusters the broker holds state for.",
        [format!(" {}", statuses.len())],
    );
    family(
        &mut out,
        "credstream_clusters_dropped_total",
        "counter",
        "Clusters dropped after their idle grace period (no publisher, no agents, no live credential).",
        [format!(" {}", hub.dropped())],
    );
    family(
        &mut out,
        "credstream_agents_connected",
        "gauge",
        "Agents subscribed to the cluster.",
        statuses
            .iter()
            .map(|s| format!("{{cluster=\"{}\"}} {}", s.cluster_id, s.agents.len())),
    );
    family(
        &mut out,
        "credstream_publisher_connected",
        "gauge",
        "1 while a publisher stream is connected.",
        statuses.iter().map(|s| {
            let connected = s.info.as_ref().is_some_and(|i| i.publisher_connected);
            format!("{{cluster=\"{}\"}} {}", s.cluster_id, u8::from(connected))
        }),
    );
    family(
        &mut out,
        "credstream_publisher_responsive",
        "gauge",
        "0 while the connected publisher has left a heartbeat unanswered (refresh requests are held).",
        statuses
            .iter()
            .filter(|s| s.info.as_ref().is_some_and(|i| i.publisher_connected))
            .map(|s| {
                format!(
                    "{{cluster=\"{}\"}} {}",
                    s.cluster_id,
                    u8::from(s.publisher_responsive)
                )
            }),
    );
    family(
        &mut out,
        "credstream_takeovers_total",
        "counter",
        "Hellos that took the cluster from a connected publisher.",
        statuses.iter().map(|s| {
            let count = s.takeovers.as_ref().map_or(0, |t| t.count);
            format!("{{cluster=\"{}\"}} {count}", s.cluster_id)
        }),
    );
    family(
        &mut out,
        "credstream_takeovers_refused_total",
        "counter",
        "Hellos refused by the takeover hold-down.",
        statuses.iter().map(|s| {
            let refused = s.takeovers.as_ref().map_or(0, |t| t.refused);
            format!("{{cluster=\"{}\"}} {refused}", s.cluster_id)
        }),
    );
    family(
        &mut out,
        "credstream_refresh_stopped",
        "gauge",
        "1 for a kind the broker stopped asking for after a permanent refresh error.",
        statuses.iter().flat_map(|s| {
            s.stopped_refreshes.iter().map(move |stopped| {
                format!(
                    "{{cluster=\"{}\",kind=\"{}\"}} 1",
                    s.cluster_id,
                    stopped.kind().label()
                )
            })
        }),
    );
    family(
        &mut out,
        "credstream_cluster_version",
        "gauge",
        "The cluster's latest version.",
        statuses
            .iter()
            .map(|s| format!("{{cluster=\"{}\"}} {}", s.cluster_id, s.version)),
    );
    family(
        &mut out,
        "credstream_credential_expiry_timestamp_seconds",
        "gauge",
        "When the held credential of a kind expires (Unix time).",
        statuses.iter().flat_map(|s| {
            s.credentials.iter().map(move |c| {
                let expires = c.expires_at.as_ref().map_or(0, |t| t.seconds);
                format!(
                    "{{cluster=\"{}\",kind=\"{}\"}} {expires}",
                    s.cluster_id,
                    c.kind().label()
                )
            })
        }),
    );
    family(
        &mut out,
        "credstream_access_end_timestamp_seconds",
        "gauge",
        "When workers lose a kind of access unless the user logs in again (Unix time), as the publisher reported it; absent while the publisher can keep minting.",
        statuses.iter().flat_map(|s| {
            s.credentials.iter().filter_map(move |c| {
                let at = c.access_end.as_ref()?.at.as_ref()?.seconds;
                Some(format!(
                    "{{cluster=\"{}\",kind=\"{}\"}} {at}",
                    s.cluster_id,
                    c.kind().label()
                ))
            })
        }),
    );
    family(
        &mut out,
        "credstream_refresh_total",
        "counter",
        "Refresh requests by reason and outcome.",
        statuses.iter().flat_map(|s| {
            s.refresh_counts.iter().map(move |c| {
                format!(
                    "{{cluster=\"{}\",reason=\"{}\",outcome=\"{}\"}} {}",
                    s.cluster_id,
                    reason_label(c.reason()),
                    c.outcome,
                    c.count
                )
            })
        }),
    );
    out
}

/// Serves `GET /metrics` on `listen` until the task is dropped; returns the
/// bound address.
pub async fn serve(listen: SocketAddr, hub: Arc<ClusterHub>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} for metrics"))?;
    let local = listener.local_addr()?;
    let app =
        Router::new().route(
            "/metrics",
            get(move || {
                let hub = hub.clone();
                async move {
                    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], render(&hub)).into_response()
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "metrics endpoint stopped");
        }
    });
    Ok(local)
}
