//! "workers keep access until …": what `credstream publish` says about when
//! the cluster's access ends, and the warning 30 minutes before.
//!
//! The times come from the session ([`PublishSession::watch_access_ends`]):
//! the `access_end` of the last credential of each kind minted and sent. A
//! kind's line is printed when its end is first known and whenever it moves
//! (after `aws sso login`, the next mint carries the new end); the warning
//! is printed once per end, 30 minutes before it (at once if it is nearer).
//!
//! [`PublishSession::watch_access_ends`]: credstream_client::session::PublishSession::watch_access_ends

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use credstream_client::session::AccessEnds;
use credstream_proto::convert::system_time;
use credstream_proto::v1::{AccessEnd, CredentialKind};

use super::output::{distance, kind_name};

/// How long before the end the warning is printed.
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 60);

/// What was said per kind: the end announced, and whether its warning was
/// printed.
#[derive(Debug, Default)]
pub struct AccessView {
    said: BTreeMap<CredentialKind, (SystemTime, String, bool)>,
}

impl AccessView {
    /// The lines to print for the session's current ends at `now`: an
    /// announcement per new or moved end, and the warning for every end
    /// within [`WARN_BEFORE`] not yet warned about.
    pub fn update(&mut self, ends: &AccessEnds, now: SystemTime) -> Vec<String> {
        let mut lines = Vec::new();
        self.said.retain(|kind, _| ends.contains_key(kind));
        for (kind, end) in ends {
            let Some((at, reason)) = parts(end) else {
                continue;
            };
            let known = self
                .said
                .get(kind)
                .is_some_and(|(said_at, said_reason, _)| *said_at == at && *said_reason == reason);
            if !known {
                lines.push(announcement(*kind, at, &reason, now));
                self.said.insert(*kind, (at, reason, false));
            }
        }
        lines.extend(self.due(now));
        lines
    }

    /// The warnings due at `now`, each printed once.
    pub fn due(&mut self, now: SystemTime) -> Vec<String> {
        let mut lines = Vec::new();
        for (kind, (at, reason, warned)) in &mut self.said {
            if !*warned && at.duration_since(now).unwrap_or_default() <= WARN_BEFORE {
                *warned = true;
                lines.push(warning(*kind, *at, reason, now));
            }
        }
        lines
    }

    /// When the next warning falls due, if one is pending.
    pub fn next_warning(&self) -> Option<SystemTime> {
        self.said
            .values()
            .filter(|(_, _, warned)| !warned)
            .map(|(at, _, _)| at.checked_sub(WARN_BEFORE).unwrap_or(*at))
            .min()
    }
}

fn parts(end: &AccessEnd) -> Option<(SystemTime, String)> {
    Some((end.at.as_ref().and_then(system_time)?, end.reason.clone()))
}

/// `workers keep AWS access until 17:42 UTC, in 2h 30m (your SSO session
/// ends then)`.
pub fn announcement(kind: CredentialKind, at: SystemTime, reason: &str, now: SystemTime) -> String {
    format!(
        "workers keep {} access until {}, {} ({reason})",
        kind_name(kind),
        clock(at, now),
        distance(at, now)
    )
}

fn warning(kind: CredentialKind, at: SystemTime, reason: &str, now: SystemTime) -> String {
    let when = if at <= now {
        format!("since {}", clock(at, now))
    } else {
        format!("at {}, {}", clock(at, now), distance(at, now))
    };
    format!(
        "warning: workers lose {} access {when} ({reason}): log in again before then (`aws sso login`, or renew the credentials credstream publish was started with, then restart it)",
        kind_name(kind)
    )
}

/// `17:42 UTC` on the same UTC day as `now`, else `2026-12-02 09:00 UTC`.
pub fn clock(at: SystemTime, now: SystemTime) -> String {
    let stamp = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    let (at_text, now_text) = (stamp(at), stamp(now));
    // `YYYY-MM-DDTHH:MM:SSZ`
    if at_text[..10] == now_text[..10] {
        format!("{} UTC", &at_text[11..16])
    } else {
        format!("{} {} UTC", &at_text[..10], &at_text[11..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use credstream_proto::convert::timestamp;

    fn end(at: SystemTime, reason: &str) -> AccessEnd {
        AccessEnd {
            at: Some(timestamp(at)),
            reason: reason.into(),
        }
    }

    #[test]
    fn an_end_is_announced_once_and_warned_about_30_minutes_before() {
        // 2026-12-01T15:12:00Z
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_137_920);
        let at = now + Duration::from_secs(2 * 3600 + 30 * 60);
        let mut view = AccessView::default();
        let mut ends = AccessEnds::new();
        ends.insert(CredentialKind::Aws, end(at, "your SSO session ends then"));
        assert_eq!(
            view.update(&ends, now),
            ["workers keep AWS access until 17:42 UTC, in 2h 30m (your SSO session ends then)"]
        );
        // The same end again (the next mint): nothing new.
        assert!(view.update(&ends, now).is_empty());
        assert_eq!(view.next_warning(), Some(at - WARN_BEFORE));
        assert!(
            view.due(at - WARN_BEFORE - Duration::from_secs(1))
                .is_empty()
        );
        let warned = view.due(at - WARN_BEFORE);
        assert_eq!(warned.len(), 1);
        assert!(
            warned[0].starts_with(
                "warning: workers lose AWS access at 17:42 UTC, in 30m (your SSO session ends then): log in again"
            ),
            "{warned:?}"
        );
        assert!(view.due(at).is_empty(), "warned once");
        assert_eq!(view.next_warning(), None);

        // After `aws sso login` the end moves: announced again, re-armed.
        let later = at + Duration::from_secs(8 * 3600);
        ends.insert(
            CredentialKind::Aws,
            end(later, "your SSO session ends then"),
        );
        let lines = view.update(&ends, at - Duration::from_secs(60));
        assert_eq!(
            lines,
            [
                "workers keep AWS access until 2026-12-02 01:42 UTC, in 8h 1m (your SSO session ends then)"
            ]
        );
        assert_eq!(view.next_warning(), Some(later - WARN_BEFORE));
    }

    #[test]
    fn a_near_end_is_warned_about_at_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_137_920);
        let mut ends = AccessEnds::new();
        ends.insert(
            CredentialKind::Aws,
            end(
                now + Duration::from_secs(20 * 60),
                "your temporary AWS credentials expire then",
            ),
        );
        let lines = AccessView::default().update(&ends, now);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("workers keep AWS access until 15:32 UTC, in 20m ("));
        assert!(lines[1].starts_with("warning: workers lose AWS access at 15:32 UTC, in 20m ("));
    }
}
