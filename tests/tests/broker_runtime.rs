//! `credstream-broker --worker-threads`: the threads that serve
//! connections, for hosts whose cores other work shares.

use credstream_proto::v1::ListClustersRequest;
use credstream_tests::bins::binary;
use credstream_tests::processes::{BrokerProcess, clean_command};

#[tokio::test]
async fn the_broker_serves_on_the_worker_threads_it_was_given() {
    let mut broker = BrokerProcess::start_dev_with(&["--worker-threads", "1"]).await;
    // The count the runtime reports, not the flag echoed back.
    let line = broker
        .process
        .stderr_line(|l| l.contains("serving threads"))
        .await;
    assert!(line.contains("worker_threads=1"), "{line}");

    broker
        .admin()
        .list_clusters(ListClustersRequest::default())
        .await
        .expect("a one-thread broker answers");
}

#[tokio::test]
async fn zero_worker_threads_is_refused_before_anything_is_served() {
    let output = clean_command(binary("credstream-broker"))
        .args(["--listen", "127.0.0.1:0", "--dev", "--worker-threads", "0"])
        .output()
        .await
        .expect("run the broker");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--worker-threads"), "{stderr}");
    assert!(stderr.contains("1..=1024"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&output.stdout).contains("listening on"),
        "{stderr}"
    );
}
