//! How many refused calls reach the trail one by one: per peer address
//! (its IP, not `ip:port`: a peer opens as many connections as it likes),
//! the first [`VERBATIM_PER_WINDOW`] of each [`WINDOW`] are written as
//! `call_refused` records and the rest only counted; once the window is
//! over (or the trail stops), each peer with refusals left unwritten gets
//! one `call_refused_summary` record carrying their count. A flood of
//! refused calls so costs the trail a fixed number of records per peer and
//! minute, whatever its rate, and loses no count.
//!
//! At most [`MAX_PEERS`] peers are told apart per window; refusals from
//! peers beyond them are counted together under the peer `other`, whose
//! every refusal is summarised (a flood from many addresses cannot grow
//! the tally or the trail).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// Refused calls per peer written one by one in each window.
pub const VERBATIM_PER_WINDOW: u32 = 10;
/// The window after which the counts are summarised and start again.
pub const WINDOW: Duration = Duration::from_secs(60);
/// Peers told apart in one window.
pub const MAX_PEERS: usize = 4096;

/// Who refused calls are counted for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A connection's IP address.
    Ip(IpAddr),
    /// A call with no known peer (a broker served in process, in tests).
    Unknown,
    /// Every peer beyond [`MAX_PEERS`] in this window.
    Other,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Ip(ip) => ip.fmt(f),
            Peer::Unknown => f.write_str("unknown"),
            Peer::Other => f.write_str("other"),
        }
    }
}

/// What to do with one refused call.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Write it as a `call_refused` record.
    Write,
    /// Count it for the peer's summary.
    Count,
}

/// One peer's refused calls that were counted, not written.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    /// The peer.
    pub peer: Peer,
    /// Refused calls not written one by one.
    pub count: u64,
    /// When the window began.
    pub since: SystemTime,
}

#[derive(Debug, Default)]
struct PeerRefusals {
    written: u32,
    counted: u64,
}

/// The per-peer counts of one window.
#[derive(Debug)]
pub struct RefusalTally {
    since: SystemTime,
    peers: HashMap<Peer, PeerRefusals>,
}

impl RefusalTally {
    /// An empty tally whose window begins `now`.
    pub fn new(now: SystemTime) -> Self {
        Self {
            since: now,
            peers: HashMap::new(),
        }
    }

    /// Counts one refused call of `peer`.
    pub fn refused(&mut self, peer: Peer) -> Verdict {
        let key = if self.peers.contains_key(&peer) || self.peers.len() < MAX_PEERS {
            peer
        } else {
            Peer::Other
        };
        let refusals = self.peers.entry(key).or_default();
        if key != Peer::Other && refusals.written < VERBATIM_PER_WINDOW {
            refusals.written += 1;
            Verdict::Write
        } else {
            refusals.counted += 1;
            Verdict::Count
        }
    }

    /// True once the window that began at `since` is over at `now`.
    pub fn window_over(&self, now: SystemTime) -> bool {
        now.duration_since(self.since).unwrap_or_default() >= WINDOW
    }

    /// Ends the window: the summaries of peers with counted refusals, and
    /// a new window beginning `now`.
    pub fn close(&mut self, now: SystemTime) -> Vec<Summary> {
        let since = std::mem::replace(&mut self.since, now);
        let mut summaries: Vec<Summary> = std::mem::take(&mut self.peers)
            .into_iter()
            .filter(|(_, refusals)| refusals.counted > 0)
            .map(|(peer, refusals)| Summary {
                peer,
                count: refusals.counted,
                since,
            })
            .collect();
        summaries.sort_by_key(|s| std::cmp::Reverse(s.count));
        summaries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> Peer {
        Peer::Ip(IpAddr::from(n.to_be_bytes()))
    }

    #[test]
    fn a_flood_from_one_peer_writes_its_first_refusals_then_one_count() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut tally = RefusalTally::new(t0);
        let verdicts: Vec<Verdict> = (0..1_500).map(|_| tally.refused(ip(1))).collect();
        let written = verdicts.iter().filter(|v| **v == Verdict::Write).count();
        assert_eq!(written, VERBATIM_PER_WINDOW as usize);
        assert!(verdicts[..written].iter().all(|v| *v == Verdict::Write));
        // Another peer has its own allowance.
        assert_eq!(tally.refused(ip(2)), Verdict::Write);
        assert!(!tally.window_over(t0 + WINDOW / 2));
        assert!(tally.window_over(t0 + WINDOW));
        let summaries = tally.close(t0 + WINDOW);
        assert_eq!(
            summaries,
            vec![Summary {
                peer: ip(1),
                count: 1_500 - u64::from(VERBATIM_PER_WINDOW),
                since: t0,
            }]
        );
        // The next window starts afresh.
        assert_eq!(tally.refused(ip(1)), Verdict::Write);
        assert!(tally.close(t0 + 2 * WINDOW).is_empty());
    }

    #[test]
    fn peers_beyond_the_bound_are_counted_together() {
        let t0 = SystemTime::UNIX_EPOCH;
        let mut tally = RefusalTally::new(t0);
        for n in 0..MAX_PEERS as u32 {
            assert_eq!(tally.refused(ip(n)), Verdict::Write);
        }
        for n in 0..1_000 {
            assert_eq!(tally.refused(ip(1_000_000 + n)), Verdict::Count);
        }
        // A peer already told apart keeps its own allowance.
        assert_eq!(tally.refused(ip(0)), Verdict::Write);
        assert_eq!(tally.peers.len(), MAX_PEERS + 1);
        let summaries = tally.close(t0 + WINDOW);
        assert_eq!(summaries.len(), 1);
        assert_eq!(
            (summaries[0].peer, summaries[0].count),
            (Peer::Other, 1_000)
        );
    }
}
