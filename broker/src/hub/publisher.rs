//! One cluster's publisher slot: the connected publisher, takeovers, and the
//! hold-down that keeps two supervised publishers from trading the cluster
//! on every restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_proto::convert::timestamp;
use credstream_proto::v1::{RefreshRequest, TakeoverStatus};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::Cluster;

/// Messages the broker pushes to the connected publisher.
#[derive(Debug)]
pub enum PublisherEvent {
    /// Send this refresh request.
    Refresh(RefreshRequest),
    /// Another publisher took over: end the stream with ABORTED.
    TakenOver,
}

/// The most displaced publisher names a cluster remembers for the hold-down
/// (oldest forgotten first), so that a token cycling through names cannot
/// grow the list without bound.
const MAX_HELD_DOWN_NAMES: usize = 16;

#[derive(Debug)]
struct Connected {
    conn: u64,
    name: String,
    events: mpsc::UnboundedSender<PublisherEvent>,
}

/// Who publishes into the cluster, and its takeover history.
#[derive(Debug, Default)]
pub(super) struct PublisherSlot {
    current: Option<Connected>,
    /// Publisher names displaced recently, and until when they may not take
    /// the cluster back.
    held_down: Vec<(String, Instant)>,
    takeovers: u64,
    takeovers_refused: u64,
    last_takeover: Option<(SystemTime, String)>,
}

/// A hello the hold-down refused: the name holding the cluster, and how
/// many seconds (at least 1) the refused name must wait.
pub(super) struct HeldDown {
    pub(super) holder: String,
    pub(super) wait_s: u64,
}

impl PublisherSlot {
    /// Whether publisher `name` may take the cluster now. A name displaced
    /// less than the hold-down ago may not take it back from a `responsive`
    /// publisher; such a refusal is counted.
    pub(super) fn admit(
        &mut self,
        name: &str,
        responsive: bool,
        now: Instant,
    ) -> Result<(), HeldDown> {
        self.held_down.retain(|(_, until)| *until > now);
        if let Some(current) = &self.current
            && responsive
            && let Some((_, until)) = self.held_down.iter().find(|(held, _)| held == name)
        {
            let refused = HeldDown {
                holder: current.name.clone(),
                wait_s: until.duration_since(now).as_secs().max(1),
            };
            self.takeovers_refused += 1;
            return Err(refused);
        }
        Ok(())
    }

    /// Makes stream `conn` of `name` the cluster's publisher. A publisher
    /// it displaces is told (it ends its stream) and its name is held down
    /// until `now + hold_down`; returns that name.
    pub(super) fn connect(
        &mut self,
        conn: u64,
        name: &str,
        events: mpsc::UnboundedSender<PublisherEvent>,
        now: Instant,
        hold_down: Duration,
    ) -> Option<String> {
        let slot = Connected {
            conn,
            name: name.to_owned(),
            events,
        };
        let old = self.current.replace(slot)?;
        let _ = old.events.send(PublisherEvent::TakenOver);
        self.takeovers += 1;
        self.last_takeover = Some((SystemTime::now(), old.name.clone()));
        self.held_down.retain(|(held, _)| *held != old.name);
        if self.held_down.len() >= MAX_HELD_DOWN_NAMES {
            self.held_down.remove(0);
        }
        self.held_down.push((old.name.clone(), now + hold_down));
        Some(old.name)
    }

    /// True if stream `conn` is the connected publisher (not one taken
    /// over since).
    pub(super) fn is(&self, conn: u64) -> bool {
        self.current.as_ref().is_some_and(|p| p.conn == conn)
    }

    /// True if a publisher is connected.
    pub(super) fn is_connected(&self) -> bool {
        self.current.is_some()
    }

    /// The connected publisher left.
    pub(super) fn disconnect(&mut self) {
        self.current = None;
    }

    /// Sends `event` to the connected publisher, if any.
    pub(super) fn send(&self, event: PublisherEvent) {
        if let Some(publisher) = &self.current {
            let _ = publisher.events.send(event);
        }
    }

    /// The connected publisher's name; empty if none.
    pub(super) fn name(&self) -> String {
        self.current
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    /// Hellos that took the cluster from a connected publisher.
    pub(super) fn takeovers(&self) -> u64 {
        self.takeovers
    }

    /// Hellos refused by the hold-down.
    pub(super) fn takeovers_refused(&self) -> u64 {
        self.takeovers_refused
    }

    /// The takeover history, for `GetCluster`.
    pub(super) fn takeover_status(&self) -> TakeoverStatus {
        let (last_at, last_displaced) = match &self.last_takeover {
            Some((at, name)) => (Some(timestamp(*at)), name.clone()),
            None => (None, String::new()),
        };
        TakeoverStatus {
            count: self.takeovers,
            last_at,
            last_displaced,
            refused: self.takeovers_refused,
        }
    }
}

/// Registration of a live publisher stream; ends it in the cluster on drop.
#[derive(Debug)]
pub struct PublisherRegistration {
    pub(super) cluster: Arc<Cluster>,
    pub(super) conn: u64,
}

impl PublisherRegistration {
    /// The publisher left a heartbeat unanswered: hold refresh requests and
    /// suspend the deadlines of those it was sent.
    pub fn unresponsive(&self) {
        self.cluster.publisher_unresponsive(self.conn);
    }

    /// The publisher answered a heartbeat: send what was held.
    pub fn resumed(&self) {
        self.cluster.publisher_resumed(self.conn);
    }
}

impl Drop for PublisherRegistration {
    fn drop(&mut self) {
        self.cluster.publisher_gone(self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD_DOWN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn a_displaced_name_may_not_take_the_cluster_back_within_the_hold_down() {
        let mut slot = PublisherSlot::default();
        let now = Instant::now();
        let (first, mut first_events) = mpsc::unbounded_channel();
        assert!(slot.admit("a", true, now).is_ok());
        assert_eq!(slot.connect(1, "a", first, now, HOLD_DOWN), None);
        let (second, _) = mpsc::unbounded_channel();
        assert!(slot.admit("b", true, now).is_ok());
        assert_eq!(
            slot.connect(2, "b", second, now, HOLD_DOWN).as_deref(),
            Some("a")
        );
        assert!(matches!(
            first_events.try_recv(),
            Ok(PublisherEvent::TakenOver)
        ));
        assert!(slot.is(2) && !slot.is(1));

        let refused = slot.admit("a", true, now + HOLD_DOWN / 2).unwrap_err();
        assert_eq!(refused.holder, "b");
        assert_eq!(refused.wait_s, 30);
        assert_eq!(slot.takeovers_refused(), 1);
        // An unresponsive holder may be taken from, and so may anyone once
        // the hold-down has passed.
        assert!(slot.admit("a", false, now).is_ok());
        assert!(slot.admit("a", true, now + HOLD_DOWN).is_ok());
        assert_eq!(slot.takeover_status().count, 1);
        assert_eq!(slot.takeover_status().last_displaced, "a");
    }
}
