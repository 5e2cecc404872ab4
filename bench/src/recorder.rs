//! Receipt times of one publish across all agents of a run.
//!
//! Each agent owns one slot; receiving the current round stores the time
//! (nanoseconds since the recorder was made) in that slot. No lock: the
//! hot path is one atomic load, one swap and one add.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Receipt times of the current round.
#[derive(Debug)]
pub struct Recorder {
    base: Instant,
    round: AtomicU64,
    received: Vec<AtomicU64>,
    count: AtomicUsize,
    all_in: Notify,
}

/// The outcome of one round.
#[derive(Debug, Default)]
pub struct RoundResult {
    /// Latency of each agent that received the round, in nanoseconds.
    pub latencies_ns: Vec<u64>,
    /// Agents that did not receive it before the timeout.
    pub lost: usize,
}

impl Recorder {
    /// A recorder for `agents` agents.
    pub fn new(agents: usize) -> Self {
        Self {
            base: Instant::now(),
            round: AtomicU64::new(0),
            received: (0..agents).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            all_in: Notify::new(),
        }
    }

    /// How many agents this recorder has slots for.
    pub fn agents(&self) -> usize {
        self.received.len()
    }

    /// Nanoseconds since the recorder was made, never 0 (0 marks "not
    /// received"): the time base of [`Recorder::record_at`].
    pub fn now_ns(&self) -> u64 {
        (self.base.elapsed().as_nanos() as u64).max(1)
    }

    /// Agent `agent` received round `round`.
    pub fn record(&self, agent: usize, round: u64) {
        self.record_at(agent, round, self.now_ns());
    }

    /// Agent `agent` had round `round` at `at` ([`Recorder::now_ns`]'s
    /// base), which may be earlier than now: an agent whose opening is
    /// timed apart records its arrival plus its own opening time.
    pub fn record_at(&self, agent: usize, round: u64, at: u64) {
        if round != self.round.load(Ordering::Acquire) {
            return;
        }
        let now = at.max(1);
        if let Some(slot) = self.received.get(agent)
            && slot
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            && self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.received.len()
        {
            self.all_in.notify_one();
        }
    }

    /// Starts round `round`; returns its start time. Call just before the
    /// publish.
    pub fn begin(&self, round: u64) -> u64 {
        for slot in &self.received {
            slot.store(0, Ordering::Relaxed);
        }
        self.count.store(0, Ordering::Release);
        self.round.store(round, Ordering::Release);
        self.now_ns()
    }

    /// Waits until every agent received the round started at `t0`, or
    /// `timeout`.
    pub async fn finish(&self, t0: u64, timeout: Duration) -> RoundResult {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.count.load(Ordering::Acquire) < self.received.len() {
            let notified = self.all_in.notified();
            if self.count.load(Ordering::Acquire) >= self.received.len() {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        // Late arrivals after this point are not counted.
        self.round.store(0, Ordering::Release);
        let mut result = RoundResult::default();
        for slot in &self.received {
            match slot.load(Ordering::Acquire) {
                0 => result.lost += 1,
                at => result.latencies_ns.push(at.saturating_sub(t0)),
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_each_agent_once_and_the_missing_as_lost() {
        let recorder = Recorder::new(3);
        let t0 = recorder.begin(7);
        recorder.record(0, 7);
        recorder.record(0, 7);
        recorder.record(1, 6);
        recorder.record(2, 7);
        let result = recorder.finish(t0, Duration::from_millis(10)).await;
        assert_eq!(result.latencies_ns.len(), 2);
        assert_eq!(result.lost, 1);
    }
}
