//! A stalled publisher costs one mint per kind, however many refresh
//! deadlines pass while it is stopped (issue 13, item 1).
//!
//! Real parts only: moto's STS (enforcing authentication), a recording
//! proxy in front of it that counts `AssumeRole` calls, the
//! `credstream-broker` and `credstream publish` binaries, and agents
//! speaking the raw protocol. `credstream publish` is SIGSTOPped (its TCP
//! connection stays up, so keepalive never notices), agents ask for a fresh
//! credential, several refresh deadlines pass, then SIGCONT: exactly one
//! more `AssumeRole` call and one new version reach the agents. Before the
//! fix every missed deadline re-issued the request under a new id and the
//! resumed publisher answered each one (11 calls, 11 versions).

use std::time::{Duration, SystemTime};

use credstream_proto::convert::system_time;
use credstream_proto::v1::{
    AgentAck, ClusterStatus, CredentialKind, RefreshHint, RefreshReason, subscribe_request,
    subscribe_response,
};
use credstream_tests::bins::binary;
use credstream_tests::broker::{RawAgent, open_agent};
use credstream_tests::moto::{Moto, laptop_env, seed};
use credstream_tests::processes::{BrokerProcess, PROCESS_WAIT, Process, clean_command};
use credstream_tests::recording_proxy::RecordingProxy;
use credstream_tests::tools;
use tonic::transport::Channel;

/// The broker's refresh deadline in this test: short, so that several pass
/// while the publisher is stopped.
const DEADLINE: Duration = Duration::from_secs(3);

async fn agent(broker: &BrokerProcess, id: &str) -> RawAgent {
    let channel = Channel::from_shared(broker.url.clone())
        .unwrap()
        .connect_lazy();
    open_agent(channel, &broker.agent_token, "dev", id)
        .await
        .expect("agent stream opens")
}

/// The AWS version in `message`, if it carries one.
fn aws_version(message: &subscribe_response::Message) -> Option<u64> {
    match message {
        subscribe_response::Message::Snapshot(s) => s
            .credentials
            .iter()
            .find(|c| c.kind() == CredentialKind::Aws)
            .map(|c| c.version),
        subscribe_response::Message::Credential(c) if c.kind() == CredentialKind::Aws => {
            Some(c.version)
        }
        _ => None,
    }
}

async fn next_aws_version(agent: &mut RawAgent) -> u64 {
    loop {
        let message = agent.expect().await;
        if let Some(version) = aws_version(&message) {
            agent
                .send(subscribe_request::Message::Ack(AgentAck { version }))
                .await;
            return version;
        }
    }
}

async fn hint(agent: &RawAgent, held_version: u64) {
    agent
        .send(subscribe_request::Message::RefreshHint(RefreshHint {
            kind: CredentialKind::Aws as i32,
            held_version,
        }))
        .await;
}

/// Polls `GetCluster` until `accept` holds (or fails after
/// [`PROCESS_WAIT`]).
async fn status_until(
    broker: &BrokerProcess,
    what: &str,
    accept: impl Fn(&ClusterStatus) -> bool,
) -> ClusterStatus {
    let deadline = tokio::time::Instant::now() + PROCESS_WAIT;
    loop {
        let status = broker.status("dev").await.expect("GetCluster");
        if accept(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {PROCESS_WAIT:?} for {what}; last status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn count(status: &ClusterStatus, reason: RefreshReason, outcome: &str) -> u64 {
    status
        .refresh_counts
        .iter()
        .filter(|c| c.reason() == reason && c.outcome == outcome)
        .map(|c| c.count)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn a_sigstopped_publisher_resumed_after_several_deadlines_mints_once() {
    let test = "a_sigstopped_publisher_resumed_after_several_deadlines_mints_once";
    let Some(python) = tools::python(test) else {
        return;
    };
    let moto = Moto::start(&python).await;
    let seeded = seed(&python, &moto).await;
    moto.require_auth().await;
    let sts = RecordingProxy::start(&moto.url).await;
    let deadline = format!("{}s", DEADLINE.as_secs());
    let broker = BrokerProcess::start_dev_with(&[
        "--refresh-deadline",
        &deadline,
        "--publisher-heartbeat",
        "1s",
    ])
    .await;
    let home = tempfile::tempdir().unwrap();
    let mut laptop = laptop_env(&moto, &seeded, home.path());
    for (name, value) in &mut laptop {
        if name == "AWS_ENDPOINT_URL_STS" {
            *value = sts.url.clone();
        }
    }
    let mut command = clean_command(binary("credstream"));
    command
        .envs(laptop.iter().map(|(k, v)| (k, v)))
        .env("CREDSTREAM_TOKEN", &broker.publisher_token)
        .args(["publish", "--broker", &broker.url, "--cluster", "dev"])
        .args(["--no-gcp", "--aws-role-arn", &seeded.role_arn])
        .args(["--aws-duration", "15m"]);
    let mut publish = Process::spawn("credstream publish", command);
    publish.line(|l| l.starts_with("minted AWS")).await;
    assert_eq!(sts.aws_calls("AssumeRole"), 1, "the first mint");

    let mut first = agent(&broker, "worker-0").await;
    let held = next_aws_version(&mut first).await;

    // Stop the publisher: its connection stays open and says nothing.
    publish.signal("STOP");
    // An agent asks for a fresh credential at once: the request goes to the
    // stopped publisher's socket.
    hint(&first, held).await;
    let stalled = status_until(&broker, "the publisher to be found unresponsive", |s| {
        !s.publisher_responsive && s.pending_refreshes.len() == 1
    })
    .await;
    let request = stalled.pending_refreshes[0].clone();
    let first_deadline = request
        .deadline
        .as_ref()
        .and_then(system_time)
        .expect("a deadline");
    // More agents ask while it is stopped; their hints join the request.
    let mut others = Vec::new();
    for i in 1..=4 {
        let mut other = agent(&broker, &format!("worker-{i}")).await;
        assert_eq!(next_aws_version(&mut other).await, held);
        hint(&other, held).await;
        others.push(other);
    }
    // Three more deadlines pass; the broker keeps the one request it has
    // (same id, no retry, no new request however often it is asked).
    let several = first_deadline + 3 * DEADLINE;
    let through = status_until(&broker, "three deadlines to pass", |s| {
        SystemTime::now() > several && count(s, RefreshReason::AgentRequested, "joined") >= 4
    })
    .await;
    assert!(!through.publisher_responsive, "{through:?}");
    assert_eq!(through.pending_refreshes.len(), 1, "{through:?}");
    assert_eq!(through.pending_refreshes[0].id, request.id, "{through:?}");
    assert_eq!(
        count(&through, RefreshReason::AgentRequested, "timed_out"),
        0
    );
    assert_eq!(
        sts.aws_calls("AssumeRole"),
        1,
        "nothing minted while stopped"
    );

    publish.signal("CONT");
    // Every agent gets one new version...
    let fresh = next_aws_version(&mut first).await;
    assert!(fresh > held);
    for other in &mut others {
        assert_eq!(next_aws_version(other).await, fresh);
    }
    // ... and the broker settles with nothing outstanding.
    let settled = status_until(&broker, "the refresh to complete", |s| {
        s.publisher_responsive && s.pending_refreshes.is_empty()
    })
    .await;
    let version = settled.credentials[0].version;
    assert_eq!(version, fresh, "{settled:?}");
    assert_eq!(
        sts.aws_calls("AssumeRole"),
        2,
        "exactly one AssumeRole for the stall: {:?}",
        sts.received()
    );
    assert_eq!(
        count(&settled, RefreshReason::AgentRequested, "requested"),
        1
    );
    assert_eq!(
        count(&settled, RefreshReason::AgentRequested, "fulfilled"),
        1
    );
    assert_eq!(
        count(&settled, RefreshReason::AgentRequested, "superseded"),
        0
    );
    let minted = publish
        .stdout()
        .lines()
        .filter(|l| l.starts_with("minted AWS"))
        .count();
    assert_eq!(minted, 2, "{}", publish.output());
    publish.signal("TERM");
    assert!(publish.exit().await.success(), "{}", publish.output());
}
