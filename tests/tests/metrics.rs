//! `--metrics-listen`: the Prometheus endpoint reports clusters, agents,
//! publishers, expiry and refresh outcomes, and no secret; it listens on
//! loopback unless told otherwise, and idle connections cannot starve the
//! gRPC port.

use std::time::Duration;

use credstream_proto::v1::{CredentialKind, publish_request, publish_response, subscribe_response};
use credstream_tests::bins::binary;
use credstream_tests::broker::{TestBroker, WAIT, aws_update};
use credstream_tests::processes::{BrokerProcess, Process, clean_command};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

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

/// The port of the "metrics on http://ADDR/metrics" line `broker` printed.
async fn metrics_addr(broker: &mut BrokerProcess) -> std::net::SocketAddr {
    let line = broker
        .process
        .line(|l| l.starts_with("metrics on http://"))
        .await;
    line.trim_start_matches("metrics on http://")
        .trim_end_matches("/metrics")
        .parse()
        .expect("the metrics address")
}

/// True once the broker has closed `stream` (EOF or reset).
async fn closed_by_broker(stream: &mut tokio::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Finding 12 (issue 34): the metrics port had no connection cap and no
/// header deadline, and its connections took the descriptors the gRPC port
/// needs. Idle connections far beyond the cap (and the descriptor limit)
/// now leave gRPC answering, and are all closed.
#[tokio::test]
async fn idle_metrics_connections_beyond_the_cap_do_not_starve_the_grpc_port() {
    // 128 descriptors: the gRPC cap is 128 - 64; 400 idle metrics
    // connections would take every descriptor left.
    let mut broker = BrokerProcess::start_dev_under(
        &["prlimit", "--nofile=128:128", "--"],
        &["--metrics-listen", "127.0.0.1:0"],
    )
    .await;
    let metrics = metrics_addr(&mut broker).await;
    let mut held = Vec::new();
    for _ in 0..400 {
        held.push(tokio::net::TcpStream::connect(metrics).await.unwrap());
    }
    let mut health = HealthClient::new(
        Channel::from_shared(broker.url.clone())
            .unwrap()
            .connect_lazy(),
    );
    let answer = tokio::time::timeout(
        WAIT,
        health.check(HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("gRPC answers while idle metrics connections are held")
    .expect("health ok");
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    let answer = broker
        .status("dev")
        .await
        .expect_err("no state for dev yet");
    assert_eq!(
        answer.code(),
        tonic::Code::NotFound,
        "an answer: {answer:?}"
    );
    // Every idle connection is closed: beyond the cap at once, within it
    // at the header deadline.
    for stream in &mut held {
        assert!(
            closed_by_broker(stream).await,
            "an idle metrics connection stayed open"
        );
    }
    // And the endpoint serves again.
    let text = get_metrics(metrics).await;
    assert!(text.contains("credstream_clusters 0"), "{text}");
}

/// Finding 12 (issue 34): the endpoint tells anyone who connects every
/// cluster's name and expiry, so it listens on loopback unless
/// `--metrics-public` says otherwise.
#[tokio::test]
async fn metrics_on_a_non_loopback_address_need_metrics_public() {
    let mut command = clean_command(binary("credstream-broker"));
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--dev",
        "--metrics-listen",
        "0.0.0.0:0",
    ]);
    let mut refused = Process::spawn("credstream-broker", command);
    let status = refused.exit().await;
    assert!(!status.success());
    let stderr = refused.stderr();
    assert!(
        stderr.contains("refusing to serve metrics on 0.0.0.0:0")
            && stderr.contains("--metrics-public"),
        "{stderr}"
    );
    assert!(
        !refused.stdout().contains("listening on"),
        "refused before serving anything"
    );

    let mut public =
        BrokerProcess::start_dev_with(&["--metrics-listen", "0.0.0.0:0", "--metrics-public"]).await;
    let addr = metrics_addr(&mut public).await;
    assert!(addr.ip().is_unspecified(), "{addr}");
    let text = get_metrics(([127, 0, 0, 1], addr.port()).into()).await;
    assert!(text.contains("credstream_clusters"), "{text}");
}
