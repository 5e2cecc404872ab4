//! Refresh end to end over real TCP: the broker asks, the client library
//! re-mints (a counting fake minter), agents converge; single flight; retries;
//! held requests delivered on reconnect.

use std::sync::Arc;
use std::time::Duration;

use credstream_agent::store::CredentialStore;
use credstream_agent::subscription::{self, SubscriptionConfig};
use credstream_broker::auth::Role;
use credstream_client::session::{PublishSession, SessionEvent};
use credstream_proto::v1::{
    CredentialKind, RefreshReason, publish_response, subscribe_request, subscribe_response,
};
use credstream_tests::broker::{TestBroker, WAIT, open_agent, open_publisher, publisher_hello};
use credstream_tests::minter::CountingMinter;
use tokio::sync::Semaphore;

const AWS: CredentialKind = CredentialKind::Aws;

/// Waits until `store` holds an AWS credential newer than `after`.
async fn aws_version_above(store: &CredentialStore, after: u64) -> u64 {
    let mut changes = store.subscribe();
    let state = tokio::time::timeout(
        WAIT,
        changes.wait_for(|s| {
            s.credentials
                .aws
                .as_ref()
                .is_some_and(|c| c.version > after)
        }),
    )
    .await
    .expect("agent converged in time")
    .expect("store alive");
    state.credentials.aws.as_ref().unwrap().version
}

fn spawn_agent(
    broker: &TestBroker,
    cluster: &str,
    id: &str,
) -> (CredentialStore, tokio::sync::oneshot::Sender<()>) {
    let store = CredentialStore::new();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = SubscriptionConfig::new(broker.address(Role::Agent, cluster), id);
    let s = store.clone();
    tokio::spawn(async move {
        let _ = subscription::run(config, s, async {
            let _ = stopped.await;
        })
        .await;
    });
    (store, stop)
}

#[tokio::test]
async fn the_broker_asks_for_missing_and_expiring_credentials_and_agents_get_each_new_one() {
    let broker = TestBroker::start().await;
    let cluster = "rotate";
    // 4-second credentials: the broker asks again at about 2 s (±5%).
    let minter = CountingMinter::new(AWS, Duration::from_secs(4));
    let session = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .minter(minter.clone())
        .start()
        .unwrap();
    let mut events = session.events();
    let (store, _stop) = spawn_agent(&broker, cluster, "worker-1");
    // MISSING on connect → first mint reaches the agent.
    let first = aws_version_above(&store, 0).await;
    assert!(minter.count() >= 1);
    // EXPIRING at half-life → second mint, newer version.
    let second = aws_version_above(&store, first).await;
    assert!(second > first);
    let mut reasons = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let SessionEvent::RefreshRequested { reason, .. } = event {
            reasons.push(reason);
        }
    }
    assert_eq!(reasons.first(), Some(&RefreshReason::Missing));
    assert!(reasons.contains(&RefreshReason::Expiring), "{reasons:?}");
    let status = broker.status(cluster).await.unwrap();
    let fulfilled: u64 = status
        .refresh_counts
        .iter()
        .filter(|c| c.outcome == "fulfilled")
        .map(|c| c.count)
        .sum();
    assert!(fulfilled >= 2, "{:?}", status.refresh_counts);
    session.shutdown().await.unwrap();
}

#[tokio::test]
async fn thousands_of_hints_cost_one_mint_and_every_agent_gets_the_result() {
    let broker = TestBroker::start().await;
    let cluster = "storm";
    let gate = Arc::new(Semaphore::new(0));
    let minter = CountingMinter::gated(AWS, Duration::from_secs(3600), gate.clone());
    let session = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .minter(minter.clone())
        .start()
        .unwrap();
    // The MISSING request on connect: let it through.
    minter.wait_for(1).await;
    gate.add_permits(1);
    // 1,000 real agent streams over 16 connections.
    let channels: Vec<_> = (0..16).map(|_| broker.channel()).collect();
    let token = broker.token(Role::Agent, Some(cluster));
    let mut agents = Vec::new();
    for i in 0..1000 {
        let mut agent = open_agent(channels[i % 16].clone(), &token, cluster, &format!("a{i}"))
            .await
            .unwrap();
        // Wait for the first credential (snapshot or update).
        let held = loop {
            match agent.expect().await {
                subscribe_response::Message::Snapshot(s) if !s.credentials.is_empty() => {
                    break s.credentials[0].version;
                }
                subscribe_response::Message::Credential(c) => break c.version,
                _ => {}
            }
        };
        agents.push((agent, held));
    }
    // Every agent hints at once (real streams) ...
    for (agent, held) in &agents {
        agent
            .send(subscribe_request::Message::RefreshHint(
                credstream_proto::v1::RefreshHint {
                    kind: AWS as i32,
                    held_version: *held,
                },
            ))
            .await;
    }
    // ... and 10,000 more hints arrive through the hub while the mint is in flight.
    minter.wait_for(2).await;
    let hub_cluster = broker.broker.hub.get(cluster).unwrap();
    for _ in 0..10_000 {
        hub_cluster.hint(AWS, agents[0].1);
    }
    assert_eq!(
        hub_cluster.refresh_requested(RefreshReason::AgentRequested),
        1
    );
    gate.add_permits(1);
    // Every agent receives the one new credential.
    for (agent, held) in &mut agents {
        loop {
            if let subscribe_response::Message::Credential(c) = agent.expect().await {
                assert!(c.version > *held);
                break;
            }
        }
    }
    assert_eq!(
        minter.count(),
        2,
        "one mint for the storm (plus the initial one)"
    );
    drop(session);
}

#[tokio::test]
async fn mint_errors_are_reported_and_retried_until_one_succeeds() {
    let broker = TestBroker::start_with(|config| {
        config.refresh.backoff_base = Duration::from_millis(50);
    })
    .await;
    let cluster = "errors";
    let minter = CountingMinter::new(AWS, Duration::from_secs(3600));
    minter.fail_with(Some("AccessDenied: not today"));
    let session = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .minter(minter.clone())
        .start()
        .unwrap();
    minter.wait_for(3).await;
    let status = broker.status(cluster).await.unwrap();
    assert_eq!(
        status.last_refresh_error,
        "fake minting failed: AccessDenied: not today"
    );
    assert!(
        status
            .refresh_counts
            .iter()
            .any(|c| c.outcome == "failed" && c.count >= 2),
        "{:?}",
        status.refresh_counts
    );
    minter.fail_with(None);
    let (store, _stop) = spawn_agent(&broker, cluster, "w");
    aws_version_above(&store, 0).await;
    session.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_made_while_no_publisher_is_connected_is_sent_when_one_connects() {
    let broker = TestBroker::start().await;
    let cluster = "offline";
    // A publisher declares AWS, publishes, and leaves.
    let token = broker.token(Role::Publisher, Some(cluster));
    let mut publisher = open_publisher(
        broker.channel(),
        &token,
        Some(publisher_hello(cluster, &[AWS], false)),
    )
    .await
    .unwrap();
    publisher.welcome().await;
    // Answer the MISSING request.
    let request = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::RefreshRequest(r)) => Some(r.clone()),
            _ => None,
        })
        .await;
    let mut update = credstream_tests::broker::aws_update("one", Duration::from_secs(3600));
    update.refresh_request_id = request.id;
    publisher
        .send(credstream_proto::v1::publish_request::Message::Credential(
            update,
        ))
        .await;
    let mut agent = broker.agent(cluster, "w").await;
    let held = loop {
        match agent.expect().await {
            subscribe_response::Message::Snapshot(s) if !s.credentials.is_empty() => {
                break s.credentials[0].version;
            }
            subscribe_response::Message::Credential(c) => break c.version,
            _ => {}
        }
    };
    drop(publisher);
    // The agent learns the publisher left, then hints.
    loop {
        if let subscribe_response::Message::ClusterInfo(info) = agent.expect().await
            && !info.publisher_connected
        {
            break;
        }
    }
    agent
        .send(subscribe_request::Message::RefreshHint(
            credstream_proto::v1::RefreshHint {
                kind: AWS as i32,
                held_version: held,
            },
        ))
        .await;
    let pending = tokio::time::timeout(WAIT, async {
        loop {
            let status = broker.status(cluster).await.unwrap();
            if let Some(p) = status.pending_refreshes.first() {
                return p.clone();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    assert!(!pending.sent, "held while no publisher is connected");
    assert_eq!(pending.reason, RefreshReason::AgentRequested as i32);
    // A new publisher connects and receives exactly that request.
    let mut publisher = open_publisher(
        broker.channel(),
        &token,
        Some(publisher_hello(cluster, &[AWS], false)),
    )
    .await
    .unwrap();
    let request = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::RefreshRequest(r)) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(request.id, pending.id);
    assert_eq!(request.reason, RefreshReason::AgentRequested as i32);
}

#[tokio::test]
async fn private_env_is_merged_and_unset_on_every_agent() {
    let broker = TestBroker::start().await;
    let cluster = "env";
    let session = PublishSession::builder(broker.address(Role::Publisher, cluster))
        .private_env([("A", "1"), ("B", "2")])
        .start()
        .unwrap();
    let (store, _stop) = spawn_agent(&broker, cluster, "w");
    let mut changes = store.subscribe();
    let names = |s: &credstream_agent::store::AgentState| -> Vec<(String, String)> {
        s.env_vars()
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect()
    };
    tokio::time::timeout(
        WAIT,
        changes.wait_for(|s| names(s) == [("A".into(), "1".into()), ("B".into(), "2".into())]),
    )
    .await
    .unwrap()
    .unwrap();
    session.send_private_envs([("C", "3")]).await.unwrap();
    session.unset_private_envs(["A"]).await.unwrap();
    tokio::time::timeout(
        WAIT,
        changes.wait_for(|s| names(s) == [("B".into(), "2".into()), ("C".into(), "3".into())]),
    )
    .await
    .unwrap()
    .unwrap();
    session.shutdown().await.unwrap();
}

/// The session can connect before its caller subscribes to its events (the
/// CLI's "connected" line was once lost that way): the first receiver
/// still begins with `Connected`; a later one begins with what comes next.
#[tokio::test]
async fn the_first_events_receiver_sees_a_connection_made_before_it_subscribed() {
    let broker = TestBroker::start().await;
    let minter = CountingMinter::new(AWS, Duration::from_secs(3600));
    let session = PublishSession::builder(broker.address(Role::Publisher, "late"))
        .minter(minter.clone())
        .start()
        .unwrap();
    // The broker acks a version only after the welcome, the refresh request
    // and the publish: by then `Connected` has been sent.
    let mut acks = session.acks();
    tokio::time::timeout(WAIT, acks.wait_for(|ack| ack.version > 0))
        .await
        .expect("the broker acks the first version in time")
        .expect("session alive");

    let mut first = session.events();
    let event = first.try_recv();
    assert!(
        matches!(event, Ok(SessionEvent::Connected { .. })),
        "the first event is the connection: {event:?}"
    );
    let mut later = session.events();
    assert!(
        matches!(
            later.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "a later receiver starts from now"
    );
    session.shutdown().await.unwrap();
}
