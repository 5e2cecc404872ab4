//! How many local requests each version served: the agent's half of the
//! audit trail. The broker's audit log says which agents *held* a version;
//! this says how much each one was *used*, so that an operator can tell a
//! credential that reached a worker from one that was read there.
//!
//! One counter per served item (the AWS credential, the GCP token, the
//! private env over `/env`), keyed by the broker version being served. A
//! version's count is logged once, when it stops being served: a newer
//! version or a revocation replaced it, or the agent stopped
//! ([`ServedTally::log_all`]). The line names the item, the version and the
//! count, never anything served.
//!
//! A request that read the state just before a swap may be recorded after
//! it, against a version already logged; it is not counted (counts are a
//! floor, never inflated).

use std::sync::Mutex;

/// What a local request was served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// `GET /aws/credentials`.
    Aws,
    /// A GCE metadata token request.
    Gcp,
    /// `GET /env`.
    Env,
}

impl Served {
    const ALL: [Served; 3] = [Served::Aws, Served::Gcp, Served::Env];

    fn index(self) -> usize {
        match self {
            Served::Aws => 0,
            Served::Gcp => 1,
            Served::Env => 2,
        }
    }

    /// The name in the log line.
    pub fn name(self) -> &'static str {
        match self {
            Served::Aws => "aws",
            Served::Gcp => "gcp",
            Served::Env => "env",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Count {
    /// 0: nothing held yet, or the last held version was logged.
    version: u64,
    served: u64,
}

/// The per-version request counts; cheap to share (one small lock, held
/// for an increment).
#[derive(Debug, Default)]
pub struct ServedTally {
    counts: Mutex<[Count; 3]>,
}

impl ServedTally {
    /// Counts one request answered with `version` of `item`.
    pub fn record(&self, item: Served, version: u64) {
        let retired = {
            let mut counts = self.lock();
            let count = &mut counts[item.index()];
            if version == count.version {
                count.served += 1;
                None
            } else if version > count.version {
                let old = std::mem::replace(count, Count { version, served: 1 });
                Some(old)
            } else {
                None
            }
        };
        if let Some(old) = retired {
            log(item, old);
        }
    }

    /// `item` now holds `version` (0: nothing, after a revocation): the
    /// count of the version it replaces is logged, once.
    pub fn replaced(&self, item: Served, version: u64) {
        let retired = {
            let mut counts = self.lock();
            let count = &mut counts[item.index()];
            if version > count.version || version == 0 {
                Some(std::mem::replace(count, Count { version, served: 0 }))
            } else {
                None
            }
        };
        if let Some(old) = retired {
            log(item, old);
        }
    }

    /// How many requests the version of `item` currently counted served:
    /// `(version, served)`.
    pub fn current(&self, item: Served) -> (u64, u64) {
        let count = self.lock()[item.index()];
        (count.version, count.served)
    }

    /// Logs every version still counted (the agent is stopping).
    pub fn log_all(&self) {
        for item in Served::ALL {
            self.replaced(item, 0);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Count; 3]> {
        // A panic while holding it cannot leave a count inconsistent.
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn log(item: Served, count: Count) {
    if count.version == 0 {
        return;
    }
    tracing::info!(
        item = item.name(),
        version = count.version,
        served = count.served,
        "{} version {} served {} local request{}",
        item.name(),
        count.version,
        count.served,
        if count.served == 1 { "" } else { "s" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_counts_its_requests_until_it_is_replaced() {
        let tally = ServedTally::default();
        tally.replaced(Served::Aws, 3);
        for _ in 0..4 {
            tally.record(Served::Aws, 3);
        }
        assert_eq!(tally.current(Served::Aws), (3, 4));
        tally.replaced(Served::Aws, 5);
        assert_eq!(tally.current(Served::Aws), (5, 0));
        // A request that read version 3 before the swap is not counted.
        tally.record(Served::Aws, 3);
        assert_eq!(tally.current(Served::Aws), (5, 0));
        tally.record(Served::Aws, 5);
        assert_eq!(tally.current(Served::Aws), (5, 1));
        assert_eq!(tally.current(Served::Gcp), (0, 0));
    }

    #[test]
    fn a_request_for_a_newer_version_starts_its_count_before_the_store_says_so() {
        let tally = ServedTally::default();
        tally.replaced(Served::Env, 1);
        tally.record(Served::Env, 2);
        tally.replaced(Served::Env, 2);
        assert_eq!(tally.current(Served::Env), (2, 1));
    }

    #[test]
    fn a_revocation_ends_the_count() {
        let tally = ServedTally::default();
        tally.record(Served::Gcp, 7);
        tally.replaced(Served::Gcp, 0);
        assert_eq!(tally.current(Served::Gcp), (0, 0));
    }
}
