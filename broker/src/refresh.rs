//! The refresh planner: when to ask the publisher for a new credential, and
//! how to make a thousand reasons to ask cost one mint.
//!
//! One [`RefreshPlanner`] per cluster, owned by the cluster (see `hub`) and
//! driven by its timer task. It is plain state on `tokio::time::Instant`, so
//! tests drive it with a paused clock.
//!
//! Rules (docs/design.md §2 "Refresh"):
//! - A credential is due for refresh when `refresh_at` (default ½) of its
//!   lifetime has passed, ±5% jitter so that clusters spread out.
//! - Single flight: while a request for a kind is outstanding (or waiting
//!   out a backoff), every further trigger joins it.
//! - A request not answered by its deadline, or answered with an error, is
//!   retried with exponential backoff and jitter — until the credential
//!   expires; then the kind is missing and the planner waits for a trigger
//!   (a publisher hello or an agent hint).
//! - Requests made while no publisher is connected are held and sent when
//!   one connects.
//! - A publisher that left a heartbeat unanswered is unresponsive (stopped,
//!   frozen: its connection is still up, so keepalive never fires): requests
//!   made meanwhile are held as for an absent publisher, and the deadlines
//!   of those already sent are suspended instead of expiring into new
//!   requests with new ids. Everything resumes with its next answer, so a
//!   publisher that comes back finds one request per kind, not a backlog.
//! - A credential answering a request that is no longer the kind's current
//!   one is "superseded": the cluster drops it instead of publishing a
//!   second version ([`RefreshPlanner::accepts_answer`]).
//! - A permanent error (the publisher says retrying cannot help) stops the
//!   kind: no requests, no retries, triggers ignored, until the publisher
//!   reconnects or a credential of the kind arrives.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use credstream_proto::convert::timestamp;
use credstream_proto::kind::PerKind;
use credstream_proto::rules::backoff::Backoff;
use credstream_proto::v1::{
    CredentialKind, PendingRefresh, RefreshCount, RefreshReason, RefreshRequest, StoppedRefresh,
};
use rand::Rng;
use tokio::time::Instant;

/// Tunables of the planner.
#[derive(Clone, Debug)]
pub struct RefreshConfig {
    /// Fraction of the lifetime after which a credential is refreshed.
    pub refresh_at: f64,
    /// Relative jitter applied to the refresh point (0.05 = ±5%).
    pub jitter: f64,
    /// How long the publisher has to answer a request.
    pub deadline: Duration,
    /// First retry delay; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often a publisher that answers heartbeats gets one; a heartbeat
    /// still unanswered when the next is due makes it unresponsive.
    pub heartbeat_interval: Duration,
    /// How long a displaced publisher name may not take the cluster back
    /// from a responsive publisher (damps supervised publishers that fight).
    pub takeover_hold_down: Duration,
    /// How long a cluster with no publisher, no agents and no live
    /// credential is kept before it is dropped and its task ends.
    pub idle_cluster_grace: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            refresh_at: 0.5,
            jitter: 0.05,
            deadline: Duration::from_secs(60),
            backoff_base: Duration::from_secs(2),
            backoff_max: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(10),
            takeover_hold_down: Duration::from_secs(60),
            idle_cluster_grace: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug)]
struct Pending {
    id: String,
    reason: RefreshReason,
    deadline: Instant,
    deadline_wall: SystemTime,
    attempts: u32,
    sent: bool,
}

#[derive(Clone, Debug)]
struct Retry {
    at: Instant,
    reason: RefreshReason,
    attempts: u32,
}

#[derive(Clone, Debug, Default)]
struct KindPlan {
    /// When the held credential is due for refresh.
    due: Option<Instant>,
    /// When the held credential expires.
    expires: Option<Instant>,
    pending: Option<Pending>,
    retry: Option<Retry>,
    /// Set by a permanent error: nothing is asked for until cleared.
    stopped: Option<Stopped>,
}

#[derive(Clone, Debug)]
struct Stopped {
    message: String,
    since: SystemTime,
}

/// What the cluster must do after the planner ran.
#[derive(Debug, Default)]
pub struct Plan {
    /// Requests to send to the connected publisher now.
    pub send: Vec<RefreshRequest>,
    /// Kinds whose credential has expired and must be dropped.
    pub expired: Vec<CredentialKind>,
}

/// Per-cluster refresh state. See the module docs.
#[derive(Debug)]
pub struct RefreshPlanner {
    config: RefreshConfig,
    kinds: PerKind<KindPlan>,
    publisher_connected: bool,
    /// False while the connected publisher has a heartbeat unanswered.
    publisher_responsive: bool,
    counts: BTreeMap<(i32, &'static str), u64>,
    last_error: String,
    next_id: u64,
    id_prefix: u32,
}

impl RefreshPlanner {
    /// A planner with nothing held.
    pub fn new(config: RefreshConfig) -> Self {
        Self {
            config,
            kinds: Default::default(),
            publisher_connected: false,
            publisher_responsive: true,
            counts: BTreeMap::new(),
            last_error: String::new(),
            next_id: 1,
            id_prefix: rand::thread_rng().r#gen(),
        }
    }

    /// True if requests can reach a publisher now: one is connected and
    /// answering.
    fn can_send(&self) -> bool {
        self.publisher_connected && self.publisher_responsive
    }

    fn count(&mut self, reason: RefreshReason, outcome: &'static str) {
        *self.counts.entry((reason as i32, outcome)).or_default() += 1;
    }

    fn backoff(&self, attempts: u32) -> Duration {
        // Equal jitter: retries of many clusters spread out, but none
        // retries immediately.
        Backoff::new(self.config.backoff_base, self.config.backoff_max)
            .equal_jitter(attempts.saturating_sub(1))
    }

    fn request(
        &mut self,
        kind: CredentialKind,
        reason: RefreshReason,
        attempts: u32,
        now: Instant,
    ) -> Option<RefreshRequest> {
        // Nothing is asked for an unspecified kind.
        self.kinds.get(kind)?;
        let id = format!("r{:08x}-{}", self.id_prefix, self.next_id);
        self.next_id += 1;
        let deadline_wall = SystemTime::now() + self.config.deadline;
        let pending = Pending {
            id: id.clone(),
            reason,
            deadline: now + self.config.deadline,
            deadline_wall,
            attempts,
            sent: self.can_send(),
        };
        self.count(reason, "requested");
        let plan = self.kinds.get_mut(kind).expect("checked above");
        plan.pending = Some(pending);
        plan.retry = None;
        self.can_send().then(|| RefreshRequest {
            id,
            kind: kind as i32,
            reason: reason as i32,
            deadline: Some(timestamp(deadline_wall)),
        })
    }

    /// Asks for a new credential of `kind` unless a request is already
    /// outstanding or backing off (single flight). Returns the request to
    /// send, if one was created and a publisher is connected.
    pub fn trigger(
        &mut self,
        kind: CredentialKind,
        reason: RefreshReason,
        now: Instant,
    ) -> Option<RefreshRequest> {
        let plan = self.kinds.get(kind)?;
        if plan.stopped.is_some() {
            self.count(reason, "suppressed");
            return None;
        }
        if plan.pending.is_some() || plan.retry.is_some() {
            self.count(reason, "joined");
            return None;
        }
        self.request(kind, reason, 1, now)
    }

    /// True if a request for `kind` is outstanding or backing off.
    pub fn in_flight(&self, kind: CredentialKind) -> bool {
        self.kinds
            .get(kind)
            .is_some_and(|plan| plan.pending.is_some() || plan.retry.is_some())
    }

    /// Records a new credential: completes any outstanding request for its
    /// kind and schedules the next refresh.
    pub fn credential_accepted(
        &mut self,
        kind: CredentialKind,
        issued_at: SystemTime,
        expires_at: SystemTime,
        now: Instant,
        now_wall: SystemTime,
    ) {
        if self.kinds.get(kind).is_none() {
            return;
        }
        let lifetime = expires_at.duration_since(issued_at).unwrap_or_default();
        let elapsed = now_wall.duration_since(issued_at).unwrap_or_default();
        let remaining = expires_at.duration_since(now_wall).unwrap_or_default();
        let jitter = 1.0 + self.config.jitter * (2.0 * rand::thread_rng().r#gen::<f64>() - 1.0);
        let due_after_issue = lifetime.mul_f64((self.config.refresh_at * jitter).clamp(0.0, 1.0));
        let due_in = due_after_issue.saturating_sub(elapsed);
        let plan = self.kinds.get_mut(kind).expect("checked above");
        plan.expires = Some(now + remaining);
        plan.due = Some(now + due_in);
        plan.retry = None;
        plan.stopped = None;
        if let Some(pending) = plan.pending.take() {
            self.count(pending.reason, "fulfilled");
        }
    }

    /// Whether a credential of `kind` answering request `id` may be
    /// published: only if `id` is the kind's current request, or nothing is
    /// asked for and the cluster holds no live credential of the kind (`live`
    /// false), so the fresh credential is wanted anyway. Anything else
    /// answers a request that was already superseded (re-issued after a
    /// deadline, fulfilled by another answer): counted as "superseded" and
    /// to be dropped, so a backlog of answers never fans out more than one
    /// version. Unprompted credentials (empty `id`) are always accepted.
    pub fn accepts_answer(&mut self, kind: CredentialKind, id: &str, live: bool) -> bool {
        let Some(plan) = self.kinds.get(kind) else {
            return true;
        };
        if id.is_empty() {
            return true;
        }
        if plan.pending.as_ref().is_some_and(|p| p.id == id) {
            return true;
        }
        if plan.pending.is_none() && plan.retry.is_none() && !live {
            return true;
        }
        let reason = plan
            .pending
            .as_ref()
            .map(|p| p.reason)
            .or(plan.retry.as_ref().map(|r| r.reason))
            .unwrap_or(RefreshReason::Unspecified);
        self.count(reason, "superseded");
        false
    }

    /// Records a publisher's failure to answer request `id`; schedules a
    /// retry, or, if the publisher says the failure is `permanent`, stops
    /// the kind until the publisher reconnects or a credential arrives.
    /// Unknown or stale ids are ignored (the request was already retried
    /// under a new id). Returns true if `id` was outstanding.
    pub fn refresh_failed(
        &mut self,
        id: &str,
        message: String,
        permanent: bool,
        now: Instant,
    ) -> bool {
        let Some(kind) = self
            .kinds
            .iter()
            .find(|(_, plan)| plan.pending.as_ref().is_some_and(|p| p.id == id))
            .map(|(kind, _)| kind)
        else {
            return false;
        };
        let plan = self.kinds.get_mut(kind).expect("a known kind");
        let pending = plan.pending.take().expect("found above");
        self.count(pending.reason, "failed");
        self.last_error = message.clone();
        if permanent {
            self.count(pending.reason, "stopped");
            let plan = self.kinds.get_mut(kind).expect("a known kind");
            plan.retry = None;
            plan.stopped = Some(Stopped {
                message,
                since: SystemTime::now(),
            });
            return true;
        }
        self.schedule_retry(kind, pending, now);
        true
    }

    fn schedule_retry(&mut self, kind: CredentialKind, pending: Pending, now: Instant) {
        let at = now + self.backoff(pending.attempts);
        let plan = self.kinds.get_mut(kind).expect("a known kind");
        if plan.expires.is_some_and(|expires| at >= expires) {
            // Retrying past expiry is pointless: the kind becomes missing and
            // the next hello or hint asks again.
            self.count(pending.reason, "abandoned");
            return;
        }
        plan.retry = Some(Retry {
            at,
            reason: pending.reason,
            attempts: pending.attempts + 1,
        });
    }

    /// A publisher connected (or took over): everything outstanding is sent
    /// to it, and every declared kind without a live credential is asked
    /// for (reason MISSING). `live` says which kinds the cluster holds.
    pub fn publisher_connected(
        &mut self,
        declared: &[CredentialKind],
        live: impl Fn(CredentialKind) -> bool,
        now: Instant,
    ) -> Vec<RefreshRequest> {
        self.publisher_connected = true;
        self.publisher_responsive = true;
        let mut send = Vec::new();
        for kind in CredentialKind::KNOWN {
            let plan = self.kinds.get_mut(kind).expect("a known kind");
            // A new connection is the publisher "saying otherwise": whatever
            // was permanently wrong may have been fixed.
            plan.stopped = None;
            if let Some(pending) = &mut plan.pending {
                // The new publisher never saw this request: send it again
                // with a fresh deadline.
                pending.sent = true;
                pending.deadline = now + self.config.deadline;
                pending.deadline_wall = SystemTime::now() + self.config.deadline;
                send.push(RefreshRequest {
                    id: pending.id.clone(),
                    kind: kind as i32,
                    reason: pending.reason as i32,
                    deadline: Some(timestamp(pending.deadline_wall)),
                });
                continue;
            }
            if !declared.contains(&kind) {
                continue;
            }
            if !live(kind) {
                plan.retry = None;
                send.extend(self.request(kind, RefreshReason::Missing, 1, now));
            } else if plan.due.is_some_and(|due| due <= now) && plan.retry.is_none() {
                send.extend(self.request(kind, RefreshReason::Expiring, 1, now));
            }
        }
        send
    }

    /// The connected publisher left a heartbeat unanswered: hold new
    /// requests and suspend the deadlines of those it was sent.
    pub fn publisher_unresponsive(&mut self) {
        self.publisher_responsive = false;
    }

    /// The connected publisher answered again. Requests it was already sent
    /// get a fresh deadline (it is reading them now); those held meanwhile
    /// are returned, to be sent.
    pub fn publisher_resumed(&mut self, now: Instant) -> Vec<RefreshRequest> {
        if self.publisher_responsive {
            return Vec::new();
        }
        self.publisher_responsive = true;
        let mut send = Vec::new();
        if !self.publisher_connected {
            return send;
        }
        let deadline = now + self.config.deadline;
        let deadline_wall = SystemTime::now() + self.config.deadline;
        for (kind, plan) in self.kinds.iter_mut() {
            if let Some(pending) = &mut plan.pending {
                pending.deadline = deadline;
                pending.deadline_wall = deadline_wall;
                if !pending.sent {
                    pending.sent = true;
                    send.push(RefreshRequest {
                        id: pending.id.clone(),
                        kind: kind as i32,
                        reason: pending.reason as i32,
                        deadline: Some(timestamp(deadline_wall)),
                    });
                }
            }
        }
        send
    }

    /// False while the connected publisher has a heartbeat unanswered.
    pub fn publisher_responsive(&self) -> bool {
        self.publisher_responsive
    }

    /// The publisher went away: requests are held until the next one.
    pub fn publisher_disconnected(&mut self) {
        self.publisher_connected = false;
        self.publisher_responsive = true;
        for (_, plan) in self.kinds.iter_mut() {
            if let Some(pending) = &mut plan.pending {
                pending.sent = false;
            }
        }
    }

    /// Forgets everything about `kind` (revocation).
    pub fn revoked(&mut self, kind: CredentialKind) {
        let Some(plan) = self.kinds.get_mut(kind) else {
            return;
        };
        let cancelled = std::mem::take(plan).pending;
        if let Some(pending) = cancelled {
            self.count(pending.reason, "cancelled");
        }
    }

    /// Does what is due at `now` and says when to run again.
    pub fn tick(&mut self, now: Instant) -> (Plan, Option<Instant>) {
        let mut plan = Plan::default();
        for kind in CredentialKind::KNOWN {
            let kind_plan = self.kinds.get_mut(kind).expect("a known kind");
            if kind_plan.expires.is_some_and(|at| at <= now) {
                plan.expired.push(kind);
                let stale = std::mem::take(kind_plan);
                // Expiry does not lift a stop: asking would fail the same way.
                kind_plan.stopped = stale.stopped.clone();
                if let Some(pending) = stale.pending {
                    self.count(pending.reason, "abandoned");
                }
                if let Some(retry) = stale.retry {
                    self.count(retry.reason, "abandoned");
                }
                continue;
            }
            let can_send = self.can_send();
            let kind_plan = self.kinds.get_mut(kind).expect("a known kind");
            if let Some(pending) = &kind_plan.pending
                && pending.sent
                && can_send
                && pending.deadline <= now
            {
                let pending = kind_plan.pending.take().expect("checked");
                self.count(pending.reason, "timed_out");
                self.schedule_retry(kind, pending, now);
            }
            let kind_plan = self.kinds.get(kind).expect("a known kind");
            if let Some(retry) = kind_plan.retry.clone()
                && retry.at <= now
            {
                plan.send
                    .extend(self.request(kind, retry.reason, retry.attempts, now));
            }
            let kind_plan = self.kinds.get_mut(kind).expect("a known kind");
            if kind_plan.due.is_some_and(|due| due <= now)
                && kind_plan.pending.is_none()
                && kind_plan.retry.is_none()
                && kind_plan.stopped.is_none()
            {
                // Only once per credential: the next is scheduled when the
                // new credential arrives.
                kind_plan.due = None;
                plan.send
                    .extend(self.request(kind, RefreshReason::Expiring, 1, now));
            }
        }
        (plan, self.next_wake())
    }

    fn next_wake(&self) -> Option<Instant> {
        let can_send = self.can_send();
        self.kinds
            .iter()
            .flat_map(|(_, plan)| {
                [
                    plan.expires,
                    plan.due.filter(|_| {
                        plan.pending.is_none() && plan.retry.is_none() && plan.stopped.is_none()
                    }),
                    plan.pending
                        .as_ref()
                        .filter(|p| p.sent && can_send)
                        .map(|p| p.deadline),
                    plan.retry.as_ref().map(|r| r.at),
                ]
            })
            .flatten()
            .min()
    }

    /// When the held credential of `kind` is due for refresh, if scheduled.
    pub fn due(&self, kind: CredentialKind) -> Option<Instant> {
        self.kinds.get(kind).and_then(|plan| plan.due)
    }

    /// Outstanding requests, for `GetCluster`.
    pub fn pending(&self) -> Vec<PendingRefresh> {
        self.kinds
            .iter()
            .filter_map(|(kind, plan)| {
                if let Some(p) = &plan.pending {
                    return Some(PendingRefresh {
                        id: p.id.clone(),
                        kind: kind as i32,
                        reason: p.reason as i32,
                        deadline: Some(timestamp(p.deadline_wall)),
                        attempts: p.attempts,
                        sent: p.sent,
                    });
                }
                plan.retry.as_ref().map(|r| PendingRefresh {
                    id: String::new(),
                    kind: kind as i32,
                    reason: r.reason as i32,
                    deadline: None,
                    attempts: r.attempts.saturating_sub(1),
                    sent: false,
                })
            })
            .collect()
    }

    /// Counters by reason and outcome, for `GetCluster`.
    pub fn counts(&self) -> Vec<RefreshCount> {
        self.counts
            .iter()
            .map(|(&(reason, outcome), &count)| RefreshCount {
                reason,
                outcome: outcome.to_owned(),
                count,
            })
            .collect()
    }

    /// How many requests were created for `reason` (for tests and metrics).
    pub fn requested(&self, reason: RefreshReason) -> u64 {
        self.counts
            .get(&(reason as i32, "requested"))
            .copied()
            .unwrap_or(0)
    }

    /// The last error a publisher reported.
    pub fn last_error(&self) -> &str {
        &self.last_error
    }

    /// Kinds stopped by a permanent error, for `GetCluster`.
    pub fn stopped(&self) -> Vec<StoppedRefresh> {
        self.kinds
            .iter()
            .filter_map(|(kind, plan)| {
                let stopped = plan.stopped.as_ref()?;
                Some(StoppedRefresh {
                    kind: kind as i32,
                    message: stopped.message.clone(),
                    since: Some(timestamp(stopped.since)),
                })
            })
            .collect()
    }

    /// True if nothing is outstanding, backing off or scheduled for `kind`
    /// because a permanent error stopped it.
    pub fn is_stopped(&self, kind: CredentialKind) -> bool {
        self.kinds
            .get(kind)
            .is_some_and(|plan| plan.stopped.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn planner() -> RefreshPlanner {
        let mut p = RefreshPlanner::new(RefreshConfig::default());
        p.publisher_connected(&[], |_| true, Instant::now());
        p
    }

    /// Runs the planner's timer until it asks for a refresh; returns the
    /// time that took and the request.
    async fn wait_for_request(p: &mut RefreshPlanner) -> (Duration, RefreshRequest) {
        let start = Instant::now();
        loop {
            let (plan, next) = p.tick(Instant::now());
            if let Some(req) = plan.send.into_iter().next() {
                return (start.elapsed(), req);
            }
            tokio::time::sleep_until(next.expect("something is scheduled")).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_happens_inside_the_planned_window_for_15m_1h_12h() {
        for lifetime in [15 * MIN, 60 * MIN, 12 * 60 * MIN] {
            for _ in 0..20 {
                let mut p = planner();
                let now = SystemTime::now();
                p.credential_accepted(
                    CredentialKind::Aws,
                    now,
                    now + lifetime,
                    Instant::now(),
                    now,
                );
                let (after, req) = wait_for_request(&mut p).await;
                assert_eq!(req.reason, RefreshReason::Expiring as i32);
                let (lo, hi) = (lifetime.mul_f64(0.475), lifetime.mul_f64(0.525));
                assert!(
                    after >= lo && after <= hi,
                    "lifetime {lifetime:?}: refreshed after {after:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_credential_already_past_its_refresh_point_is_refreshed_at_once() {
        let mut p = planner();
        let now = SystemTime::now();
        // Issued 40 minutes ago, 60-minute lifetime: past half-life.
        p.credential_accepted(
            CredentialKind::Gcp,
            now - 40 * MIN,
            now + 20 * MIN,
            Instant::now(),
            now,
        );
        let (after, req) = wait_for_request(&mut p).await;
        assert_eq!(after, Duration::ZERO);
        assert_eq!(req.kind, CredentialKind::Gcp as i32);
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_join_the_outstanding_request() {
        let mut p = planner();
        let now = Instant::now();
        let first = p.trigger(CredentialKind::Aws, RefreshReason::AgentRequested, now);
        assert!(first.is_some());
        for _ in 0..10_000 {
            assert!(
                p.trigger(CredentialKind::Aws, RefreshReason::AgentRequested, now)
                    .is_none()
            );
        }
        assert_eq!(p.requested(RefreshReason::AgentRequested), 1);
        // A different kind is its own flight.
        assert!(
            p.trigger(CredentialKind::Gcp, RefreshReason::AgentRequested, now)
                .is_some()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn errors_and_missed_deadlines_back_off_and_stop_at_expiry() {
        let mut p = planner();
        let wall = SystemTime::now();
        p.credential_accepted(
            CredentialKind::Aws,
            wall,
            wall + 15 * MIN,
            Instant::now(),
            wall,
        );
        let start = Instant::now();
        let (_, first) = wait_for_request(&mut p).await;
        assert!(p.refresh_failed(&first.id, "denied".into(), false, Instant::now()));
        assert!(
            !p.refresh_failed(&first.id, "again".into(), false, Instant::now()),
            "stale ids are ignored"
        );
        assert_eq!(p.last_error(), "denied");
        let mut ids = vec![first.id.clone()];
        let mut gaps = Vec::new();
        let mut last = Instant::now();
        // Never answer again: every retry times out.
        loop {
            let (plan, next) = p.tick(Instant::now());
            if !plan.expired.is_empty() {
                break;
            }
            for req in plan.send {
                assert!(!ids.contains(&req.id), "each retry has a new id");
                ids.push(req.id);
                gaps.push(Instant::now() - last);
                last = Instant::now();
            }
            tokio::time::sleep_until(next.expect("scheduled")).await;
        }
        assert!(Instant::now() - start >= 15 * MIN);
        assert!(ids.len() >= 3, "retried: {ids:?}");
        assert!(
            gaps.windows(2).take(3).all(|w| w[1] >= w[0]),
            "backoff grows: {gaps:?}"
        );
        // After expiry nothing is scheduled until a trigger.
        let (plan, next) = p.tick(Instant::now());
        assert!(plan.send.is_empty() && next.is_none());
        assert!(!p.in_flight(CredentialKind::Aws));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_wait_for_a_publisher_and_are_resent_on_reconnect() {
        let mut p = planner();
        p.publisher_disconnected();
        assert!(
            p.trigger(
                CredentialKind::Aws,
                RefreshReason::AgentRequested,
                Instant::now()
            )
            .is_none()
        );
        assert!(p.in_flight(CredentialKind::Aws));
        assert!(!p.pending()[0].sent);
        let sent = p.publisher_connected(
            &[CredentialKind::Aws, CredentialKind::Gcp],
            |_| false,
            Instant::now(),
        );
        assert_eq!(sent.len(), 2, "the held AWS request plus GCP missing");
        assert_eq!(sent[0].reason, RefreshReason::AgentRequested as i32);
        assert_eq!(sent[1].reason, RefreshReason::Missing as i32);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_credential_fulfils_the_request() {
        let mut p = planner();
        let req = p
            .trigger(CredentialKind::Aws, RefreshReason::Missing, Instant::now())
            .unwrap();
        assert!(!req.id.is_empty());
        let wall = SystemTime::now();
        p.credential_accepted(
            CredentialKind::Aws,
            wall,
            wall + 60 * MIN,
            Instant::now(),
            wall,
        );
        assert!(!p.in_flight(CredentialKind::Aws));
        let fulfilled = p
            .counts()
            .iter()
            .find(|c| c.outcome == "fulfilled")
            .map(|c| c.count);
        assert_eq!(fulfilled, Some(1));
    }

    fn count_of(p: &RefreshPlanner, outcome: &str) -> u64 {
        p.counts()
            .iter()
            .filter(|c| c.outcome == outcome)
            .map(|c| c.count)
            .sum()
    }

    #[tokio::test(start_paused = true)]
    async fn an_unresponsive_publisher_keeps_one_request_however_many_deadlines_pass() {
        let mut p = planner();
        let first = p
            .trigger(
                CredentialKind::Aws,
                RefreshReason::AgentRequested,
                Instant::now(),
            )
            .expect("sent");
        p.publisher_unresponsive();
        // Ten deadlines pass and a thousand hints arrive: nothing new.
        for _ in 0..10 {
            tokio::time::advance(RefreshConfig::default().deadline).await;
            let (plan, _) = p.tick(Instant::now());
            assert!(plan.send.is_empty(), "{:?}", plan.send);
            for _ in 0..100 {
                assert!(
                    p.trigger(
                        CredentialKind::Aws,
                        RefreshReason::AgentRequested,
                        Instant::now()
                    )
                    .is_none()
                );
            }
        }
        assert_eq!(count_of(&p, "timed_out"), 0);
        assert_eq!(p.pending()[0].id, first.id);
        // A GCP request made meanwhile is held, then sent on resume; the
        // AWS one was already sent and gets a fresh deadline instead.
        assert!(
            p.trigger(CredentialKind::Gcp, RefreshReason::Missing, Instant::now())
                .is_none()
        );
        let resumed = p.publisher_resumed(Instant::now());
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].kind, CredentialKind::Gcp as i32);
        let (plan, next) = p.tick(Instant::now());
        assert!(plan.send.is_empty());
        assert_eq!(
            next,
            Some(Instant::now() + RefreshConfig::default().deadline)
        );
        assert!(p.accepts_answer(CredentialKind::Aws, &first.id, false));
        assert_eq!(p.requested(RefreshReason::AgentRequested), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_to_a_superseded_request_is_not_accepted() {
        let mut p = planner();
        let first = p
            .trigger(CredentialKind::Aws, RefreshReason::Missing, Instant::now())
            .expect("sent");
        // The deadline passes: retried under a new id after the backoff.
        let (_, second) = wait_for_request(&mut p).await;
        assert_ne!(first.id, second.id);
        assert!(!p.accepts_answer(CredentialKind::Aws, &first.id, true));
        assert_eq!(count_of(&p, "superseded"), 1);
        assert!(p.accepts_answer(CredentialKind::Aws, &second.id, true));
        // Unprompted credentials are always accepted.
        assert!(p.accepts_answer(CredentialKind::Aws, "", true));
        let wall = SystemTime::now();
        p.credential_accepted(
            CredentialKind::Aws,
            wall,
            wall + 60 * MIN,
            Instant::now(),
            wall,
        );
        // Nothing asked for and a live credential held: late answers are
        // superseded; with none held, a fresh credential is wanted anyway.
        assert!(!p.accepts_answer(CredentialKind::Aws, &second.id, true));
        assert!(p.accepts_answer(CredentialKind::Aws, &second.id, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_stops_the_kind_until_the_publisher_reconnects() {
        let mut p = planner();
        let wall = SystemTime::now();
        p.credential_accepted(
            CredentialKind::Aws,
            wall,
            wall + 15 * MIN,
            Instant::now(),
            wall,
        );
        let (_, first) = wait_for_request(&mut p).await;
        assert!(p.refresh_failed(&first.id, "AccessDenied".into(), true, Instant::now()));
        assert_eq!(p.stopped().len(), 1);
        assert_eq!(p.stopped()[0].message, "AccessDenied");
        assert!(
            p.trigger(
                CredentialKind::Aws,
                RefreshReason::AgentRequested,
                Instant::now()
            )
            .is_none()
        );
        assert_eq!(count_of(&p, "suppressed"), 1);
        // No retry is ever scheduled; the credential expires and the stop
        // outlives it.
        let (plan, next) = p.tick(Instant::now());
        assert!(plan.send.is_empty());
        tokio::time::sleep_until(next.expect("the expiry")).await;
        let (plan, next) = p.tick(Instant::now());
        assert_eq!(plan.expired, [CredentialKind::Aws]);
        assert!(plan.send.is_empty() && next.is_none());
        assert!(p.is_stopped(CredentialKind::Aws));
        assert_eq!(p.requested(RefreshReason::Expiring), 1);
        // A reconnect is the publisher saying otherwise: asked again.
        p.publisher_disconnected();
        let sent = p.publisher_connected(&[CredentialKind::Aws], |_| false, Instant::now());
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].reason, RefreshReason::Missing as i32);
        assert!(p.stopped().is_empty());
    }
}
