//! The audit trail of `--audit-log FILE|-`: one JSON object per line, one
//! line per event, never a secret value. Each line has `ts` (RFC 3339, UTC,
//! milliseconds) and `event`, then the event's fields (see [`Event`]).
//!
//! Tokens are named by their id: the first 12 hex digits of the SHA-256 of
//! the token's text (see [`TokenId`]), which anyone holding the token can
//! compute (`printf %s "$TOKEN" | sha256sum | cut -c1-12`) and which reveals
//! nothing of it. Peers are `ip:port`.
//!
//! The trail is process-wide, like the log subscriber: [`install`] it once
//! at start; until then (and in tests that run brokers in process)
//! [`record`] does nothing. Every line is written and flushed before
//! `record` returns, so a line is on disk before the answer it describes
//! leaves the broker.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use serde::Serialize;

use crate::auth::TokenId;
use crate::connections::ConnectionInfo;

static SINK: OnceLock<Mutex<Box<dyn Write + Send>>> = OnceLock::new();

/// Where the trail goes: `-` for stdout, else a file (appended to, created
/// with mode 0600).
pub fn install(target: &str) -> io::Result<()> {
    let sink: Box<dyn Write + Send> = if target == "-" {
        Box::new(io::stdout())
    } else {
        use std::os::unix::fs::OpenOptionsExt;
        Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(Path::new(target))?,
        )
    };
    SINK.set(Mutex::new(sink))
        .map_err(|_| io::Error::other("the audit trail is already installed"))
}

/// Who made a call: its peer and its token's id, from the request's
/// extensions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Caller {
    /// `ip:port` of the connection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The verified token's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
}

impl Caller {
    /// The caller of `extensions`' request.
    pub fn of(extensions: &http::Extensions) -> Self {
        Self {
            peer: extensions
                .get::<ConnectionInfo>()
                .and_then(|info| info.peer)
                .map(|peer| peer.to_string()),
            token_id: extensions.get::<TokenId>().map(|id| format!("{id:?}")),
        }
    }
}

/// One audited event.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    /// A publisher's hello was accepted.
    PublisherConnected {
        /// The cluster.
        cluster: &'a str,
        /// Its display name.
        publisher_name: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A publisher's stream ended because another took the cluster.
    PublisherTakenOver {
        /// The cluster.
        cluster: &'a str,
        /// The displaced publisher's name.
        publisher_name: &'a str,
        /// Who was displaced.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A publisher's stream ended.
    PublisherGone {
        /// The cluster.
        cluster: &'a str,
        /// Its display name.
        publisher_name: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A credential was accepted and fanned out.
    CredentialPublished {
        /// The cluster.
        cluster: &'a str,
        /// `aws` or `gcp`.
        kind: &'a str,
        /// The AWS principal ARN or GCP email (empty when not known).
        principal: &'a str,
        /// The AWS account or GCP project.
        account: &'a str,
        /// The cluster version it became.
        version: u64,
        /// When it was minted.
        issued_at: String,
        /// When it expires.
        expires_at: String,
    },
    /// A private env change was accepted (names only in the count).
    PrivateEnvPublished {
        /// The cluster.
        cluster: &'a str,
        /// The cluster version it became.
        version: u64,
        /// Variables set by the change.
        set: usize,
        /// Variables removed by the change.
        unset: usize,
    },
    /// How far a version has reached (at most one line a second per
    /// publisher stream, as the tally changes).
    Delivery {
        /// The cluster.
        cluster: &'a str,
        /// The latest version.
        version: u64,
        /// Connected agents that acknowledged it.
        agents_holding: u32,
        /// Connected agents.
        agents_connected: u32,
    },
    /// An agent's hello was accepted.
    AgentSubscribed {
        /// The cluster.
        cluster: &'a str,
        /// The agent.
        agent_id: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// An agent's stream ended.
    AgentGone {
        /// The cluster.
        cluster: &'a str,
        /// The agent.
        agent_id: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// The publisher revoked credentials.
    Revoked {
        /// The cluster.
        cluster: &'a str,
        /// The version the revocation became.
        version: u64,
        /// The kinds revoked.
        kinds: Vec<&'a str>,
        /// Whether the private env went too.
        all: bool,
    },
    /// `CreateAgentToken` issued a token.
    TokenIssued {
        /// Always `agent`.
        role: &'a str,
        /// The cluster.
        cluster: &'a str,
        /// The agent it is bound to, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent_id: Option<&'a str>,
        /// Its lifetime.
        ttl_seconds: u64,
        /// The new token's id.
        issued_token_id: String,
        /// Who asked (the issuer's token id is `token_id`).
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A call was refused before it reached a service (authentication or
    /// a call limit).
    CallRefused {
        /// The gRPC method.
        path: &'a str,
        /// The status code.
        code: String,
        /// Who (a token id only if the token was valid).
        #[serde(flatten)]
        caller: &'a Caller,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    #[serde(flatten)]
    event: &'a Event<'a>,
}

/// True once [`install`]ed.
pub fn enabled() -> bool {
    SINK.get().is_some()
}

/// Writes `event`, if the trail is installed. A write error is logged,
/// never returned: auditing must not take the broker down, and the log
/// says the trail has a gap.
pub fn record(event: Event<'_>) {
    let Some(sink) = SINK.get() else {
        return;
    };
    let line = Line {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        event: &event,
    };
    let mut text = serde_json::to_vec(&line).expect("audit events serialize");
    text.push(b'\n');
    let mut sink = sink.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(error) = sink.write_all(&text).and_then(|()| sink.flush()) {
        tracing::warn!(%error, "cannot write the audit trail; events are being lost");
    }
}

/// RFC 3339 for a time in an event.
pub fn time(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_flat_json_with_their_name() {
        let caller = Caller {
            peer: Some("127.0.0.1:1".into()),
            token_id: Some("abc".into()),
        };
        let line = Line {
            ts: "t".into(),
            event: &Event::AgentSubscribed {
                cluster: "c",
                agent_id: "w\n1",
                caller: &caller,
            },
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"ts":"t","event":"agent_subscribed","cluster":"c","agent_id":"w\n1","peer":"127.0.0.1:1","token_id":"abc"}"#
        );
    }
}
