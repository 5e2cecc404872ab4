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
//! [`record`] does nothing.
//!
//! **What a hostile peer can make it write.** Text a client chose (a
//! refused call's path, names and ids) is written under one rule,
//! `credstream_proto::rules::text::printable`, cut at
//! [`MAX_CLIENT_TEXT_BYTES`]. Refused calls, which anyone can make without a
//! token, are written one by one only up to a few per peer address a minute,
//! then counted into one `call_refused_summary` record per peer
//! ([`refusals`]).
//!
//! **It never holds the broker.** [`record`] serialises the line and queues
//! it; a thread of its own writes it ([`writer`]). A line is so written
//! shortly after the answer it describes, not before it; lines keep their
//! order. When the output stalls the queue fills and further records are
//! dropped and counted (`credstream_audit_records_dropped_total`, a
//! warning, then a `records_dropped` record), never waited for. [`reopen`]
//! (on `SIGHUP`) opens the file again for logrotate, and [`finish`] writes
//! what is queued when the broker stops.

pub mod refusals;
pub mod writer;

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use serde::{Serialize, Serializer};

use crate::auth::TokenId;
use crate::connections::ConnectionInfo;
use refusals::{Peer, Verdict};
use writer::{Target, Trail};

static TRAIL: OnceLock<&'static Trail> = OnceLock::new();

/// The longest client-chosen text written to the trail, in bytes (longer
/// text is cut, with `…` marking the cut).
pub const MAX_CLIENT_TEXT_BYTES: usize = 256;

/// Where the trail goes: `-` for stdout, else a file (appended to, created
/// with mode 0600). Starts the writing thread.
pub fn install(target: &str) -> std::io::Result<()> {
    if TRAIL.get().is_some() {
        return Err(std::io::Error::other(
            "the audit trail is already installed",
        ));
    }
    let target = match target {
        "-" => Target::Stdout,
        path => Target::File(path.into()),
    };
    TRAIL
        .set(Trail::start(target)?)
        .map_err(|_| std::io::Error::other("the audit trail is already installed"))
}

/// Records dropped so far because the trail's output did not keep up or
/// failed (0 without a trail).
pub fn dropped() -> u64 {
    TRAIL.get().map_or(0, |trail| trail.dropped())
}

/// Opens the trail's file again by its path, after what is queued (for
/// logrotate; the broker does on `SIGHUP`). Nothing to do for stdout.
pub fn reopen() {
    if let Some(trail) = TRAIL.get() {
        trail.reopen();
    }
}

/// Writes the refusal summaries and what is queued, waiting at most
/// `grace`; false if the output did not take it all in time.
pub fn finish(grace: Duration) -> bool {
    TRAIL.get().is_none_or(|trail| trail.finish(grace))
}

/// Client-chosen text as the trail writes it (see the module doc).
fn client_text<S: Serializer>(text: &&str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&credstream_proto::rules::text::printable(
        text,
        MAX_CLIENT_TEXT_BYTES,
    ))
}

fn client_text_opt<S: Serializer>(text: &Option<&str>, serializer: S) -> Result<S::Ok, S::Error> {
    match text {
        Some(text) => client_text(text, serializer),
        None => serializer.serialize_none(),
    }
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
        #[serde(serialize_with = "client_text")]
        cluster: &'a str,
        /// Its display name.
        #[serde(serialize_with = "client_text")]
        publisher_name: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A publisher's stream ended because another took the cluster.
    PublisherTakenOver {
        /// The cluster.
        #[serde(serialize_with = "client_text")]
        cluster: &'a str,
        /// The displaced publisher's name.
        #[serde(serialize_with = "client_text")]
        publisher_name: &'a str,
        /// Who was displaced.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A publisher's stream ended.
    PublisherGone {
        /// The cluster.
        #[serde(serialize_with = "client_text")]
        cluster: &'a str,
        /// Its display name.
        #[serde(serialize_with = "client_text")]
        publisher_name: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// A credential was accepted and fanned out.
    CredentialPublished {
        /// The cluster.
        #[serde(serialize_with = "client_text")]
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
        #[serde(serialize_with = "client_text")]
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
        #[serde(serialize_with = "client_text")]
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
        #[serde(serialize_with = "client_text")]
        cluster: &'a str,
        /// The agent.
        #[serde(serialize_with = "client_text")]
        agent_id: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// An agent's stream ended.
    AgentGone {
        /// The cluster.
        #[serde(serialize_with = "client_text")]
        cluster: &'a str,
        /// The agent.
        #[serde(serialize_with = "client_text")]
        agent_id: &'a str,
        /// Who.
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// The publisher revoked credentials.
    Revoked {
        /// The cluster.
        #[serde(serialize_with = "client_text")]
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
        #[serde(serialize_with = "client_text")]
        cluster: &'a str,
        /// The agent it is bound to, if any.
        #[serde(
            skip_serializing_if = "Option::is_none",
            serialize_with = "client_text_opt"
        )]
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
        /// The gRPC method, as the client sent it (cut, see the module
        /// doc).
        #[serde(serialize_with = "client_text")]
        path: &'a str,
        /// The status code.
        code: String,
        /// Who (a token id only if the token was valid).
        #[serde(flatten)]
        caller: &'a Caller,
    },
    /// Refused calls of one peer that were counted, not written one by one
    /// (see [`refusals`]): one record per peer and window.
    CallRefusedSummary {
        /// The peer's IP address (`other` for peers beyond the tracked
        /// number, `unknown` without one).
        peer: String,
        /// Refused calls not written as `call_refused` records.
        count: u64,
        /// When the window began.
        since: String,
    },
    /// Records the trail could not write (its output stalled or failed).
    RecordsDropped {
        /// Dropped since the last such record.
        count: u64,
        /// Dropped since the broker started.
        total: u64,
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
    TRAIL.get().is_some()
}

/// `event` as one line of the trail, ending in `\n`.
fn line(event: &Event<'_>) -> Vec<u8> {
    let line = Line {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        event,
    };
    let mut text = serde_json::to_vec(&line).expect("audit events serialize");
    text.push(b'\n');
    text
}

/// Queues `event`, if the trail is installed. Never blocks and never
/// fails: a record the trail cannot take is counted (see the module doc).
pub fn record(event: Event<'_>) {
    if let Some(trail) = TRAIL.get() {
        trail.send(line(&event));
    }
}

/// Records a call refused before it reached a service: written as
/// `call_refused` while its peer is within its allowance, else counted for
/// the peer's summary.
pub fn call_refused(path: &str, code: tonic::Code, extensions: &http::Extensions) {
    let Some(trail) = TRAIL.get() else {
        return;
    };
    let peer = extensions
        .get::<ConnectionInfo>()
        .and_then(|info| info.peer)
        .map_or(Peer::Unknown, |peer| Peer::Ip(canonical_ip(peer.ip())));
    if trail.refused(peer) == Verdict::Write {
        trail.send(line(&Event::CallRefused {
            path,
            code: format!("{code:?}"),
            caller: &Caller::of(extensions),
        }));
    }
}

/// An IPv4 peer on a dual-stack socket is one peer, however it is spelt.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
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
            r#"{"ts":"t","event":"agent_subscribed","cluster":"c","agent_id":"w\\u{a}1","peer":"127.0.0.1:1","token_id":"abc"}"#
        );
    }

    #[test]
    fn client_chosen_text_is_printable_and_cut() {
        let path = format!(
            "/credstream.v1.AgentService/{}\u{1b}[2J",
            "A".repeat(10_000)
        );
        let text = String::from_utf8(line(&Event::CallRefused {
            path: &path,
            code: "Unauthenticated".into(),
            caller: &Caller::default(),
        }))
        .unwrap();
        let record: serde_json::Value = serde_json::from_str(&text).unwrap();
        let written = record["path"].as_str().unwrap();
        assert!(
            written.len() <= MAX_CLIENT_TEXT_BYTES + "…".len(),
            "{written}"
        );
        assert!(written.starts_with("/credstream.v1.AgentService/AAA"));
        assert!(written.ends_with('…'), "{written}");
        assert!(text.len() < 2 * MAX_CLIENT_TEXT_BYTES, "{text}");
        let escaped = String::from_utf8(line(&Event::CallRefused {
            path: "/x\u{1b}[2J",
            code: "Unauthenticated".into(),
            caller: &Caller::default(),
        }))
        .unwrap();
        assert!(escaped.contains(r#""path":"/x\\u{1b}[2J""#), "{escaped}");
    }
}
