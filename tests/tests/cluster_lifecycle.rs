//! Clusters end (issue 13, item 4): a cluster with no publisher, no agents
//! and no live credential is dropped after its grace period. The broker
//! binary, with a short grace, is watched dropping a cluster from
//! `ListClusters`; `cluster_memory.rs` runs 10,000 short-lived clusters
//! through the hub and measures the heap they leave behind.

use std::time::Duration;

use credstream_proto::v1::ListClustersRequest;
use credstream_tests::broker::{open_agent, open_publisher, publisher_hello};
use credstream_tests::processes::{BrokerProcess, PROCESS_WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_drops_a_cluster_nobody_uses_after_its_grace() {
    let broker = BrokerProcess::start_dev_with(&["--cluster-grace", "1s"]).await;
    let channel = tonic::transport::Channel::from_shared(broker.url.clone())
        .unwrap()
        .connect_lazy();
    let list = || async {
        broker
            .admin()
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
