//! What the CLI prints: event lines on stdout, plus a live status line
//! (rewritten in place) when stdout is a terminal; and how times, kinds and
//! reasons read.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use credstream_proto::v1::{CredentialKind, RefreshReason};

/// Writes event lines; on a terminal also keeps one status line at the
/// bottom, redrawn after every event line.
pub struct Printer {
    live: bool,
    status: Option<String>,
}

const CLEAR_LINE: &str = "\r\x1b[2K";

impl Printer {
    /// A printer for stdout; live only when stdout is a terminal.
    pub fn stdout() -> Self {
        Self {
            live: std::io::stdout().is_terminal(),
            status: None,
        }
    }

    /// Prints one event line.
    pub fn line(&mut self, text: impl std::fmt::Display) {
        let mut out = std::io::stdout().lock();
        if self.live && self.status.is_some() {
            let _ = write!(out, "{CLEAR_LINE}");
        }
        let _ = writeln!(out, "{text}");
        if self.live
            && let Some(status) = &self.status
        {
            let _ = write!(out, "{status}");
        }
        let _ = out.flush();
    }

    /// Replaces the live status line (terminal only; a no-op otherwise).
    pub fn status(&mut self, text: String) {
        if !self.live {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{CLEAR_LINE}{text}");
        let _ = out.flush();
        self.status = Some(text);
    }

    /// Removes the status line (before exiting or writing to stderr).
    pub fn finish(&mut self) {
        if self.live && self.status.take().is_some() {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{CLEAR_LINE}");
            let _ = out.flush();
        }
    }
}

impl Drop for Printer {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `AWS` / `GCP`.
pub fn kind_name(kind: CredentialKind) -> &'static str {
    kind.provider()
}

/// The kind of a raw enum value, as [`kind_name`] prints it.
pub fn kind_name_raw(kind: i32) -> &'static str {
    CredentialKind::try_from(kind)
        .map(CredentialKind::provider)
        .unwrap_or("unknown")
}

/// Why a refresh was asked for, in words.
pub fn reason_name(reason: RefreshReason) -> &'static str {
    match reason {
        RefreshReason::Expiring => "expiring",
        RefreshReason::AgentRequested => "an agent asked",
        RefreshReason::Missing => "missing",
        RefreshReason::Unspecified => "unspecified",
    }
}

/// The reason of a raw enum value, as [`reason_name`] prints it.
pub fn reason_name_raw(reason: i32) -> &'static str {
    RefreshReason::try_from(reason)
        .map(reason_name)
        .unwrap_or("unknown")
}

/// `2026-11-26T14:00:00Z (in 11h 59m)`.
pub fn time_and_distance(at: SystemTime) -> String {
    format!(
        "{} ({})",
        humantime::format_rfc3339_seconds(at),
        distance(at, SystemTime::now())
    )
}

/// `in 11h 59m` or `3m 5s ago`, to the minute above an hour and to the
/// second below.
pub fn distance(at: SystemTime, now: SystemTime) -> String {
    let (span, future) = match at.duration_since(now) {
        Ok(span) => (span, true),
        Err(past) => (past.duration(), false),
    };
    let seconds = span.as_secs();
    let rounded = if seconds >= 3600 {
        Duration::from_secs(seconds / 60 * 60)
    } else {
        Duration::from_secs(seconds)
    };
    let text = humantime::format_duration(rounded).to_string();
    if seconds == 0 {
        "now".to_owned()
    } else if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances_read_naturally() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let later = |s| now + Duration::from_secs(s);
        assert_eq!(distance(later(12 * 3600 - 1), now), "in 11h 59m");
        assert_eq!(distance(later(65), now), "in 1m 5s");
        assert_eq!(distance(now, now), "now");
        assert_eq!(distance(now - Duration::from_secs(90), now), "1m 30s ago");
    }

    #[test]
    fn kinds_and_reasons_have_names() {
        assert_eq!(kind_name_raw(CredentialKind::Aws as i32), "AWS");
        assert_eq!(kind_name_raw(99), "unknown");
        assert_eq!(
            reason_name_raw(RefreshReason::AgentRequested as i32),
            "an agent asked"
        );
    }
}
