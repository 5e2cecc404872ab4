//! Clusters end (issue 13, item 4), in memory: 10,000 short-lived
//! clusters come and go on a paused tokio clock (the hub itself, in
//! process); each is dropped after its grace period, its task ends, its
//! objects are freed, and the heap returns to within a few MiB of where it
//! started.
//!
//! The heap is measured by counting allocations (`stats_alloc` as this test
//! binary's global allocator), not by RSS: glibc keeps freed pages mapped,
//! so RSS stays near its peak even when nothing is held (it is printed for
//! the record). The test has a file of its own so that no other test
//! allocates in the process while it measures.

use std::alloc::System;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use credstream_broker::hub::{Cluster, ClusterHub, HubConfig};
use credstream_broker::limits;
use credstream_broker::refresh::RefreshConfig;
use credstream_proto::v1::{CredentialKind, EnvVar, PrivateEnv};
use credstream_tests::broker::aws_update;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tokio::runtime::Handle;

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// "Within a few MiB of the start".
const HEAP_SLACK: isize = 4 << 20;

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
    // One cluster keeps an agent, one is re-used before its grace ends:
    // neither may be dropped.
    let kept = hub.cluster("kept");
    let _kept_agent = kept.connect_agent("stays".into());
    let tasks_before = metrics.num_alive_tasks() - 1;
    let rss_before = rss_kib();
    let heap = Region::new(HEAP);

    let mut weak = Vec::new();
    for i in 0..10_000 {
        weak.push(live_briefly(&hub, &format!("short-{i}")));
    }
    assert_eq!(hub.len(), 10_001);
    assert_eq!(metrics.num_alive_tasks(), tasks_before + 10_001);
    let rss_peak = rss_kib();
    let heap_peak = net(&heap);

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
    drop(weak);
    let heap_after = net(&heap);
    eprintln!(
        "heap: {} KiB more with 10,000 clusters, {} KiB more after they ended; RSS: {rss_before} KiB before, {rss_peak} KiB at the peak, {} KiB after",
        heap_peak / 1024,
        heap_after / 1024,
        rss_kib()
    );
    // The measurement sees the clusters (so it can fail)...
    assert!(heap_peak > 10 * HEAP_SLACK, "{heap_peak} bytes at the peak");
    // ... and they are gone.
    assert!(
        heap_after < HEAP_SLACK,
        "{heap_after} bytes still allocated after 10,000 clusters ended"
    );
}

/// Bytes allocated and not freed since `region` began.
fn net(region: &Region<'_, System>) -> isize {
    let change = region.change();
    change.bytes_allocated as isize - change.bytes_deallocated as isize + change.bytes_reallocated
}
