//! Hostile inputs the attack probe found, each kept fixed: idle connections
//! that exhausted the broker, call limits bypassed by padding or shared by
//! a whole cluster, tokens that outlived their issuer, log injection,
//! undecodable messages answered `INTERNAL`, refusals that named the wrong
//! cause, a draining broker that kept taking streams, and (since the broker
//! serves its connections itself) a flood of streams it must reset.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use credstream_broker::auth::{Role, TokenKey};
use credstream_broker::rate_limit::CallRate;
use credstream_proto::connect::CallCredentials;
use credstream_proto::convert::system_time;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{
    AgentHello, CreateAgentTokenRequest, CredentialKind, ListClustersRequest, PublisherHello,
    publish_request, subscribe_response,
};
use credstream_tests::bins::binary;
use credstream_tests::broker::{
    TestBroker, WAIT, aws_update, open_agent, open_agent_with, open_publisher,
};
use credstream_tests::processes::BrokerProcess;
use prost::bytes::{Buf, BufMut};
use tokio::net::TcpStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect_lazy()
}

/// CPU seconds (user + system) the process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat shape")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().expect("addr")
}

async fn hold_idle_connections(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        // The kernel completes connections the broker has not accepted
        // yet, so connecting never waits on the broker.
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    held
}

/// Health and a legitimate Subscribe are served while `held` idle
/// connections sit on the broker.
async fn served_while_held(broker: &BrokerProcess) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&broker.url));
    let answer = tokio::time::timeout(
        WAIT,
        health.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        }),
    )
    .await
    .expect("health answered while idle connections are held")
    .expect("health ok");
    assert_eq!(answer.into_inner().status, 1, "SERVING");
    let mut agent = tokio::time::timeout(
        WAIT,
        open_agent(channel(&broker.url), &broker.agent_token, "dev", "worker-1"),
    )
    .await
    .expect("Subscribe answered while idle connections are held")
    .expect("Subscribe accepted");
    assert!(matches!(
        agent.expect().await,
        subscribe_response::Message::Snapshot(_)
    ));
}

async fn closed_by_broker(stream: &mut TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_and_the_fd_limit_do_not_starve_the_broker() {
    // A soft limit of 128 raised to the hard 256; default cap 256 - 64.
    let mut broker = BrokerProcess::start_dev_under(
        &["prlimit", "--nofile=128:256", "--"],
        &["--handshake-timeout", "2s"],
    )
    .await;
    let raised = broker
        .process
        .stderr_line(|l| l.contains("file descriptor limit raised"))
        .await;
    assert!(
        raised.contains("fd_limit=256") && raised.contains("raised_from=128"),
        "{raised}"
    );
    let listening = broker
        .process
        .stderr_line(|l| l.contains("broker listening"))
        .await;
    assert!(listening.contains("max_connections=192"), "{listening}");

    let cpu_before = cpu_seconds(broker.process.pid());
    let wall = Instant::now();
    let mut held = hold_idle_connections(addr_of(&broker.url), 400).await;
    served_while_held(&broker).await;
    // Every idle connection is closed: beyond the cap at once or evicted,
    // within it at the handshake deadline.
    for stream in &mut held {
        assert!(
            closed_by_broker(stream).await,
            "an idle connection stayed open"
        );
    }
    served_while_held(&broker).await;
    let cpu = cpu_seconds(broker.process.pid()) - cpu_before;
    let elapsed = wall.elapsed().as_secs_f64();
    // Spinning on accept burns a whole core; serving costs a few percent.
    assert!(
        cpu < 0.5 * elapsed,
        "broker used {cpu:.2} CPU-seconds in {elapsed:.2} s holding idle connections"
    );
}

#[tokio::test]
async fn a_cap_above_the_fd_limit_backs_off_on_emfile_instead_of_spinning() {
    let mut broker = BrokerProcess::start_dev_under(
        &["prlimit", "--nofile=128:128", "--"],
        &["--max-connections", "1000", "--handshake-timeout", "30s"],
    )
    .await;
    let cpu_before = cpu_seconds(broker.process.pid());
    let wall = Instant::now();
    // More than the descriptors the broker has: accept meets EMFILE.
    let held = hold_idle_connections(addr_of(&broker.url), 300).await;
    broker
        .process
        .stderr_line(|l| l.contains("cannot accept connections"))
        .await;
    // The broker closes handshaking connections to serve new ones.
    served_while_held(&broker).await;
    let cpu = cpu_seconds(broker.process.pid()) - cpu_before;
    let elapsed = wall.elapsed().as_secs_f64();
    assert!(
        cpu < 0.5 * elapsed,
        "broker used {cpu:.2} CPU-seconds in {elapsed:.2} s at EMFILE"
    );
    drop(held);
}

/// Sends `authorization` exactly as given, padding and all.
#[derive(Clone)]
struct RawAuthorization(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for RawAuthorization {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

fn admin_with_header(
    url: &str,
    header: &str,
) -> AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, RawAuthorization>>
{
    let value = header.parse().expect("ascii header");
    AdminServiceClient::with_interceptor(channel(url), RawAuthorization(value))
}

#[tokio::test]
async fn padding_the_token_does_not_buy_a_fresh_burst() {
    let broker = TestBroker::start_with(|config| {
        config.call_rate = CallRate {
            per_second: 0.001,
            burst: 3.0,
        };
    })
    .await;
    let token = broker.token(Role::Admin, None);
    let mut plain = admin_with_header(&broker.url(), &format!("Bearer {token}"));
    for _ in 0..3 {
        plain.list_clusters(ListClustersRequest {}).await.unwrap();
    }
    let refused = plain
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let mut served = 0;
    for pad in 0..16 {
        let header = match pad % 4 {
            0 => format!("Bearer {}{token}", " ".repeat(pad / 4 + 1)),
            1 => format!("Bearer {token}{}", " ".repeat(pad / 4 + 1)),
            2 => format!("Bearer {}{token}\t", " ".repeat(pad / 4)),
            _ => format!("Bearer \t{token}{}", " ".repeat(pad / 4)),
        };
        match admin_with_header(&broker.url(), &header)
            .list_clusters(ListClustersRequest {})
            .await
        {
            Ok(_) => served += 1,
            Err(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
    }
    assert_eq!(
        served, 0,
        "padded variants of an exhausted token were served"
    );
    // Another token is unaffected.
    let other = broker
        .key
        .issue(Role::Admin, None, Duration::from_secs(1800))
        .unwrap();
    admin_with_header(&broker.url(), &format!("Bearer {other}"))
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn one_holder_of_a_shared_agent_token_cannot_lock_its_cluster_mates_out() {
    let broker = TestBroker::start_with(|config| {
        config.call_rate = CallRate {
            per_second: 1.0,
            burst: 400.0,
        };
    })
    .await;
    let shared = broker.token(Role::Agent, Some("c"));
    // The misbehaving holder: 500 Subscribe calls on one connection, as
    // fast as the broker answers, then it keeps going.
    let noisy = channel(&broker.url());
    let mut refused_noisy = 0;
    for _ in 0..500 {
        match open_agent(noisy.clone(), &shared, "c", "noisy").await {
            Ok(agent) => drop(agent),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                refused_noisy += 1;
            }
        }
    }
    assert!(refused_noisy > 0, "the flood was never refused");
    let flood = tokio::spawn({
        let shared = shared.clone();
        async move {
            loop {
                let _ = open_agent(noisy.clone(), &shared, "c", "noisy").await;
                tokio::task::yield_now().await;
            }
        }
    });
    // 30 legitimate reconnects with the same token, each a new
    // connection, all served.
    for attempt in 0..30 {
        let mut agent = open_agent(channel(&broker.url()), &shared, "c", "worker-2")
            .await
            .unwrap_or_else(|status| panic!("legitimate attempt {attempt} refused: {status:?}"));
        assert!(matches!(
            agent.expect().await,
            subscribe_response::Message::Snapshot(_)
        ));
    }
    flood.abort();
}

#[tokio::test]
async fn per_agent_tokens_have_their_own_limit_and_bind_the_hello() {
    let broker = TestBroker::start_with(|config| {
        config.call_rate = CallRate {
            per_second: 0.001,
            burst: 5.0,
        };
    })
    .await;
    let ttl = Duration::from_secs(600);
    let evil = broker
        .key
        .issue_for_agent(Role::Agent, Some("c"), Some("w-evil"), ttl)
        .unwrap();
    let good = broker
        .key
        .issue_for_agent(Role::Agent, Some("c"), Some("w-good"), ttl)
        .unwrap();
    // A bound token names its agent in the hello or is refused.
    let wrong = open_agent(channel(&broker.url()), &good, "c", "w-evil")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::PermissionDenied);
    assert!(
        wrong.message().contains("bound to agent \"w-good\""),
        "{wrong:?}"
    );
    // One worker exhausts its own token on many connections...
    let mut exhausted = false;
    for _ in 0..20 {
        if let Err(status) = open_agent(channel(&broker.url()), &evil, "c", "w-evil").await {
            assert_eq!(status.code(), Code::ResourceExhausted);
            exhausted = true;
        }
    }
    assert!(exhausted);
    // ...and the other still subscribes (the refused hello above cost it
    // one call of its five).
    for _ in 0..4 {
        let mut agent = open_agent(channel(&broker.url()), &good, "c", "w-good")
            .await
            .expect("a worker with its own token is served");
        assert!(matches!(
            agent.expect().await,
            subscribe_response::Message::Snapshot(_)
        ));
    }
}

#[tokio::test]
async fn the_token_command_binds_an_agent_id() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    let run = |args: &[&str]| {
        let mut command = std::process::Command::new(binary("credstream-broker"));
        command
            .env_clear()
            .arg("token")
            .arg("--token-key-file")
            .arg(&key_file)
            .args(args);
        command.output().expect("credstream-broker token runs")
    };
    let out = run(&["--role", "agent", "--cluster", "c", "--agent-id", "w-1"]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap();
    let claims = TokenKey::from_file(&key_file)
        .unwrap()
        .verify(token.trim())
        .unwrap();
    assert_eq!(claims.agent_id.as_deref(), Some("w-1"));
    let refused = run(&["--role", "publisher", "--cluster", "c", "--agent-id", "w-1"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("needs --role agent"), "{stderr}");
}

#[tokio::test]
async fn an_agent_token_never_outlives_the_token_that_asked_for_it() {
    let broker = TestBroker::start().await;
    let short = broker
        .key
        .issue(Role::Publisher, Some("c"), Duration::from_secs(60))
        .unwrap();
    let issuer_expiry = broker.key.verify(&short).unwrap().expires;
    let mut admin = AdminServiceClient::with_interceptor(
        broker.channel(),
        CallCredentials::bearer(&short).unwrap(),
    );
    let issued = admin
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "c".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let claims = broker.key.verify(&issued.token).unwrap();
    assert!(
        claims.expires <= issuer_expiry,
        "{} > {issuer_expiry}",
        claims.expires
    );
    let stated = system_time(issued.expires_at.as_ref().unwrap()).unwrap();
    assert!(
        stated <= SystemTime::UNIX_EPOCH + Duration::from_secs(issuer_expiry),
        "expires_at says the truth"
    );
    let refused = admin
        .create_agent_token(CreateAgentTokenRequest {
            cluster_id: "c".into(),
            ttl_seconds: 7 * 24 * 3600,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("never outlives"), "{refused:?}");
}

#[tokio::test]
async fn a_publisher_name_that_would_forge_log_lines_is_refused() {
    let mut broker = BrokerProcess::start_dev().await;
    let hostile = "alice\n2026-12-01T00:00:00Z  INFO forged: admin token issued\u{1b}[2J";
    let mut publisher = open_publisher(
        channel(&broker.url),
        &broker.publisher_token,
        Some(publish_request::Message::Hello(PublisherHello {
            cluster_id: "dev".into(),
            kinds: vec![CredentialKind::Aws as i32],
            publisher_name: hostile.into(),
            ..Default::default()
        })),
    )
    .await
    .expect("stream opens");
    let refused = publisher.ended_with().await;
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("printable ASCII"), "{refused:?}");
    // The cluster was not touched, and the log holds no forged line.
    let status = broker.status("dev").await;
    assert!(
        status
            .as_ref()
            .map_or(true, |s| s.publisher_name.is_empty()),
        "{status:?}"
    );
    // A legitimate publisher after it is logged, so the log is flushed
    // past the refusal.
    let mut ok = open_publisher(
        channel(&broker.url),
        &broker.publisher_token,
        Some(credstream_tests::broker::publisher_hello(
            "dev",
            &[CredentialKind::Aws],
            false,
        )),
    )
    .await
    .unwrap();
    ok.welcome().await;
    broker
        .process
        .stderr_line(|l| l.contains("publisher connected"))
        .await;
    let log = broker.process.stderr();
    assert!(!log.contains("forged"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log}");
}

/// A codec that sends raw bytes as the message and ignores the answer.
#[derive(Default, Clone)]
struct RawBytes;

impl Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = ();
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

async fn send_raw(broker: &TestBroker, path: &'static str, token: &str, body: Vec<u8>) -> Status {
    let mut grpc = tonic::client::Grpc::new(broker.channel());
    grpc.ready().await.unwrap();
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    if path.path().ends_with("Subscribe") {
        let stream = tokio_stream::once(request.into_inner());
        let mut streaming = Request::new(stream);
        streaming
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        match grpc.streaming(streaming, path, RawBytes).await {
            Ok(response) => {
                let mut inbound = response.into_inner();
                loop {
                    match inbound.message().await {
                        Ok(Some(())) => continue,
                        Ok(None) => panic!("stream ended without a status"),
                        Err(status) => return status,
                    }
                }
            }
            Err(status) => status,
        }
    } else {
        grpc.unary(request, path, RawBytes)
            .await
            .expect_err("an undecodable request is refused")
    }
}

#[tokio::test]
async fn undecodable_messages_are_invalid_argument_not_internal() {
    let broker = TestBroker::start().await;
    let admin = broker.token(Role::Admin, None);
    let agent = broker.token(Role::Agent, Some("c"));
    // A length-delimited field claiming more bytes than there are, and a
    // `string` field holding invalid UTF-8.
    for body in [vec![0x0a, 100, 1, 2], vec![0x0a, 0x02, 0xff, 0xfe]] {
        let unary = send_raw(
            &broker,
            "/credstream.v1.AdminService/GetCluster",
            &admin,
            body.clone(),
        )
        .await;
        assert_eq!(unary.code(), Code::InvalidArgument, "{unary:?}");
        assert!(unary.message().contains("GetClusterRequest"), "{unary:?}");
        let stream = send_raw(
            &broker,
            "/credstream.v1.AgentService/Subscribe",
            &agent,
            body,
        )
        .await;
        assert_eq!(stream.code(), Code::InvalidArgument, "{stream:?}");
    }
    // Nothing was created by the refused calls.
    assert_eq!(broker.status("c").await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn an_oversized_session_token_is_refused_for_its_size_and_loses_nothing() {
    let broker = TestBroker::start().await;
    let mut publisher = broker.publisher("c", &[CredentialKind::Aws], false).await;
    publisher.welcome().await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "good",
            Duration::from_secs(3600),
        )))
        .await;
    let deadline = Instant::now() + WAIT;
    let before = loop {
        let status = broker.status("c").await.unwrap();
        if !status.credentials.is_empty() {
            break status.credentials;
        }
        assert!(Instant::now() < deadline, "the credential never arrived");
        tokio::task::yield_now().await;
    };
    let mut oversized = aws_update("big", Duration::from_secs(3600));
    if let Some(credstream_proto::v1::credential_update::Credential::Aws(aws)) =
        oversized.credential.as_mut()
    {
        aws.session_token = "t".repeat(20 * 1024);
    }
    publisher
        .send(publish_request::Message::Credential(oversized))
        .await;
    let refused = publisher.ended_with().await;
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        "aws.session_token is longer than 16384 bytes"
    );
    let status = broker.status("c").await.unwrap();
    assert_eq!(
        status.credentials, before,
        "the good credential is still the latest"
    );
}

#[tokio::test]
async fn a_draining_broker_sends_no_snapshot_to_new_streams() {
    let broker = BrokerProcess::start_dev().await;
    // 200 agent streams over 20 connections, each holding its snapshot.
    let channels: Vec<Channel> = (0..20).map(|_| channel(&broker.url)).collect();
    let mut agents = Vec::new();
    for n in 0..200 {
        let mut agent = open_agent(
            channels[n % 20].clone(),
            &broker.agent_token,
            "dev",
            &format!("w-{n}"),
        )
        .await
        .expect("subscribed");
        assert!(matches!(
            agent.expect().await,
            subscribe_response::Message::Snapshot(_)
        ));
        agents.push(agent);
    }
    broker.process.signal("TERM");
    // Every agent sees its stream end and reconnects at once, on its
    // connection and on a new one: the draining broker answers none of
    // them with a snapshot.
    let mut snapshots_after_term = 0;
    for (n, mut agent) in agents.into_iter().enumerate() {
        loop {
            match tokio::time::timeout(WAIT, agent.rx.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(_) => break,
                Err(_) => panic!("agent {n}'s stream did not end after SIGTERM"),
            }
        }
        for via in [channels[n % 20].clone(), channel(&broker.url)] {
            let hello = credstream_proto::v1::subscribe_request::Message::Hello(AgentHello {
                cluster_id: "dev".into(),
                agent_id: format!("w-{n}"),
                ..Default::default()
            });
            if let Ok(Ok(mut again)) =
                tokio::time::timeout(WAIT, open_agent_with(via, &broker.agent_token, Some(hello)))
                    .await
                && let Ok(Ok(Some(message))) = tokio::time::timeout(WAIT, again.rx.message()).await
                && matches!(
                    message.message,
                    Some(subscribe_response::Message::Snapshot(_))
                )
            {
                snapshots_after_term += 1;
            }
        }
    }
    assert_eq!(snapshots_after_term, 0);
}

/// One HTTP/2 frame: its type, flags, stream id and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The flood RUSTSEC-2024-0003 describes: a client opening stream after
/// stream that the server must reset for breaking the protocol (here a
/// `connection` header, which HTTP/2 forbids). hyper stops it after 1,024
/// such resets on one connection (tonic's server turned that limit off;
/// `broker/src/serving.rs` keeps it): the connection gets a GOAWAY with
/// ENHANCE_YOUR_CALM, and the broker goes on serving everyone else.
#[tokio::test]
async fn a_flood_of_streams_the_broker_must_reset_is_cut_off_and_loses_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    const STREAMS: u32 = 2_000;

    let broker = TestBroker::start().await;
    let clusters = async |when: &str| {
        broker
            .admin()
            .list_clusters(ListClustersRequest::default())
            .await
            .unwrap_or_else(|status| panic!("the broker answers {when} the flood: {status}"))
            .into_inner()
    };
    let clusters_before = clusters("before").await;

    let mut stream = TcpStream::connect(addr_of(&broker.url())).await.unwrap();
    // :method POST, :scheme http, :path / from HPACK's static table, then
    // `connection: close` as a literal.
    let mut block = vec![0x83, 0x86, 0x84, 0x00, 10];
    block.extend_from_slice(b"connection");
    block.push(5);
    block.extend_from_slice(b"close");
    let mut flood = credstream_broker::connections::PREFACE.to_vec();
    flood.extend(h2_frame(SETTINGS, 0, 0, &[]));
    for n in 0..STREAMS {
        flood.extend(h2_frame(HEADERS, END_STREAM_AND_HEADERS, 2 * n + 1, &block));
    }
    let (mut read, mut write) = stream.split();
    // The broker may close the connection before it has read everything.
    let sending = async {
        let _ = write.write_all(&flood).await;
    };
    let receiving = async {
        let mut received = Vec::new();
        let mut resets = 0u32;
        let mut goaway = None;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            // Until the broker closes the connection, or no GOAWAY came
            // within WAIT (then the assertions below say what did).
            match tokio::time::timeout(WAIT, read.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) | Err(_) => break,
                Ok(Ok(n)) => received.extend_from_slice(&chunk[..n]),
            }
            while received.len() >= 9 {
                let length =
                    u32::from_be_bytes([0, received[0], received[1], received[2]]) as usize;
                if received.len() < 9 + length {
                    break;
                }
                let payload = &received[9..9 + length];
                match received[3] {
                    RST_STREAM => resets += 1,
                    GOAWAY => {
                        goaway = Some((
                            u32::from_be_bytes(payload[4..8].try_into().unwrap()),
                            String::from_utf8_lossy(&payload[8..]).into_owned(),
                        ))
                    }
                    _ => {}
                }
                received.drain(..9 + length);
            }
        }
        (resets, goaway)
    };
    let ((), (resets, goaway)) = tokio::join!(sending, receiving);
    assert_eq!(
        goaway.as_ref().map(|(code, _)| *code),
        Some(ENHANCE_YOUR_CALM),
        "a GOAWAY saying why ({resets} streams reset first)"
    );
    assert_eq!(goaway.unwrap().1, "too_many_internal_resets");
    assert!(
        resets <= 1_024,
        "at most the limit's 1,024 resets before the GOAWAY, not one per stream sent ({STREAMS}): {resets}"
    );

    // Nothing lost: the same answer as before, and a publisher still gets
    // its welcome.
    assert_eq!(clusters("after").await, clusters_before);
    let mut publisher = broker.publisher("c1", &[CredentialKind::Aws], false).await;
    publisher.welcome().await;
}
