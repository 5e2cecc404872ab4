//! Clusters end (issue 13, item 4): a cluster with no publisher, no agents
//! and no live credential is dropped after its grace period and its task
//! ends, so 10,000 short-lived clusters leave nothing behind. On a paused
//! tokio clock (the hub itself, in process), counting clusters, tasks and
//! the cluster objects themselves rather than RSS, which the allocator
//! keeps; the RSS is printed for the record. A second test runs the
//! broker binary with a short grace and watches a cluster disappear from
//! `ListClusters`.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use credstream_broker::hub::{Cluster, ClusterHub, HubConfig};
use credstream_broker::limits;
use credstream_broker::refresh::RefreshConfig;
use credstream_proto::v1::{CredentialKind, EnvVar, ListClustersRequest, PrivateEnv};
use credstream_tests::broker::{aws_update, open_agent, open_publisher, publisher_hello};
use credstream_tests::processes::{BrokerProcess, PROCESS_WAIT};
use tokio::runtime::Handle;

const GRACE: Duration = Duration::from_secs(60);
const LIFETIME: Duration = Duration::from_secs(15 * 60);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4)
}

/// One short-lived cluster: a publisher publishes a credential and an env,
/// an agent subscribes, both leave.
fn live_briefly(hub: &Arc<ClusterHub>, id: &str) -> Weak<Cluster> {
    let cluster = hub.cluster(id);
    let (publisher, _events, _requests) = cluster
        .connect_publisher(vec![CredentialKind::Aws], true, "test")
        .expect("no hold-down");
    let agent = cluster.connect_agent("worker-1".into());
    let update = aws_update(id, LIFETIME);
    let lifetime = limits::check_credential(&update, SystemTime::now()).expect("valid");
    cluster
        .publish_credential(update, lifetime)
        .expect("unprompted credentials are accepted");
    cluster
        .publish_env(PrivateEnv {
            set: vec![EnvVar {
                name: "AUTH_TOKEN_FOR_CUSTOM_DATABASE".into(),
                value: format!("secret-{id}"),
            }],
            ..Default::default()
        })
        .expect("valid env");
    agent.ack(cluster.state().version);
    drop(agent);
    drop(publisher);
    Arc::downgrade(&cluster)
}

/// Lets every task run until `done` holds; the clock is paused, so time
/// only moves when every task is idle.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen");
}

#[tokio::test(start_paused = true)]
async fn ten_thousand_short_lived_clusters_leave_no_state_and_no_task_behind() {
    let hub = ClusterHub::new(HubConfig {
        refresh: RefreshConfig {
            idle_cluster_grace: GRACE,
            ..RefreshConfig::default()
        },
    });
    let metrics = Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let rss_before = rss_kib();

    // One cluster keeps an agent, one is re-used before its grace ends:
    // neither may be dropped.
    let kept = hub.cluster("kept");
    let _kept_agent = kept.connect_agent("stays".into());

    let mut weak = Vec::new();
    for i in 0..10_000 {
        weak.push(live_briefly(&hub, &format!("short-{i}")));
    }
    assert_eq!(hub.len(), 10_001);
    assert_eq!(metrics.num_alive_tasks(), tasks_before + 10_001);
    let rss_peak = rss_kib();

    // Nothing goes while a credential is live...
    tokio::time::sleep(LIFETIME - Duration::from_secs(1)).await;
    assert_eq!(hub.len(), 10_001);
    assert_eq!(hub.dropped(), 0);
    // ... nor within the grace after the last one expired ...
    tokio::time::sleep(Duration::from_secs(1) + GRACE / 2).await;
    assert_eq!(hub.len(), 10_001);
    let reused = hub.cluster("short-0");
    let (publisher, _events, _) = reused
        .connect_publisher(vec![CredentialKind::Aws], false, "test")
        .unwrap();
    drop(reused);
    // ... and after it every idle cluster is dropped and its task ends.
    until("idle clusters to be dropped", || hub.len() == 2).await;
    assert_eq!(hub.dropped(), 9_999);
    assert!(hub.get("kept").is_some());
    assert!(hub.get("short-0").is_some());
    until("their tasks to end", || {
        metrics.num_alive_tasks() == tasks_before + 2
    })
    .await;
    assert!(
        weak[1..].iter().all(|w| w.upgrade().is_none()),
        "every dropped cluster is freed"
    );

    // The re-used one goes too once its publisher leaves.
    drop(publisher);
    tokio::time::sleep(GRACE).await;
    until("the re-used cluster to be dropped", || hub.len() == 1).await;
    until("its task to end", || {
        metrics.num_alive_tasks() == tasks_before + 1
    })
    .await;
    assert!(weak[0].upgrade().is_none());
    eprintln!(
        "RSS: {rss_before} KiB before, {rss_peak} KiB with 10,000 clusters, {} KiB after they ended",
        rss_kib()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_drops_a_cluster_nobody_uses_after_its_grace() {
    let broker = BrokerProcess::start_dev_with(&["--cluster-grace", "1s"]).await;
    let channel = tonic::transport::Channel::from_shared(broker.url.clone())
        .unwrap()
        .connect_lazy();
    let list = || async {
        let credentials =
            credstream_proto::connect::CallCredentials::bearer(&broker.admin_token).unwrap();
        let mut admin =
            credstream_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
                channel.clone(),
                credentials,
            );
        admin
            .list_clusters(ListClustersRequest {})
            .await
            .unwrap()
            .into_inner()
            .clusters
            .into_iter()
            .map(|c| c.cluster_id)
            .collect::<Vec<_>>()
    };
    // A publisher of only an env, and an agent, come and go.
    let mut publisher = open_publisher(
        channel.clone(),
        &broker.publisher_token,
        Some(publisher_hello("dev", &[], true)),
    )
    .await
    .unwrap();
    publisher.welcome().await;
    let agent = open_agent(channel.clone(), &broker.agent_token, "dev", "w")
        .await
        .unwrap();
    assert_eq!(list().await, ["dev"]);
    // While the agent stays, the cluster stays.
    drop(publisher);
    let mut agent = agent;
    agent.expect().await;
    let status = broker.status("dev").await.unwrap();
    assert_eq!(status.agents.len(), 1);
    drop(agent);
    let deadline = tokio::time::Instant::now() + PROCESS_WAIT;
    while !list().await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dev was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gone = broker.status("dev").await.unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
}
