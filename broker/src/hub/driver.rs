//! A cluster's own task: runs its refresh planner when due or woken, and
//! removes the cluster from the hub once it has been idle for the grace
//! period, then ends.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::ClusterHub;
use super::cluster::{Cluster, Inner};

/// How soon an idle cluster that could not be removed (something held it
/// for a moment: an admin call, a hello between lookup and registration)
/// is looked at again.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

impl Cluster {
    /// True if the cluster has no publisher, no agents and no live
    /// credential.
    fn idle(&self, inner: &Inner, now: Instant) -> bool {
        !inner.publisher.is_connected() && inner.agents.is_empty() && !self.state().any_live(now)
    }

    /// When the cluster may be removed from the hub, if it is idle.
    pub(super) fn idle_until(&self, inner: &mut Inner, now: Instant) -> Option<Instant> {
        if !self.idle(inner, now) {
            inner.idle_since = None;
            return None;
        }
        let since = *inner.idle_since.get_or_insert(now);
        Some(since + self.idle_grace)
    }

    /// Runs the planner's due work; returns when to run again and when the
    /// cluster may be removed (if idle).
    fn plan(&self) -> (Option<Instant>, Option<Instant>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let (plan, next) = inner.planner.tick(now);
        if !plan.expired.is_empty() {
            self.drop_expired(&plan.expired, now);
        }
        self.send_requests(&inner, plan.send.into_iter());
        let idle_until = self.idle_until(&mut inner, now);
        (next, idle_until)
    }
}

/// The cluster's task: runs its planner when due or woken, and removes the
/// cluster from the hub once it has been idle for the grace period, then
/// ends.
pub(super) async fn drive_cluster(
    cluster: Arc<Cluster>,
    hub: Weak<ClusterHub>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut next, idle_until) = cluster.plan();
        if let Some(at) = idle_until {
            if at <= Instant::now() {
                let Some(hub) = hub.upgrade() else { return };
                if hub.remove_if_idle(&cluster) {
                    return;
                }
                let recheck = Instant::now() + IDLE_RECHECK;
                next = Some(next.map_or(recheck, |n| n.min(recheck)));
            } else {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            () = cluster.wake_planner.notified() => {}
            _ = shutdown.wait_for(|down| *down) => return,
        }
    }
}
