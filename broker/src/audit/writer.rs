//! The trail's writer: a bounded queue of lines and one thread of its own
//! that writes them, so that a slow or stalled output (a full disk, a
//! `--audit-log -` pipe nobody reads) never holds a serving thread.
//!
//! - [`Trail::send`] never blocks: a line that finds the queue full is
//!   dropped and counted ([`Trail::dropped`], the metric
//!   `credstream_audit_records_dropped_total`), with a warning at most every
//!   [`WARN_INTERVAL`]. Once the output takes lines again the thread writes
//!   a `records_dropped` record with the count, so the gap is in the trail
//!   itself.
//! - Lines are written in the order they were queued, in batches, flushed
//!   whenever the queue is empty.
//! - [`Trail::reopen`] (the broker calls it on `SIGHUP`) makes the thread
//!   open the file again by its path, for logrotate: after a rename, new
//!   lines go to a fresh file (mode 0600) at the original path. If it cannot
//!   be opened, the thread warns and keeps the file it has.
//! - The thread also ends the refusal windows ([`super::refusals`]) and
//!   writes their summaries; [`Trail::finish`] writes what is left and
//!   waits, at most a grace period, for the queue to be written.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use super::refusals::{Peer, RefusalTally, Verdict};

/// Lines the queue holds (each at most a few KiB: client-chosen fields are
/// cut, see [`super::MAX_CLIENT_TEXT_BYTES`]).
pub const QUEUE_LINES: usize = 1024;
/// A full queue or a failing output is warned about at most this often.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);
/// How often the thread looks at the refusal window when idle.
const TICK: Duration = Duration::from_secs(1);

/// Where lines go.
#[derive(Clone, Debug)]
pub enum Target {
    /// Standard output (`--audit-log -`).
    Stdout,
    /// A file, appended to, created with mode 0600.
    File(PathBuf),
}

enum Item {
    Line(Vec<u8>),
    /// Open the file again, after the lines queued before.
    Reopen,
    Wake,
}

/// The queue, its counters and the writing thread's controls.
#[derive(Debug)]
pub struct Trail {
    queue: SyncSender<Item>,
    dropped: AtomicU64,
    last_warned: Mutex<Option<Instant>>,
    reopen: AtomicBool,
    stop: AtomicBool,
    refusals: Mutex<RefusalTally>,
    done: Mutex<Option<Receiver<()>>>,
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Line(line) => write!(f, "Line({} bytes)", line.len()),
            Item::Reopen => f.write_str("Reopen"),
            Item::Wake => f.write_str("Wake"),
        }
    }
}

fn open(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl Trail {
    /// Opens `target` (the error is the caller's to report: the broker
    /// does not start with a trail it cannot write) and starts the thread.
    pub fn start(target: Target) -> io::Result<&'static Trail> {
        let sink: Box<dyn Write + Send> = match &target {
            Target::Stdout => Box::new(io::stdout()),
            Target::File(path) => Box::new(open(path)?),
        };
        let reopen_path = match target {
            Target::Stdout => None,
            Target::File(path) => Some(path),
        };
        Self::start_with(sink, reopen_path)
    }

    /// Starts the thread writing to `sink`; [`reopen`](Self::reopen) opens
    /// `reopen_path` in its place. The trail lives as long as the process.
    pub fn start_with(
        sink: Box<dyn Write + Send>,
        reopen_path: Option<PathBuf>,
    ) -> io::Result<&'static Trail> {
        let (queue, lines) = mpsc::sync_channel(QUEUE_LINES);
        let (done_tx, done) = mpsc::channel();
        let trail: &'static Trail = Box::leak(Box::new(Trail {
            queue,
            dropped: AtomicU64::new(0),
            last_warned: Mutex::new(None),
            reopen: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            refusals: Mutex::new(RefusalTally::new(SystemTime::now())),
            done: Mutex::new(Some(done)),
        }));
        let mut writer = Writer {
            trail,
            out: BufWriter::new(sink),
            path: reopen_path,
            reported_dropped: 0,
        };
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                writer.run(lines);
                let _ = done_tx.send(());
            })?;
        Ok(trail)
    }

    /// Queues one line (ending in `\n`), or drops and counts it if the
    /// queue is full. Never blocks.
    pub fn send(&self, line: Vec<u8>) {
        match self.queue.try_send(Item::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.lost(
                "the audit trail's output is not keeping up (stalled or slow); records are being dropped",
                None,
            ),
            // The thread has finished: the broker is stopping.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Counts one lost record and warns, at most every [`WARN_INTERVAL`].
    fn lost(&self, message: &str, error: Option<&io::Error>) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_warned.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= WARN_INTERVAL) {
            *last = Some(Instant::now());
            match error {
                Some(error) => tracing::warn!(%error, dropped, "{message}"),
                None => tracing::warn!(dropped, "{message}"),
            }
        }
    }

    /// Records lost so far (queue full or output failing).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts a refused call of `peer`: whether to write it one by one.
    pub fn refused(&self, peer: Peer) -> Verdict {
        self.refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refused(peer)
    }

    /// Asks the thread to open the file again by its path, after the
    /// lines already queued (with a full queue: after its current batch).
    pub fn reopen(&self) {
        if self.queue.try_send(Item::Reopen).is_err() {
            // A full queue keeps the thread busy; it looks at the flag
            // after every batch.
            self.reopen.store(true, Ordering::Release);
        }
    }

    /// Writes the refusal summaries and everything queued, then stops the
    /// thread; waits at most `grace` (an output that stalls keeps the rest).
    /// Returns whether the thread finished in time.
    pub fn finish(&self, grace: Duration) -> bool {
        self.stop.store(true, Ordering::Release);
        let _ = self.queue.try_send(Item::Wake);
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
        done.is_some_and(|done| done.recv_timeout(grace).is_ok())
    }
}

struct Writer {
    trail: &'static Trail,
    out: BufWriter<Box<dyn Write + Send>>,
    path: Option<PathBuf>,
    reported_dropped: u64,
}

impl Writer {
    fn run(&mut self, lines: Receiver<Item>) {
        loop {
            match lines.recv_timeout(TICK) {
                Ok(item) => {
                    self.write(item);
                    // The rest of the batch, bounded so that the window
                    // and the flags are looked at under a steady flow.
                    for _ in 0..QUEUE_LINES {
                        match lines.try_recv() {
                            Ok(item) => self.write(item),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let stopping = self.trail.stop.load(Ordering::Acquire);
            self.housekeeping(stopping);
            if stopping {
                while let Ok(item) = lines.try_recv() {
                    self.write(item);
                }
                self.flush();
                return;
            }
        }
    }

    fn write(&mut self, item: Item) {
        match item {
            Item::Line(line) => {
                if let Err(error) = self.out.write_all(&line) {
                    self.trail.lost(
                        "cannot write the audit trail; records are being lost",
                        Some(&error),
                    );
                }
            }
            Item::Reopen => self.reopen(),
            Item::Wake => {}
        }
    }

    fn flush(&mut self) {
        if let Err(error) = self.out.flush() {
            self.trail.lost(
                "cannot write the audit trail; records are being lost",
                Some(&error),
            );
        }
    }

    /// After a batch: the drop report, the refusal summaries, the flush and
    /// a requested reopen.
    fn housekeeping(&mut self, stopping: bool) {
        let dropped = self.trail.dropped();
        if dropped > self.reported_dropped {
            let line = super::line(&super::Event::RecordsDropped {
                count: dropped - self.reported_dropped,
                total: dropped,
            });
            self.reported_dropped = dropped;
            self.write(Item::Line(line));
        }
        let now = SystemTime::now();
        let summaries = {
            let mut tally = self
                .trail
                .refusals
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            (stopping || tally.window_over(now)).then(|| tally.close(now))
        };
        for summary in summaries.into_iter().flatten() {
            let line = super::line(&super::Event::CallRefusedSummary {
                peer: summary.peer.to_string(),
                count: summary.count,
                since: super::time(summary.since),
            });
            self.write(Item::Line(line));
        }
        self.flush();
        if self.trail.reopen.swap(false, Ordering::AcqRel) {
            self.reopen();
        }
    }

    fn reopen(&mut self) {
        self.flush();
        let Some(path) = &self.path else {
            tracing::info!("the audit trail goes to stdout; nothing to reopen");
            return;
        };
        match open(path) {
            Ok(file) => {
                self.out = BufWriter::new(Box::new(file));
                tracing::info!(path = %path.display(), "audit trail reopened");
            }
            Err(error) => tracing::warn!(
                %error,
                path = %path.display(),
                "cannot reopen the audit trail; writing on to the file already open"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_stalled_output_drops_and_counts_lines_without_blocking_the_sender() {
        // A socket nobody reads: its buffer fills, then every write blocks.
        let (stalled, _unread) = UnixStream::pair().unwrap();
        let trail = Trail::start_with(Box::new(stalled), None).unwrap();
        let line = vec![b'x'; 1023]
            .into_iter()
            .chain([b'\n'])
            .collect::<Vec<u8>>();
        let sent = 4 * QUEUE_LINES + 10_000;
        for _ in 0..sent {
            trail.send(line.clone());
        }
        // Every send returned; what neither the socket nor the queue could
        // hold was counted.
        assert!(trail.dropped() > 0);
        assert!(trail.dropped() < sent as u64);
        assert!(
            !trail.finish(Duration::from_millis(1)),
            "the thread is still blocked on the stalled output"
        );
    }

    #[test]
    fn reopen_writes_on_at_the_original_path_after_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let trail = Trail::start(Target::File(path.clone())).unwrap();
        trail.send(b"one\n".to_vec());
        // Whether or not "one" was written yet, it goes to the renamed
        // file: the reopen is queued behind it.
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        trail.reopen();
        trail.send(b"two\n".to_vec());
        assert!(trail.finish(Duration::from_secs(20)));
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(read("audit.jsonl.1"), "one\n");
        assert_eq!(read("audit.jsonl"), "two\n");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
