//! Tokens on long-lived streams (finding 1 of issue 34, issue 31): a
//! stream ends when its token expires or its key leaves the ring, and
//! peers that keep the broker's renewals run past any one token — through
//! a key rotation and a broker restart too.

use std::path::Path;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use credstream_broker::auth::{Claims, Role, TokenKey};
use credstream_client::session::{PublishSession, SessionEvent};
use credstream_proto::connect::CallCredentials;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{
    CreateAgentTokenRequest, CredentialKind, TokenRenewal, publish_request, subscribe_response,
};
use credstream_tests::broker::{
    RawAgent, RawPublisher, WAIT, aws_update, open_agent, open_publisher, open_renewing_agent,
    publisher_hello,
};
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{BrokerProcess, write_file};
use credstream_tests::publish::local_address;
use credstream_tests::sealed_agent::{AgentProcess, aws_credentials_at};
use credstream_tests::wait;
use tonic::Code;
use tonic::transport::Channel;

fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect_lazy()
}

fn ring(path: &Path, keys: &[[u8; 32]]) {
    let lines: Vec<String> = keys.iter().map(|k| STANDARD.encode(k)).collect();
    std::fs::write(path, format!("credstream-keys v1\n{}\n", lines.join("\n"))).unwrap();
}

/// A token of the key file's signing key for cluster `dev`.
fn token(key_file: &Path, role: Role, ttl: Duration) -> String {
    TokenKey::from_file(key_file)
        .unwrap()
        .issue(role, Some("dev"), ttl)
        .unwrap()
}

/// What `token` says, as the broker holding `key_file` reads it.
fn claims(key_file: &Path, token: &str) -> Claims {
    TokenKey::from_file(key_file)
        .unwrap()
        .verify(token)
        .unwrap_or_else(|status| panic!("the token does not verify: {status:?}"))
}

async fn logged(broker: &BrokerProcess, what: &str, times: usize) {
    wait::eventually(&format!("{times} × {what:?} in the broker's log"), || {
        let seen = broker.process.stderr().matches(what).count() >= times;
        async move { seen.then_some(()) }
    })
    .await
}

/// The next renewal on `agent`'s stream (skipping state messages).
async fn renewal(agent: &mut RawAgent) -> TokenRenewal {
    loop {
        if let subscribe_response::Message::TokenRenewal(renewal) = agent.expect().await {
            return renewal;
        }
    }
}

/// Publishes an AWS credential tagged `tag`; the stream is returned so that
/// the caller holds it open while the credential fans out.
async fn publish(broker: &BrokerProcess, publisher_token: &str, tag: &str) -> RawPublisher {
    let mut publisher = open_publisher(
        channel(&broker.url),
        publisher_token,
        Some(publisher_hello("dev", &[CredentialKind::Aws], false)),
    )
    .await
    .expect("publisher");
    publisher.welcome().await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            tag,
            Duration::from_secs(3600),
        )))
        .await;
    publisher
}

/// The access key id of the next credential on `agent`'s stream.
async fn next_credential(agent: &mut RawAgent) -> String {
    loop {
        if let subscribe_response::Message::Credential(update) = agent.expect().await
            && let Some(credstream_proto::v1::credential_update::Credential::Aws(aws)) =
                &update.credential
        {
            return aws.access_key_id.clone();
        }
    }
}

#[tokio::test]
async fn a_real_agent_receives_updates_past_its_tokens_expiry_because_it_was_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token.key");
    std::fs::write(&key_file, [7u8; 32]).unwrap();
    let broker =
        BrokerProcess::start_dev_with(&["--token-key-file", key_file.to_str().unwrap()]).await;
    let agent_token = token(&key_file, Role::Agent, Duration::from_secs(4));
    let expires = claims(&key_file, &agent_token).expires_at();
    let token_file = write_file(dir.path(), "agent.token", &agent_token);
    let mut agent = AgentProcess::spawn(&broker.url, "dev", "w-1", &token_file, None, dir.path());

    // A 4 s token is renewed 2 s before it expires; the third renewal
    // comes after the first token has expired.
    wait::eventually("three renewals in the agent's log", || {
        let renewals = agent
            .process
            .stderr()
            .matches("token renewed, valid until")
            .count();
        async move { (renewals >= 3).then_some(()) }
    })
    .await;
    assert!(SystemTime::now() > expires, "the first token has expired");
    let _publisher = publish(&broker, &broker.publisher_token, "AFTEREXPIRY").await;
    let env = agent.ready_env().await;
    let (uri, authorization) = (
        &env["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
        &env["AWS_CONTAINER_AUTHORIZATION_TOKEN"],
    );
    wait::eventually(
        "the agent serves the credential published after expiry",
        || async {
            let (status, body) = aws_credentials_at(uri, authorization).await;
            (status == 200 && body["AccessKeyId"] == "ASIAAFTEREXPIRY").then_some(())
        },
    )
    .await;
    let log = agent.process.output();
    assert!(!log.contains("subscription lost"), "{log}");
    assert!(!log.contains(&agent_token[4..]), "the token leaked: {log}");
}

#[tokio::test]
async fn a_subscriber_that_ignores_renewals_is_ended_at_expiry_and_a_renewal_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token.key");
    std::fs::write(&key_file, [8u8; 32]).unwrap();
    let broker =
        BrokerProcess::start_dev_with(&["--token-key-file", key_file.to_str().unwrap()]).await;
    let short = token(&key_file, Role::Agent, Duration::from_secs(3));
    let expires = claims(&key_file, &short).expires_at();

    let mut ignoring = open_agent(channel(&broker.url), &short, "dev", "w-1")
        .await
        .expect("subscribed");
    let mut renewing = open_renewing_agent(channel(&broker.url), &short, "dev", "w-2")
        .await
        .expect("subscribed");
    let renewed = renewal(&mut renewing).await;
    let renewed_claims = claims(&key_file, &renewed.token);
    assert_eq!(renewed_claims.agent_id.as_deref(), Some("w-2"), "bound");
    assert!(renewed_claims.expires_at() > expires);

    let ended = ignoring.ended_with().await;
    assert!(SystemTime::now() >= expires, "ended before its expiry");
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(
        ended.message().contains("agent token expired at")
            && ended.message().contains("reconnect with a renewed token"),
        "{ended:?}"
    );
    // The old token is refused; the renewal opens a new stream.
    let refused = open_agent(channel(&broker.url), &short, "dev", "w-2")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let mut again = open_agent(channel(&broker.url), &renewed.token, "dev", "w-2")
        .await
        .expect("the renewal is accepted");
    assert!(matches!(
        again.expect().await,
        subscribe_response::Message::Snapshot(_)
    ));
}

#[tokio::test]
async fn a_rotation_renews_connected_streams_and_removing_the_old_key_ends_only_those_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token.key");
    let (old, new) = ([31u8; 32], [32u8; 32]);
    ring(&key_file, &[old]);
    let broker =
        BrokerProcess::start_dev_with(&["--token-key-file", key_file.to_str().unwrap()]).await;
    let old_id = TokenKey::from_file(&key_file).unwrap().signer_id();
    let hour = Duration::from_secs(3600);
    let old_agent = token(&key_file, Role::Agent, hour);
    let old_publisher = token(&key_file, Role::Publisher, hour);
    let issue = |issuer: String| {
        let url = broker.url.clone();
        async move {
            let credentials = CallCredentials::bearer(&issuer).unwrap();
            AdminServiceClient::with_interceptor(channel(&url), credentials)
                .create_agent_token(CreateAgentTokenRequest {
                    cluster_id: "dev".into(),
                    ..Default::default()
                })
                .await
                .expect("issued")
                .into_inner()
                .token
                .clone()
        }
    };

    let mut renewing = open_renewing_agent(channel(&broker.url), &old_agent, "dev", "w-1")
        .await
        .unwrap();
    let mut fixed = open_agent(channel(&broker.url), &old_agent, "dev", "w-2")
        .await
        .unwrap();
    let issued_before = issue(old_publisher.clone()).await;
    let mut issued_stream = open_renewing_agent(channel(&broker.url), &issued_before, "dev", "w-3")
        .await
        .unwrap();

    // 1. Promote the new key: connected renewing streams get its tokens.
    ring(&key_file, &[new, old]);
    broker.process.signal("HUP");
    logged(&broker, "token keys reloaded", 1).await;
    let new_id = TokenKey::from_file(&key_file).unwrap().signer_id();
    let renewed = renewal(&mut renewing).await;
    assert_eq!(
        claims(&key_file, &renewed.token).key_id,
        Some(new_id.clone())
    );
    let rebound = renewal(&mut issued_stream).await;
    assert_eq!(
        claims(&key_file, &rebound.token).issuer_key,
        Some(new_id.clone()),
        "a stream live across the promotion follows it"
    );
    // An old-key publisher token still issues during the overlap, but the
    // token is bound to the old key.
    let issued_during = issue(old_publisher.clone()).await;
    assert_eq!(
        claims(&key_file, &issued_during).issuer_key,
        Some(old_id.clone())
    );

    // 2. Remove the old key: the stream still on it ends, naming the key.
    ring(&key_file, &[new]);
    broker.process.signal("HUP");
    logged(&broker, "token keys reloaded", 2).await;
    let ended = fixed.ended_with().await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(
        ended.message().contains(&old_id) && ended.message().contains("removed"),
        "{ended:?}"
    );
    let refused = open_agent(channel(&broker.url), &issued_during, "dev", "w-4")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains(&old_id), "{refused:?}");

    // The renewed streams carry on.
    let _publisher = publish(&broker, &token(&key_file, Role::Publisher, hour), "ROTATED").await;
    assert_eq!(next_credential(&mut renewing).await, "ASIAROTATED");
    assert_eq!(next_credential(&mut issued_stream).await, "ASIAROTATED");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_broker_on(port: u16, key_file: &Path) -> credstream_tests::processes::Process {
    let mut command = credstream_tests::processes::clean_command(credstream_tests::bins::binary(
        "credstream-broker",
    ));
    command
        .args(["--listen", &format!("127.0.0.1:{port}"), "--token-key-file"])
        .arg(key_file)
        .env("RUST_LOG", "info");
    credstream_tests::processes::Process::spawn("credstream-broker", command)
}

/// Waits for the session's next `Connected` event.
async fn connected(events: &mut tokio::sync::broadcast::Receiver<SessionEvent>) {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(SessionEvent::Connected { .. })) => return,
            Ok(Ok(_)) => continue,
            other => panic!("the session did not connect: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_session_reconnects_past_its_tokens_expiry_with_its_renewal() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token.key");
    std::fs::write(&key_file, [9u8; 32]).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut broker = start_broker_on(port, &key_file);
    broker.line(|l| l.starts_with("listening on ")).await;

    let publisher_token = token(&key_file, Role::Publisher, Duration::from_secs(3));
    let expires = claims(&key_file, &publisher_token).expires_at();
    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let session = PublishSession::builder(local_address(&url, &publisher_token, "dev"))
        .minter(minter.clone())
        .start()
        .unwrap();
    let mut events = session.events();
    connected(&mut events).await;
    // The broker renews a 3 s token 1.5 s before it expires. Waiting for
    // the expiry itself is the point of the test, not a stand-in for an
    // event.
    let left = expires
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(1)).await;
    assert!(
        !session.is_finished(),
        "the stream outlived its first token"
    );

    // A broker restart makes the session reconnect: with the first token
    // (expired) it would be refused for good.
    broker.signal("KILL");
    let _ = broker.exit().await;
    let mut broker = start_broker_on(port, &key_file);
    broker.line(|l| l.starts_with("listening on ")).await;
    connected(&mut events).await;
    assert!(!session.is_finished());
    let stderr = broker.stderr();
    assert!(!stderr.contains("publish stream ended"), "{stderr}");
    session
        .shutdown()
        .await
        .expect("the session never ended for good");
}
