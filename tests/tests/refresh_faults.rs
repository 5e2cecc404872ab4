//! Refresh under faults (issue 13, items 1 and 5), over real TCP against an
//! in-process broker: answers to superseded requests are dropped and
//! counted, the client mints once for a backlog of requests and answers the
//! newest, heartbeats mark a silent publisher unresponsive, and a permanent
//! mint error stops the broker asking until the publisher reconnects.

use std::sync::Arc;
use std::time::Duration;

use credstream_broker::auth::Role;
use credstream_client::session::PublishSession;
use credstream_proto::v1::{
    ClusterStatus, CredentialKind, HeartbeatAck, PublisherHello, RefreshHint, RefreshReason,
    RefreshRequest, publish_request, publish_response, subscribe_request,
};
use credstream_tests::broker::{TestBroker, WAIT, aws_update, open_publisher};
use credstream_tests::minter::CountingMinter;
use tokio::sync::Semaphore;

const AWS: CredentialKind = CredentialKind::Aws;

async fn status_until(
    broker: &TestBroker,
    cluster: &str,
    what: &str,
    accept: impl Fn(&ClusterStatus) -> bool,
) -> ClusterStatus {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(status) = broker.status(cluster).await
            && accept(&status)
        {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited for {what}: {:?}",
            broker.status(cluster).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(status: &ClusterStatus, outcome: &str) -> u64 {
    status
        .refresh_counts
        .iter()
        .filter(|c| c.outcome == outcome)
        .map(|c| c.count)
        .sum()
}

fn refresh_request(response: &credstream_proto::v1::PublishResponse) -> Option<RefreshRequest> {
    match &response.message {
        Some(publish_response::Message::RefreshRequest(r)) => Some(r.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn an_answer_to_a_superseded_request_is_dropped_and_counted() {
    let broker = TestBroker::start_with(|config| {
        config.refresh.deadline = Duration::from_millis(300);
        config.refresh.backoff_base = Duration::from_millis(50);
    })
    .await;
    let cluster = "superseded";
    let mut publisher = broker.publisher(cluster, &[AWS], false).await;
    publisher.welcome().await;
    let first = publisher.until(refresh_request).await;
    // Not answered in time: re-issued under a new id.
    let second = publisher.until(refresh_request).await;
    assert_ne!(first.id, second.id);
    let before = broker.status(cluster).await.unwrap().version;

    let mut late = aws_update("late", Duration::from_secs(3600));
    late.refresh_request_id = first.id.clone();
    publisher
        .send(publish_request::Message::Credential(late))
        .await;
    let dropped = status_until(&broker, cluster, "the late answer", |s| {
        count(s, "superseded") == 1
    })
    .await;
    assert_eq!(
        dropped.version, before,
        "no version for a superseded answer"
    );
    assert!(dropped.credentials.is_empty(), "{dropped:?}");
    assert_eq!(dropped.pending_refreshes[0].id, second.id);

    let mut current = aws_update("current", Duration::from_secs(3600));
    current.refresh_request_id = second.id.clone();
    publisher
        .send(publish_request::Message::Credential(current))
        .await;
    let accepted = status_until(&broker, cluster, "the current answer", |s| {
        !s.credentials.is_empty()
    })
    .await;
    assert!(accepted.pending_refreshes.is_empty(), "{accepted:?}");
    assert_eq!(count(&accepted, "fulfilled"), 1);
    assert_eq!(count(&accepted, "superseded"), 1);
}

#[tokio::test]
async fn the_client_mints_once_for_a_backlog_and_answers_the_newest_request() {
    let broker = TestBroker::start_with(|config| {
        config.refresh.deadline = Duration::from_millis(200);
        config.refresh.backoff_base = Duration::from_millis(20);
    })
    .await;
    let cluster = "backlog";
    let gate = Arc::new(Semaphore::new(0));
    let minter = CountingMinter::gated(AWS, Duration::from_secs(3600), gate.clone());
    let session = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .minter(minter.clone())
        .start()
        .unwrap();
    minter.wait_for(1).await;
    // The mint hangs while the broker re-issues the request twice more.
    let piled = status_until(&broker, cluster, "two re-issued requests", |s| {
        count(s, "timed_out") >= 2 && s.pending_refreshes.iter().any(|p| !p.id.is_empty())
    })
    .await;
    assert_eq!(minter.count(), 1, "one mint however many requests arrive");
    gate.add_permits(1);
    let done = status_until(&broker, cluster, "the credential", |s| {
        !s.credentials.is_empty()
    })
    .await;
    // The answer named the newest request, so the broker took it.
    assert_eq!(count(&done, "superseded"), 0, "{done:?}");
    assert_eq!(count(&done, "fulfilled"), 1, "{done:?}");
    assert!(count(&done, "requested") >= count(&piled, "requested"));
    assert_eq!(minter.count(), 1);
    session.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_publisher_that_stops_answering_heartbeats_is_unresponsive_until_it_answers() {
    let broker = TestBroker::start_with(|config| {
        config.refresh.heartbeat_interval = Duration::from_millis(100);
    })
    .await;
    let cluster = "heartbeats";
    let mut publisher = open_publisher(
        broker.channel(),
        &broker.token(Role::Publisher, Some(cluster)),
        Some(publish_request::Message::Hello(PublisherHello {
            cluster_id: cluster.into(),
            kinds: vec![AWS as i32],
            answers_heartbeats: true,
            ..Default::default()
        })),
    )
    .await
    .unwrap();
    publisher.welcome().await;
    let missing = publisher.until(refresh_request).await;
    let heartbeat = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::Heartbeat(h)) => Some(*h),
            _ => None,
        })
        .await;
    assert_eq!(heartbeat.sequence, 1);
    // Silence: unresponsive, and the request it was sent is kept as is.
    let silent = status_until(&broker, cluster, "unresponsive", |s| {
        !s.publisher_responsive
    })
    .await;
    assert_eq!(silent.pending_refreshes[0].id, missing.id);
    publisher
        .send(publish_request::Message::HeartbeatAck(HeartbeatAck {
            sequence: 1,
        }))
        .await;
    status_until(&broker, cluster, "responsive again", |s| {
        s.publisher_responsive
    })
    .await;
    // An ack for a heartbeat never sent is refused, clearly.
    publisher
        .send(publish_request::Message::HeartbeatAck(HeartbeatAck {
            sequence: 99,
        }))
        .await;
    let status = publisher.ended_with().await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("heartbeat_ack.sequence 99"),
        "{status:?}"
    );
    // A publisher without heartbeats is never called unresponsive.
    let mut quiet = broker.publisher(cluster, &[AWS], false).await;
    quiet.welcome().await;
    let status = broker.status(cluster).await.unwrap();
    assert!(status.publisher_responsive);
}

#[tokio::test]
async fn a_permanent_mint_error_stops_the_broker_asking_until_the_publisher_reconnects() {
    let broker = TestBroker::start_with(|config| {
        config.refresh.backoff_base = Duration::from_millis(20);
        config.hint_interval = Duration::from_millis(1);
    })
    .await;
    let cluster = "denied";
    let minter = CountingMinter::new(AWS, Duration::from_secs(3600));
    minter.refuse_with(Some("AccessDenied: not allowed to assume the role"));
    let session = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .minter(minter.clone())
        .start()
        .unwrap();
    let stopped = status_until(&broker, cluster, "the stop", |s| {
        !s.stopped_refreshes.is_empty()
    })
    .await;
    assert_eq!(stopped.stopped_refreshes[0].kind(), AWS);
    assert_eq!(
        stopped.stopped_refreshes[0].message,
        "fake refused to mint: AccessDenied: not allowed to assume the role"
    );
    assert!(stopped.pending_refreshes.is_empty(), "{stopped:?}");
    assert_eq!(session.stopped_kinds(), [AWS]);
    // Agents asking change nothing: the hints are counted and ignored.
    let mut agent = broker.agent(cluster, "w").await;
    agent.expect().await;
    for _ in 0..3 {
        agent
            .send(subscribe_request::Message::RefreshHint(RefreshHint {
                kind: AWS as i32,
                held_version: 0,
            }))
            .await;
    }
    let hinted = status_until(&broker, cluster, "suppressed hints", |s| {
        count(s, "suppressed") >= 1
    })
    .await;
    assert!(hinted.pending_refreshes.is_empty(), "{hinted:?}");
    assert_eq!(minter.count(), 1, "no retry for a permanent error");
    assert_eq!(count(&hinted, "stopped"), 1);
    session.shutdown().await.unwrap();

    // The user fixes it and publishes again: asked at once, minted.
    minter.refuse_with(None);
    let again = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .minter(minter.clone())
        .start()
        .unwrap();
    let fixed = status_until(&broker, cluster, "the credential", |s| {
        !s.credentials.is_empty()
    })
    .await;
    assert!(fixed.stopped_refreshes.is_empty(), "{fixed:?}");
    assert_eq!(minter.count(), 2);
    assert!(again.stopped_kinds().is_empty());
    assert!(
        fixed
            .refresh_counts
            .iter()
            .any(|c| c.reason() == RefreshReason::Missing && c.outcome == "fulfilled")
    );
    again.shutdown().await.unwrap();
}
