//! What a cluster shows of itself without secrets: `GetCluster`'s status,
//! `ListClusters`' summary line, and the figures `--metrics-listen` reads.

use std::sync::Arc;

use credstream_proto::v1::{
    ClusterStatus, ClusterSummary, CredentialKind, CredentialStatus, CredentialUpdate,
    PrivateEnvStatus, RefreshCount, credential_update::Credential,
};
use tokio::time::Instant;

use super::cluster::Cluster;
use super::state::{ClusterState, Slot};

impl Cluster {
    /// Everything about the cluster except secrets.
    pub fn status(&self) -> ClusterStatus {
        let state = self.state();
        let now = Instant::now();
        let inner = self.lock();
        let credentials = CredentialKind::KNOWN
            .into_iter()
            .filter_map(|kind| {
                let update = state.live(kind, now)?;
                let (principal, account) = principal_and_account(update);
                Some(CredentialStatus {
                    kind: kind as i32,
                    version: update.version,
                    issued_at: update.issued_at,
                    expires_at: update.expires_at,
                    principal,
                    account,
                    sealed: update.sealed.is_some(),
                    access_end: update.access_end.clone(),
                })
            })
            .collect();
        let private_env = match &state.env {
            Slot::Env(env) => Some(PrivateEnvStatus {
                version: env.version,
                names: env.set.iter().map(|v| v.name.clone()).collect(),
                sealed: env.sealed.is_some(),
            }),
            _ => None,
        };
        ClusterStatus {
            cluster_id: self.id.clone(),
            version: state.version,
            info: state.info.clone(),
            credentials,
            private_env,
            agents: inner.agents.statuses(),
            pending_refreshes: inner.planner.pending(),
            refresh_counts: inner.planner.counts(),
            last_refresh_error: inner.planner.last_error().to_owned(),
            publisher_name: inner.publisher.name(),
            publisher_responsive: inner.planner.publisher_responsive(),
            takeovers: Some(inner.publisher.takeover_status()),
            stopped_refreshes: inner.planner.stopped(),
        }
    }

    /// One line of `ListClusters`.
    pub fn summary(&self) -> ClusterSummary {
        let state = self.state();
        ClusterSummary {
            cluster_id: self.id.clone(),
            version: state.version,
            publisher_connected: state.info.as_ref().is_some_and(|i| i.publisher_connected),
            agents_connected: self.lock().agents.len() as u32,
        }
    }

    /// What `--metrics-listen` reports of the cluster ([`crate::metrics`]):
    /// the state's `Arc` and a few figures copied under the lock, without
    /// building the whole [`ClusterStatus`] (no agent list), so a scrape
    /// stays cheap at many clusters and agents.
    pub fn metrics(&self) -> ClusterMetrics {
        let state = self.state();
        let inner = self.lock();
        ClusterMetrics {
            state,
            agents: inner.agents.len(),
            publisher_responsive: inner.planner.publisher_responsive(),
            takeovers: inner.publisher.takeovers(),
            takeovers_refused: inner.publisher.takeovers_refused(),
            stopped: inner.planner.stopped().iter().map(|s| s.kind()).collect(),
            refresh_counts: inner.planner.counts(),
        }
    }
}

/// Who a credential is for, as `GetCluster` and the audit trail name it:
/// the principal (an AWS ARN, a GCP service account email) and the account
/// (an AWS account id, a GCP project id). Clear metadata, never the secret.
///
/// Both are publisher-chosen text shown to operators (`GetCluster`,
/// `credstream status`, the audit trail), so they are kept printable and
/// bounded ([`credstream_proto::rules::text`]); the credential the agents
/// receive is not touched.
pub fn principal_and_account(update: &CredentialUpdate) -> (String, String) {
    let (principal, account) = match &update.credential {
        Some(Credential::Aws(aws)) => (&aws.principal_arn, &aws.account_id),
        Some(Credential::Gcp(gcp)) => (&gcp.principal_email, &gcp.project_id),
        None => return Default::default(),
    };
    let shown = |text: &str| {
        credstream_proto::rules::text::printable(text, crate::limits::MAX_DISPLAY_TEXT_BYTES)
            .into_owned()
    };
    (shown(principal), shown(account))
}

/// One cluster's figures for the metrics endpoint ([`Cluster::metrics`]).
/// The counts only grow while the cluster lives.
#[derive(Clone, Debug)]
pub struct ClusterMetrics {
    /// The state as agents see it (version, declaration, credentials).
    pub state: Arc<ClusterState>,
    /// Agents subscribed.
    pub agents: usize,
    /// False while the connected publisher has a heartbeat unanswered.
    pub publisher_responsive: bool,
    /// Hellos that took the cluster from a connected publisher.
    pub takeovers: u64,
    /// Hellos refused by the takeover hold-down.
    pub takeovers_refused: u64,
    /// Kinds the broker stopped asking for after a permanent error.
    pub stopped: Vec<CredentialKind>,
    /// Refresh requests by reason and outcome.
    pub refresh_counts: Vec<RefreshCount>,
}
