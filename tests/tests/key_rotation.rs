//! Rotating the broker's token key without downtime: the key file becomes
//! a key ring, SIGHUP reloads it, tokens of a key keep working until that
//! key is removed and then get `UNAUTHENTICATED`, and streams already open
//! that keep the broker's renewals are moved to the new key and carry on.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use credstream_proto::v1::{CredentialKind, publish_request, subscribe_response};
use credstream_tests::bins::binary;
use credstream_tests::broker::{
    aws_update, open_agent, open_publisher, open_renewing_agent, publisher_hello,
};
use credstream_tests::processes::BrokerProcess;
use credstream_tests::wait;
use tonic::Code;
use tonic::transport::Channel;

fn channel(url: &str) -> Channel {
    Channel::from_shared(url.to_owned())
        .expect("url")
        .connect_lazy()
}

fn ring(keys: &[[u8; 32]]) -> String {
    let lines: Vec<String> = keys.iter().map(|k| STANDARD.encode(k)).collect();
    format!("credstream-keys v1\n{}\n", lines.join("\n"))
}

fn token(key_file: &Path, role: &str) -> String {
    let out = std::process::Command::new(binary("credstream-broker"))
        .env_clear()
        .args([
            "token",
            "--role",
            role,
            "--cluster",
            "dev",
            "--token-key-file",
        ])
        .arg(key_file)
        .output()
        .expect("credstream-broker token");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn reloaded(broker: &BrokerProcess, times: usize) {
    logged(broker, "token keys reloaded", times).await;
}

async fn logged(broker: &BrokerProcess, what: &str, times: usize) {
    wait::eventually(&format!("{times} × {what:?} in the broker's log"), || {
        let seen = broker.process.stderr().matches(what).count() >= times;
        async move { seen.then_some(()) }
    })
    .await
}

#[tokio::test]
async fn keys_rotate_on_sighup_with_agents_connected() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("token.key");
    let (old, new) = ([11u8; 32], [22u8; 32]);
    std::fs::write(&key_file, old).unwrap();
    let broker =
        BrokerProcess::start_dev_with(&["--token-key-file", key_file.to_str().unwrap()]).await;
    let old_agent = broker.agent_token.clone();

    // It keeps the broker's renewals, so the rotation below moves it to
    // the new key (token_lifetime.rs covers a stream that does not).
    let mut connected = open_renewing_agent(channel(&broker.url), &old_agent, "dev", "w-1")
        .await
        .expect("subscribed with the old key's token");
    assert!(matches!(
        connected.expect().await,
        subscribe_response::Message::Snapshot(_)
    ));

    // 1. The new key joins as the signer; the old one still verifies.
    std::fs::write(&key_file, ring(&[new, old])).unwrap();
    broker.process.signal("HUP");
    reloaded(&broker, 1).await;
    let new_agent = token(&key_file, "agent");
    assert_ne!(new_agent, old_agent);
    for (token, who) in [(&old_agent, "old"), (&new_agent, "new")] {
        let mut agent = open_agent(channel(&broker.url), token, "dev", "w-2")
            .await
            .unwrap_or_else(|status| panic!("the {who} key's token was refused: {status:?}"));
        assert!(matches!(
            agent.expect().await,
            subscribe_response::Message::Snapshot(_)
        ));
    }

    // 2. The old key goes: its tokens are refused, the new ones served.
    std::fs::write(&key_file, ring(&[new])).unwrap();
    broker.process.signal("HUP");
    reloaded(&broker, 2).await;
    let refused = open_agent(channel(&broker.url), &old_agent, "dev", "w-3")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut agent = open_agent(channel(&broker.url), &new_agent, "dev", "w-4")
        .await
        .expect("the new key's token is served");
    assert!(matches!(
        agent.expect().await,
        subscribe_response::Message::Snapshot(_)
    ));

    let new_publisher = token(&key_file, "publisher");

    // 3. A broken file leaves the keys in use.
    std::fs::write(&key_file, "credstream-keys v1\nnot base64\n").unwrap();
    broker.process.signal("HUP");
    logged(&broker, "token keys not reloaded", 1).await;
    open_agent(channel(&broker.url), &new_agent, "dev", "w-5")
        .await
        .expect("still served after a failed reload");

    // The stream opened with the old key before the rotation still
    // receives what a publisher with a new key's token publishes.
    let mut publisher = open_publisher(
        channel(&broker.url),
        &new_publisher,
        Some(publisher_hello("dev", &[CredentialKind::Aws], false)),
    )
    .await
    .expect("publisher");
    publisher.welcome().await;
    publisher
        .send(publish_request::Message::Credential(aws_update(
            "rotated",
            Duration::from_secs(3600),
        )))
        .await;
    while !matches!(
        connected.expect().await,
        subscribe_response::Message::Credential(_)
    ) {}
}
