//! What the agent refused from its broker: counted, remembered (the last
//! reason, for `/readyz`) and logged without letting the broker choose how
//! much the agent writes.
//!
//! A broker decides how often it sends something the agent refuses and
//! what the refused item says. So every reason passes the one printable-text
//! rule ([`credstream_proto::rules::text::printable`], cut at
//! [`REASON_MAX`] bytes, control characters escaped) before it reaches a log
//! line or `/readyz`; and the log takes the first [`FIRST_LOGGED`] refusals
//! of each [`SUMMARY_EVERY`] window one by one, counts the rest, and writes
//! one summary line for them (`refused K more updates from the broker since
//! T`) once the window is over: at the next refusal, or at the next
//! [`Refusals::flush`] (the subscription calls it on its hint timer), so
//! that a flood that stopped is still reported. However many refusals a
//! broker causes, the agent writes at most `FIRST_LOGGED + 1` lines per
//! window, each of bounded length.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use credstream_proto::rules::text::printable;
use tokio::time::Instant;

/// The longest reason logged or shown, in bytes (before the cut marker).
pub const REASON_MAX: usize = 320;

/// Refusals logged one by one per window.
pub const FIRST_LOGGED: u32 = 10;

/// The window after which the refusals not logged one by one are summed up.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Refusals counted, the last reason, and the log's window.
#[derive(Debug, Default)]
pub struct Refusals {
    total: AtomicU64,
    last: Mutex<Option<String>>,
    window: Mutex<Window>,
    /// The count, for waits that report the refusals as they happen.
    changes: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct Window {
    /// When the current window started (`None`: no refusal yet).
    started: Option<Instant>,
    /// Logged one by one in it.
    logged: u32,
    /// Not logged one by one in it, and since when (wall clock).
    suppressed: u64,
    since: Option<SystemTime>,
}

impl Window {
    /// Ends the window if it is over at `now`, returning what it held back.
    fn roll(&mut self, now: Instant) -> Option<(u64, SystemTime)> {
        let started = self.started?;
        if now.duration_since(started) < SUMMARY_EVERY {
            return None;
        }
        let held_back = self.since.take().map(|since| (self.suppressed, since));
        *self = Window::default();
        held_back
    }
}

impl Refusals {
    /// How many items were refused so far.
    pub fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The last refusal: what, its broker version and why (printable and
    /// bounded; never content).
    pub fn last(&self) -> Option<String> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A receiver of the count, which changes with every refusal (after
    /// [`Refusals::last`] does).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records one refusal of `what` at broker `version` (0 when the item
    /// had none) because of `reason`, which may hold text the broker chose,
    /// and logs it unless the window's quota is spent.
    pub fn record(&self, what: &str, version: u64, reason: &str) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let reason = printable(reason, REASON_MAX);
        let line = format!("{what} version {version}: {reason}");
        let now = Instant::now();
        let (summary, log) = {
            let mut window = self.window.lock().unwrap_or_else(|e| e.into_inner());
            let summary = window.roll(now);
            let window = &mut *window;
            window.started.get_or_insert(now);
            let log = window.logged < FIRST_LOGGED;
            if log {
                window.logged += 1;
            } else {
                window.suppressed += 1;
                window.since.get_or_insert_with(SystemTime::now);
            }
            (summary, log)
        };
        let previous = self
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(line);
        self.changes.send_replace(self.count());
        if let Some((count, since)) = summary {
            log_summary(count, since, previous.as_deref());
        }
        if log {
            tracing::warn!(
                item = what,
                version,
                reason = %reason,
                "refused an update from the broker; keeping the last good one"
            );
        }
    }

    /// Writes the summary of a window that is over, if it held anything
    /// back (called periodically, so that a flood that stopped is reported).
    pub fn flush(&self) {
        let summary = self
            .window
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .roll(Instant::now());
        if let Some((count, since)) = summary {
            log_summary(count, since, self.last().as_deref());
        }
    }
}

fn log_summary(count: u64, since: SystemTime, last: Option<&str>) {
    tracing::warn!(
        refused = count,
        since = %humantime::format_rfc3339_seconds(since),
        last = last.unwrap_or_default(),
        "refused {count} more updates from the broker since {} (not logged one by one); keeping the last good ones",
        humantime::format_rfc3339_seconds(since)
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log lines written while `capture` is alive, as the binary formats
    /// them (without colours).
    #[derive(Clone, Default)]
    pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        pub(crate) fn lines(&self) -> Vec<String> {
            String::from_utf8_lossy(&self.0.lock().unwrap())
                .lines()
                .map(str::to_owned)
                .collect()
        }

        pub(crate) fn install(&self) -> tracing::subscriber::DefaultGuard {
            let sink = self.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_writer(move || sink.clone())
                .with_max_level(tracing::Level::INFO)
                .finish();
            tracing::subscriber::set_default(subscriber)
        }
    }

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_logged_as_the_first_few_then_one_summary_per_window() {
        let captured = Captured::default();
        let _guard = captured.install();
        let refusals = Refusals::default();
        let hostile = format!("evil\n\u{1b}[2J{}", "x".repeat(1 << 20));
        for version in 1..=1000 {
            refusals.record("aws credential", version, &hostile);
        }
        let lines = captured.lines();
        assert_eq!(lines.len(), FIRST_LOGGED as usize, "{lines:#?}");
        for line in &lines {
            assert!(line.contains("refused an update from the broker"), "{line}");
            assert!(line.len() < REASON_MAX + 300, "{} bytes", line.len());
            assert!(line.contains("evil\\u{a}\\u{1b}[2J"), "{line}");
        }
        assert_eq!(refusals.count(), 1000);
        let last = refusals.last().unwrap();
        assert!(last.starts_with("aws credential version 1000: evil\\u{a}"));
        assert!(last.len() < REASON_MAX + 50);

        // Within the window nothing more is written, not even by a flush.
        tokio::time::advance(SUMMARY_EVERY / 2).await;
        refusals.flush();
        assert_eq!(captured.lines().len(), FIRST_LOGGED as usize);

        // Once it is over, the flush sums up what was held back, once.
        tokio::time::advance(SUMMARY_EVERY / 2).await;
        refusals.flush();
        refusals.flush();
        let lines = captured.lines();
        assert_eq!(lines.len(), FIRST_LOGGED as usize + 1, "{lines:#?}");
        let summary = lines.last().unwrap();
        assert!(
            summary.contains("refused 990 more updates from the broker since"),
            "{summary}"
        );
        assert!(
            summary.len() < 2 * REASON_MAX + 400,
            "{} bytes",
            summary.len()
        );

        // A new window logs its first ones again.
        refusals.record("env", 1001, "short");
        let lines = captured.lines();
        assert_eq!(lines.len(), FIRST_LOGGED as usize + 2);
        assert!(lines.last().unwrap().contains("reason=short"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_refusal_after_a_window_reports_what_it_held_back() {
        let captured = Captured::default();
        let _guard = captured.install();
        let refusals = Refusals::default();
        for version in 0..u64::from(FIRST_LOGGED) + 5 {
            refusals.record("gcp credential", version, "forged");
        }
        tokio::time::advance(SUMMARY_EVERY).await;
        refusals.record("gcp credential", 99, "forged");
        let lines = captured.lines();
        assert_eq!(lines.len(), FIRST_LOGGED as usize + 2, "{lines:#?}");
        assert!(lines[FIRST_LOGGED as usize].contains("refused 5 more updates"));
        assert!(lines[FIRST_LOGGED as usize + 1].contains("version=99"));
    }
}
