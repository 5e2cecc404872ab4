//! Brokers as independent shards behind a real L7 proxy (HAProxy, then
//! nginx) that routes every call on `x-credstream-cluster` with consistent
//! hashing (docs/design.md §6).
//! Every cluster's publisher and agents meet on one shard; when a shard
//! goes away, its clusters move to another, which asks their publishers for
//! everything again, while the clusters already elsewhere are not touched.
//! `credstream status` through the proxy reaches each cluster's shard.
//! No shared store and no consensus: the client library, the agent library,
//! the `credstream` binary and the brokers as they are.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use credstream_agent::store::{AgentState, CredentialStore};
use credstream_agent::subscription::{self, SubscriptionConfig};
use credstream_broker::auth::{Role, TokenKey};
use credstream_client::session::PublishSession;
use credstream_proto::connect::BrokerAddress;
use credstream_proto::v1::CredentialKind;
use credstream_tests::bins::binary;
use credstream_tests::broker::{TestBroker, WAIT};
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{Process, clean_command};
use credstream_tests::publish::local_address;
use credstream_tests::shard_proxy::{ProxyKind, ShardProxy};
use credstream_tests::tools;

/// Clusters opened at a time.
const CLUSTERS: usize = 8;
/// Clusters after which an unused shard fails the test.
const MAX_CLUSTERS: usize = 64;

fn address(proxy: &ShardProxy, key: &TokenKey, role: Role, cluster: &str) -> BrokerAddress {
    local_address(
        &proxy.url(),
        &key.issue(role, Some(cluster), Duration::from_secs(3600))
            .expect("token"),
        cluster,
    )
}

async fn wait_for_state(
    store: &CredentialStore,
    what: &str,
    accept: impl Fn(&AgentState) -> bool,
) -> AgentState {
    tokio::time::timeout(WAIT, store.subscribe().wait_for(|s| accept(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("store open")
        .clone()
}

fn env_of(state: &AgentState) -> Vec<(String, String)> {
    state
        .env_vars()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The shards that hold `cluster` with a published credential and the
/// named agent connected.
fn homes(shards: &[&TestBroker], cluster: &str) -> Vec<usize> {
    shards
        .iter()
        .enumerate()
        .filter(|(_, shard)| {
            shard.broker.hub.get(cluster).is_some_and(|c| {
                let status = c.status();
                status.version > 0
                    && status
                        .agents
                        .iter()
                        .any(|a| a.agent_id == format!("{cluster}-worker"))
            })
        })
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_haproxy),
    ignore = "needs haproxy: set CREDSTREAM_TEST_HAPROXY (scripts/test.sh does)"
)]
async fn haproxy_keeps_each_cluster_on_one_shard_and_moves_it_when_the_shard_goes() {
    if let Some(haproxy) = tools::haproxy("sharding through haproxy") {
        clusters_stay_whole_and_move_with_their_shard(ProxyKind::Haproxy, &haproxy).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_nginx),
    ignore = "needs nginx: set CREDSTREAM_TEST_NGINX (scripts/test.sh does)"
)]
async fn nginx_keeps_each_cluster_on_one_shard_and_moves_it_when_the_shard_goes() {
    if let Some(nginx) = tools::nginx("sharding through nginx") {
        clusters_stay_whole_and_move_with_their_shard(ProxyKind::Nginx, &nginx).await;
    }
}

async fn clusters_stay_whole_and_move_with_their_shard(kind: ProxyKind, proxy_binary: &Path) {
    let key = TokenKey::generate();
    let quick_drain = |config: &mut credstream_broker::server::BrokerConfig| {
        config.drain_timeout = Duration::from_secs(1);
    };
    let shard0 = TestBroker::start_with_key(key.clone(), quick_drain).await;
    let shard1 = TestBroker::start_with_key(key.clone(), quick_drain).await;
    let dir = tempfile::tempdir().unwrap();
    let proxy = ShardProxy::start(
        kind,
        proxy_binary,
        dir.path(),
        &[shard0.broker.local_addr, shard1.broker.local_addr],
    )
    .await;

    // One publisher and one agent per cluster, all through the proxy, in
    // batches until both shards hold clusters: where a cluster lands
    // depends on the hash ring, and nginx builds its ring from the shards'
    // addresses, which are new ports every run.
    let shards = [&shard0, &shard1];
    let mut clusters: Vec<String> = Vec::new();
    let mut sessions = Vec::new();
    let mut minters: Vec<Arc<CountingMinter>> = Vec::new();
    let mut stores = Vec::new();
    let mut versions = Vec::new();
    let mut home = Vec::new();
    while !(home.contains(&0) && home.contains(&1)) {
        assert!(
            clusters.len() < MAX_CLUSTERS,
            "{MAX_CLUSTERS} clusters all hashed to one shard: {home:?}"
        );
        let batch: Vec<String> = (clusters.len()..clusters.len() + CLUSTERS)
            .map(|i| format!("team-{i}"))
            .collect();
        for cluster in &batch {
            let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
            sessions.push(
                PublishSession::builder(address(&proxy, &key, Role::Publisher, cluster))
                    .minter(minter.clone())
                    .private_env([("CLUSTER_NAME", cluster.as_str())])
                    .start()
                    .expect("session starts"),
            );
            minters.push(minter);
            let store = CredentialStore::new();
            let config = SubscriptionConfig::new(
                address(&proxy, &key, Role::Agent, cluster),
                format!("{cluster}-worker"),
            );
            tokio::spawn({
                let store = store.clone();
                async move { subscription::run(config, store, std::future::pending()).await }
            });
            stores.push(store);
        }
        // Each agent holds its own cluster's credential and env: its calls
        // reached the shard its publisher's did, and only that one.
        for (cluster, store) in batch.iter().zip(&stores[clusters.len()..]) {
            let state = wait_for_state(store, &format!("{cluster}'s agent ready"), |s| {
                s.readiness(SystemTime::now()).is_ok()
            })
            .await;
            assert_eq!(
                env_of(&state),
                [("CLUSTER_NAME".to_owned(), cluster.clone())]
            );
            versions.push(state.credentials.aws.as_ref().expect("aws").version);
            let on = homes(&shards, cluster);
            assert_eq!(on.len(), 1, "{cluster} lives on shards {on:?}");
            home.push(on[0]);
        }
        clusters.extend(batch);
    }
    assert!(minters.iter().all(|m| m.count() == 1));

    // `credstream status` through the proxy finds every cluster: its admin
    // call carries the cluster header, so it reaches the cluster's shard.
    for cluster in &clusters {
        let token = key
            .issue(Role::Publisher, Some(cluster), Duration::from_secs(60))
            .expect("token");
        let mut command = clean_command(binary("credstream"));
        command.env("CREDSTREAM_TOKEN", token).args([
            "status",
            "--broker",
            &proxy.url(),
            "--cluster",
            cluster,
        ]);
        let mut status = Process::spawn("credstream status", command);
        assert!(status.exit().await.success(), "{}", status.output());
        assert!(
            status
                .stdout()
                .contains(&format!("  {cluster}-worker holds version ")),
            "{}",
            status.output()
        );
    }

    // The shard of team-0 goes away. The proxy takes it out (HAProxy by
    // its checks, nginx at the first refused connection), its clusters hash
    // to the survivor, whose empty state makes each of their
    // publishers mint again; their agents serve throughout and converge.
    let gone = home[0];
    let (leaving, survivor) = if gone == 0 {
        (shard0, shard1)
    } else {
        (shard1, shard0)
    };
    leaving.broker.shutdown().await;
    for (i, cluster) in clusters.iter().enumerate() {
        if home[i] != gone {
            continue;
        }
        assert!(
            stores[i].current().readiness(SystemTime::now()).is_ok(),
            "{cluster}'s agent keeps serving while its shard is gone"
        );
        let state = wait_for_state(&stores[i], &format!("{cluster} on the survivor"), |s| {
            s.credentials
                .aws
                .as_ref()
                .is_some_and(|c| c.version > versions[i])
        })
        .await;
        assert!(state.readiness(SystemTime::now()).is_ok());
        assert_eq!(
            env_of(&state),
            [("CLUSTER_NAME".to_owned(), cluster.clone())],
            "the publisher re-sent its env to the survivor"
        );
        minters[i].wait_for(2).await;
        assert_eq!(homes(&[&survivor], cluster), [0]);
    }
    // Clusters that were on the survivor all along stayed where they were:
    // consistent hashing moved only the lost shard's clusters.
    for (i, cluster) in clusters.iter().enumerate() {
        if home[i] == gone {
            continue;
        }
        assert_eq!(minters[i].count(), 1, "{cluster} was not re-minted");
        assert_eq!(
            stores[i]
                .current()
                .credentials
                .aws
                .as_ref()
                .expect("aws")
                .version,
            versions[i],
            "{cluster}'s agent kept its credential"
        );
        assert_eq!(homes(&[&survivor], cluster), [0]);
    }
    drop(sessions);
    drop(proxy);
}
