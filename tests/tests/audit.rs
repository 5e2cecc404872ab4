//! `credstream-broker --audit-log FILE`: one JSON line per event of a
//! publisher's, an agent's and an issuer's life, naming tokens by id and
//! holding no secret value.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use credstream_proto::connect::CallCredentials;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{
    CreateAgentTokenRequest, CredentialKind, ListClustersRequest, Revoke, publish_request,
    subscribe_response,
};
use credstream_tests::broker::{WAIT, aws_update, open_agent, open_publisher, publisher_hello};
use credstream_tests::processes::{BrokerProcess, PROCESS_WAIT};
use credstream_tests::wait;
use prost::bytes::Buf;
use serde_json::Value;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect_lazy()
}

fn token_id(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Waits until the trail holds an event `name` matching `accept`.
async fn eventually(path: &Path, name: &str, accept: impl Fn(&Value) -> bool) -> Value {
    let what = format!("a {name} event in {}", path.display());
    wait::eventually(&what, || {
        let found = events(path)
            .into_iter()
            .find(|e| e["event"] == name && accept(e));
        async move { found }
    })
    .await
}

#[tokio::test]
async fn the_audit_trail_names_who_did_what_and_holds_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("audit.jsonl");
    let broker = BrokerProcess::start_dev_with(&["--audit-log", trail.to_str().unwrap()]).await;
    let mode = std::fs::metadata(&trail).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let mut publisher = open_publisher(
        channel(&broker.url),
        &broker.publisher_token,
        Some(publisher_hello("dev", &[CredentialKind::Aws], false)),
    )
    .await
    .unwrap();
    publisher.welcome().await;
    let connected = eventually(&trail, "publisher_connected", |_| true).await;
    assert_eq!(connected["cluster"], "dev");
    assert_eq!(connected["publisher_name"], "test");
    assert_eq!(connected["token_id"], token_id(&broker.publisher_token));
    assert!(
        connected["peer"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    let mut agent = open_agent(channel(&broker.url), &broker.agent_token, "dev", "worker-1")
        .await
        .unwrap();
    agent.expect().await;
    let subscribed = eventually(&trail, "agent_subscribed", |_| true).await;
    assert_eq!(subscribed["agent_id"], "worker-1");
    assert_eq!(subscribed["token_id"], token_id(&broker.agent_token));

    let update = aws_update("audited", Duration::from_secs(3600));
    publisher
        .send(publish_request::Message::Credential(update))
        .await;
    let published = eventually(&trail, "credential_published", |_| true).await;
    assert_eq!(published["kind"], "aws");
    assert_eq!(
        published["principal"],
        "arn:aws:sts::123456789012:assumed-role/test/session"
    );
    assert_eq!(published["account"], "123456789012");
    let version = published["version"].as_u64().unwrap();
    assert!(published["expires_at"].as_str().unwrap().ends_with('Z'));
    // The agent acknowledges it; the tally reaches the trail.
    loop {
        if let subscribe_response::Message::Credential(update) = agent.expect().await {
            agent
                .send(credstream_proto::v1::subscribe_request::Message::Ack(
                    credstream_proto::v1::AgentAck {
                        version: update.version,
                    },
                ))
                .await;
            break;
        }
    }
    eventually(&trail, "delivery", |e| {
        e["version"].as_u64() >= Some(version) && e["agents_holding"] == 1
    })
    .await;

    // An agent token issued by the publisher, and a refused call.
    let mut admin = AdminServiceClient::with_interceptor(
        channel(&broker.url),
        CallCredentials::bearer(&broker.publisher_token).unwrap(),
    );
    let issued = admin
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "dev".into(),
            ttl_seconds: 600,
            agent_id: "worker-2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let event = eventually(&trail, "token_issued", |_| true).await;
    assert_eq!(event["agent_id"], "worker-2");
    assert_eq!(event["ttl_seconds"], 600);
    assert_eq!(event["issued_token_id"], token_id(&issued.token));
    assert_eq!(event["token_id"], token_id(&broker.publisher_token));
    let forged = open_agent(channel(&broker.url), "cs1.forged.token", "dev", "x")
        .await
        .unwrap_err();
    assert_eq!(forged.code(), Code::Unauthenticated);
    let refused = eventually(&trail, "call_refused", |_| true).await;
    assert_eq!(refused["code"], "Unauthenticated");
    assert_eq!(refused["path"], "/credstream.v1.AgentService/Subscribe");
    assert!(
        refused.get("token_id").is_none(),
        "a forged token has no id"
    );

    publisher
        .send(publish_request::Message::Revoke(Revoke {
            all: true,
            ..Default::default()
        }))
        .await;
    let revoked = eventually(&trail, "revoked", |_| true).await;
    assert_eq!(revoked["all"], true);
    drop(agent);
    eventually(&trail, "agent_gone", |e| e["agent_id"] == "worker-1").await;
    drop(publisher);
    eventually(&trail, "publisher_gone", |_| true).await;

    let text = std::fs::read_to_string(&trail).unwrap();
    for secret in [
        "SECRETKEY-audited",
        "SESSIONTOKEN-audited",
        broker.publisher_token.as_str(),
        broker.agent_token.as_str(),
        issued.token.as_str(),
    ] {
        assert!(!text.contains(secret), "the audit trail holds a secret");
    }
    // Every line has a time and an event name.
    for event in events(&trail) {
        assert!(event["ts"].as_str().unwrap().ends_with('Z'), "{event}");
        assert!(event["event"].is_string(), "{event}");
    }
}

/// A codec for calls whose answer is never read: an empty message out,
/// anything back.
#[derive(Clone, Copy, Default)]
struct Nothing;

impl Codec for Nothing {
    type Encode = ();
    type Decode = ();
    type Encoder = Nothing;
    type Decoder = Nothing;
    fn encoder(&mut self) -> Nothing {
        Nothing
    }
    fn decoder(&mut self) -> Nothing {
        Nothing
    }
}

impl Encoder for Nothing {
    type Item = ();
    type Error = tonic::Status;
    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        Ok(())
    }
}

impl Decoder for Nothing {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

/// One call to `path` with a forged token; the code it was refused with.
async fn refused_call(grpc: &mut tonic::client::Grpc<Channel>, path: &str) -> Code {
    grpc.ready().await.expect("connection ready");
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("authorization", "Bearer cs1.forged.token".parse().unwrap());
    let path = http::uri::PathAndQuery::try_from(path).expect("a valid path");
    grpc.unary::<_, (), _>(request, path, Nothing)
        .await
        .expect_err("a forged token is refused")
        .code()
}

/// Finding 4 (issue 34): anyone can make refused calls, and each used to
/// write its path verbatim (1,500 calls: +22.7 MB). Now paths are cut,
/// refusals are written one by one only up to a few per peer a minute and
/// then counted into a summary, and refused calls count against their
/// connection's call limit.
#[tokio::test]
async fn a_flood_of_refused_calls_with_long_paths_grows_the_trail_by_a_bounded_amount() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("audit.jsonl");
    // A burst of 100 calls per connection and (practically) no refill.
    let mut broker = BrokerProcess::start_dev_with(&[
        "--audit-log",
        trail.to_str().unwrap(),
        "--connection-call-burst",
        "100",
        "--connection-calls-per-second",
        "0.001",
    ])
    .await;
    let hostile = format!(
        "/credstream.v1.AgentService/Subscribe/{}%1b[2J%0afake",
        "A".repeat(4000)
    );
    let (connections, per_connection) = (10, 150);
    let mut sent_path_bytes = 0;
    for _ in 0..connections {
        // A connection of its own each: the per-peer count spans them.
        let mut grpc = tonic::client::Grpc::new(channel(&broker.url));
        let mut codes = Vec::new();
        for _ in 0..per_connection {
            codes.push(refused_call(&mut grpc, &hostile).await);
            sent_path_bytes += hostile.len();
        }
        // Refused calls count against their connection: its burst, then
        // RESOURCE_EXHAUSTED before any token is looked at.
        assert!(
            codes[..100].iter().all(|c| *c == Code::Unauthenticated),
            "{codes:?}"
        );
        assert!(
            codes[100..].iter().all(|c| *c == Code::ResourceExhausted),
            "{codes:?}"
        );
    }
    // Others are still served, on their own connections.
    broker
        .admin()
        .list_clusters(ListClustersRequest {})
        .await
        .expect("an admin call on a fresh connection is served");
    // Stopping writes the summaries still open.
    broker.process.signal("TERM");
    assert!(broker.process.exit().await.success());

    let size = std::fs::metadata(&trail).unwrap().len();
    let events = events(&trail);
    let verbatim: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "call_refused")
        .collect();
    let summarised: u64 = events
        .iter()
        .filter(|e| e["event"] == "call_refused_summary")
        .map(|e| {
            assert_eq!(e["peer"], "127.0.0.1", "{e}");
            e["count"].as_u64().expect("a count")
        })
        .sum();
    let sent = (connections * per_connection) as u64;
    assert_eq!(
        verbatim.len() as u64 + summarised,
        sent,
        "every refused call is written or counted"
    );
    assert!(summarised > 0, "the flood was summarised");
    for event in &verbatim {
        let path = event["path"].as_str().unwrap();
        assert!(
            path.starts_with("/credstream.v1.AgentService/Subscribe/AAA"),
            "{path}"
        );
        assert!(
            path.len() <= 256 + "…".len(),
            "a path is cut: {} bytes",
            path.len()
        );
    }
    // A few records, not the 6 MB of paths sent.
    assert!(
        size < 16 * 1024,
        "the trail grew by {size} bytes for {sent} refused calls carrying {sent_path_bytes} bytes of path"
    );
}

/// Finding 5 (issue 34): the trail was written under a global lock on the
/// serving threads, so `--audit-log -` into a pipe nobody reads froze the
/// broker. Now a full queue drops and counts records, and serving goes on.
#[tokio::test]
async fn an_audit_stdout_nobody_reads_drops_and_counts_records_and_the_broker_keeps_serving() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut command = credstream_tests::processes::clean_command(credstream_tests::bins::binary(
        "credstream-broker",
    ));
    command
        .args(["--listen", "127.0.0.1:0", "--dev", "--audit-log", "-"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start the broker");
    // stderr is read to the end (a stalled log is another matter); stdout
    // only up to the banner, then never again.
    let (stderr_tx, mut stderr) = tokio::sync::watch::channel(String::new());
    let mut stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr_lines.next_line().await {
            stderr_tx.send_modify(|all| {
                all.push_str(&line);
                all.push('\n');
            });
        }
    });
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut metrics, mut publisher_token, mut agent_token) = Default::default();
    let banner = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            let value = |prefix: &str| line.strip_prefix(prefix).map(str::to_owned);
            if let Some(addr) = value("listening on ") {
                url = format!("http://{addr}");
            } else if let Some(addr) = value("metrics on http://") {
                metrics = addr.trim_end_matches("/metrics").to_owned();
            } else if let Some(token) = value("CREDSTREAM_PUBLISHER_TOKEN=") {
                publisher_token = token;
            } else if let Some(token) = value("CREDSTREAM_AGENT_TOKEN=") {
                agent_token = token;
            } else if line.starts_with("CREDSTREAM_ADMIN_TOKEN=") {
                return;
            }
        }
        panic!("the broker's stdout closed before its banner");
    };
    tokio::time::timeout(PROCESS_WAIT, banner)
        .await
        .expect("the broker printed its banner");
    let metrics: std::net::SocketAddr = metrics.parse().expect("the metrics address");

    // Far more records than the pipe (64 KiB) and the queue (1,024 lines)
    // hold: one credential_published each.
    let mut publisher = open_publisher(
        channel(&url),
        &publisher_token,
        Some(publisher_hello("dev", &[CredentialKind::Aws], false)),
    )
    .await
    .unwrap();
    publisher.welcome().await;
    let updates = 3_000;
    for n in 0..updates {
        publisher
            .send(publish_request::Message::Credential(aws_update(
                &format!("stalled{n}"),
                Duration::from_secs(3600),
            )))
            .await;
    }
    let dropped = wait::eventually("the dropped records in the metrics", || async {
        let text = scrape(metrics).await;
        text.lines()
            .find_map(|l| l.strip_prefix("credstream_audit_records_dropped_total "))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n > 0)
    })
    .await;
    assert!(dropped < updates, "{dropped}");
    let warned = tokio::time::timeout(
        WAIT,
        stderr.wait_for(|text| text.contains("records are being dropped")),
    )
    .await
    .expect("a warning says records are dropped")
    .unwrap()
    .clone();
    assert!(warned.contains("dropped="), "{warned}");

    // The broker still serves: the last credential reaches a new agent,
    // and admin calls answer.
    let last = format!("ASIAstalled{}", updates - 1);
    let mut agent = open_agent(channel(&url), &agent_token, "dev", "worker-1")
        .await
        .expect("Subscribe is served while the trail is stalled");
    loop {
        let held = match agent.expect().await {
            subscribe_response::Message::Snapshot(snapshot) => snapshot.credentials,
            subscribe_response::Message::Credential(update) => vec![update],
            _ => continue,
        };
        let delivered = held.iter().any(|update| {
            matches!(
                &update.credential,
                Some(credstream_proto::v1::credential_update::Credential::Aws(aws))
                    if aws.access_key_id == last
            )
        });
        if delivered {
            break;
        }
    }
    let admin = AdminServiceClient::with_interceptor(
        channel(&url),
        CallCredentials::bearer(&publisher_token).unwrap(),
    )
    .list_clusters(ListClustersRequest {})
    .await
    .expect("admin calls answer while the trail is stalled")
    .into_inner();
    assert_eq!(admin.clusters.len(), 1);

    // It stops on SIGTERM, giving up on what the stalled output never took.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(PROCESS_WAIT, child.wait())
        .await
        .expect("the broker exits although its audit output is stalled")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    drop(stdout);
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// Finding 5 (issue 34): logrotate renames the file and sends SIGHUP; new
/// records then go to a fresh file at the original path.
#[tokio::test]
async fn sighup_after_a_rename_sends_new_records_to_a_fresh_file_at_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("audit.jsonl");
    let rotated = dir.path().join("audit.jsonl.1");
    let mut broker = BrokerProcess::start_dev_with(&["--audit-log", trail.to_str().unwrap()]).await;
    let mut publisher = open_publisher(
        channel(&broker.url),
        &broker.publisher_token,
        Some(publisher_hello("dev", &[CredentialKind::Aws], false)),
    )
    .await
    .unwrap();
    publisher.welcome().await;
    eventually(&trail, "publisher_connected", |_| true).await;

    std::fs::rename(&trail, &rotated).unwrap();
    broker.process.signal("HUP");
    broker
        .process
        .stderr_line(|l| l.contains("audit trail reopened"))
        .await;
    let mut agent = open_agent(channel(&broker.url), &broker.agent_token, "dev", "worker-1")
        .await
        .unwrap();
    agent.expect().await;
    let subscribed = eventually(&trail, "agent_subscribed", |_| true).await;
    assert_eq!(subscribed["agent_id"], "worker-1");
    let mode = std::fs::metadata(&trail).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let old = events(&rotated);
    assert!(old.iter().any(|e| e["event"] == "publisher_connected"));
    assert!(
        old.iter().all(|e| e["event"] != "agent_subscribed"),
        "a record after the reopen went to the rotated file"
    );
    assert!(
        events(&trail)
            .iter()
            .all(|e| e["event"] != "publisher_connected"),
        "the fresh file holds only what came after the reopen"
    );
}
