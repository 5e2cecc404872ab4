//! `--metrics-listen`: the Prometheus endpoint reports clusters, agents,
//! publishers, expiry and refresh outcomes, and no secret.

use std::time::Duration;

use credstream_proto::v1::{CredentialKind, publish_request, publish_response, subscribe_response};
use credstream_tests::broker::{TestBroker, aws_update};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get_metrics(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

#[tokio::test]
async fn metrics_report_the_cluster_without_secrets() {
    let broker = TestBroker::start().await;
    let metrics = credstream_broker::metrics::serve(
        "127.0.0.1:0".parse().unwrap(),
        broker.broker.hub.clone(),
    )
    .await
    .unwrap()
    .local_addr;
    let cluster = "observed";
    let mut publisher = broker
        .publisher(cluster, &[CredentialKind::Aws], false)
        .await;
    let request = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::RefreshRequest(r)) => Some(r.clone()),
            _ => None,
        })
        .await;
    let mut update = aws_update("metrics", Duration::from_secs(3600));
    update.refresh_request_id = request.id;
    publisher
        .send(publish_request::Message::Credential(update))
        .await;
    let mut agent = broker.agent(cluster, "a1").await;
    loop {
        match agent.expect().await {
            subscribe_response::Message::Snapshot(s) if !s.credentials.is_empty() => break,
            subscribe_response::Message::Credential(_) => break,
            _ => {}
        }
    }
    let text = get_metrics(metrics).await;
    assert!(text.contains("text/plain; version=0.0.4"), "{text}");
    for line in [
        "credstream_clusters 1",
        "credstream_agents_connected{cluster=\"observed\"} 1",
        "credstream_publisher_connected{cluster=\"observed\"} 1",
        "credstream_refresh_total{cluster=\"observed\",reason=\"missing\",outcome=\"fulfilled\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(text.contains(
        "credstream_credential_expiry_timestamp_seconds{cluster=\"observed\",kind=\"aws\"}"
    ));
    for secret in ["SECRETKEY-", "SESSIONTOKEN-", "ASIAmetrics"] {
        assert!(
            !text.contains(secret),
            "a secret or key id is in the metrics"
        );
    }
}
