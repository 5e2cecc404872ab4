//! `credstream-broker --audit-log FILE`: one JSON line per event of a
//! publisher's, an agent's and an issuer's life, naming tokens by id and
//! holding no secret value.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use credstream_proto::connect::CallCredentials;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{
    CreateAgentTokenRequest, CredentialKind, Revoke, publish_request, subscribe_response,
};
use credstream_tests::broker::{aws_update, open_agent, open_publisher, publisher_hello};
use credstream_tests::processes::BrokerProcess;
use credstream_tests::wait;
use serde_json::Value;
use tonic::Code;
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
