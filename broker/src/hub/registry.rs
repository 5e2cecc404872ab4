//! [`ClusterHub`]: the registry of this broker's clusters, which creates a
//! cluster (and its task) on first use and removes it once idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use tokio::time::Instant;

use super::cluster::Cluster;
use super::driver::drive_cluster;
use crate::refresh::RefreshConfig;

/// Hub-wide settings.
#[derive(Clone, Debug, Default)]
pub struct HubConfig {
    /// Refresh planning.
    pub refresh: RefreshConfig,
}

/// All clusters of this broker.
#[derive(Debug)]
pub struct ClusterHub {
    clusters: RwLock<HashMap<String, Arc<Cluster>>>,
    config: HubConfig,
    shutdown: watch::Sender<bool>,
    /// Clusters removed after their idle grace period.
    dropped: AtomicU64,
}

impl ClusterHub {
    /// An empty hub.
    pub fn new(config: HubConfig) -> Arc<Self> {
        Arc::new(Self {
            clusters: RwLock::new(HashMap::new()),
            config,
            shutdown: watch::Sender::new(false),
            dropped: AtomicU64::new(0),
        })
    }

    /// How many clusters the hub holds.
    pub fn len(&self) -> usize {
        self.clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// True if the hub holds no cluster.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many clusters were removed after their idle grace period.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Removes `cluster` if it is still idle past its grace period and
    /// nothing but the map and its own task holds it (so no hello is between
    /// looking it up and registering). Returns true once it is gone.
    pub(super) fn remove_if_idle(&self, cluster: &Arc<Cluster>) -> bool {
        let mut clusters = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        match clusters.get(cluster.id()) {
            Some(held) if Arc::ptr_eq(held, cluster) => {}
            _ => return true,
        }
        // The map's reference and the task's.
        if Arc::strong_count(cluster) > 2 {
            return false;
        }
        let now = Instant::now();
        let mut inner = cluster.lock();
        if cluster
            .idle_until(&mut inner, now)
            .is_none_or(|at| at > now)
        {
            return false;
        }
        drop(inner);
        clusters.remove(cluster.id());
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cluster = %cluster.id(), "cluster idle past its grace period; dropped");
        true
    }

    /// The cluster `id`, created (with its planner task) if new.
    pub fn cluster(self: &Arc<Self>, id: &str) -> Arc<Cluster> {
        if let Some(cluster) = self.get(id) {
            return cluster;
        }
        let mut clusters = self.clusters.write().unwrap_or_else(|p| p.into_inner());
        if let Some(cluster) = clusters.get(id) {
            return cluster.clone();
        }
        let cluster = Arc::new(Cluster::new(id.to_owned(), self.config.refresh.clone()));
        clusters.insert(id.to_owned(), cluster.clone());
        tokio::spawn(drive_cluster(
            cluster.clone(),
            Arc::downgrade(self),
            self.shutdown.subscribe(),
        ));
        cluster
    }

    /// The cluster `id`, if the broker has state for it.
    pub fn get(&self, id: &str) -> Option<Arc<Cluster>> {
        self.clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every cluster, sorted by id.
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let mut all: Vec<_> = self
            .clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.id().cmp(b.id()));
        all
    }

    /// Resolves when the broker starts shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Wakes every agent stream of every cluster (after a reload of the
    /// token keys, so that each looks at its token again).
    pub fn wake_agent_streams(&self) {
        for cluster in self.all() {
            cluster.ring();
        }
    }

    /// Starts shutting down: every stream ends with UNAVAILABLE. Agent
    /// streams learn it from their cluster's bell, rung here.
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
        for cluster in self.all() {
            cluster.ring();
        }
    }
}
