//! Sealed delivery against a hostile relay (`docs/sealing.md`): a real gRPC
//! relay between a real `credstream-agent` and a real broker, which sends
//! the agent (a) a sealed credential with one byte flipped, (b) a
//! credential sealed for another cluster, (c) an older sealed credential
//! under a newer version, (d) a plaintext credential, (e) a sealed
//! credential with its clear expiry moved, and tampered and plaintext
//! private envs. The agent refuses each, logs why, and keeps serving the
//! last good credential: boto3 on the worker only ever sees what the
//! publisher sealed. A genuine rotation afterwards still goes through.

use std::path::Path;
use std::time::Duration;

use credstream_client::session::PublishSession;
use credstream_proto::connect::BrokerAddress;
use credstream_proto::seal::SealKey;
use credstream_proto::v1::{
    CredentialKind, CredentialUpdate, EnvVar, PrivateEnv, subscribe_response::Message,
};
use credstream_tests::bins::binary;
use credstream_tests::broker::{aws_update, open_agent};
use credstream_tests::hostile_relay::HostileRelay;
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{BrokerProcess, write_file, write_private_file};
use credstream_tests::publish::local_address;
use credstream_tests::sealed_agent::{AgentProcess, boto3_credentials};
use credstream_tests::tools;
use tonic::transport::Channel;

const HOUR: Duration = Duration::from_secs(3600);

/// `credstream-broker token` for `role` of `cluster`.
fn token(key_file: &Path, role: &str, cluster: &str) -> String {
    let out = std::process::Command::new(binary("credstream-broker"))
        .args(["token", "--token-key-file"])
        .arg(key_file)
        .args(["--role", role, "--cluster", cluster])
        .output()
        .expect("credstream-broker token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn address(url: &str, token: String, cluster: &str) -> BrokerAddress {
    local_address(url, &token, cluster)
}

/// The sealed AWS credentials the broker sent for `cluster`, in order of
/// arrival (the relay cannot see which access key each one holds).
fn sealed_aws(relay: &HostileRelay, cluster: &str) -> Vec<CredentialUpdate> {
    let mut out: Vec<CredentialUpdate> = Vec::new();
    for message in relay.recorded(cluster) {
        let updates = match message {
            Message::Snapshot(s) => s.credentials,
            Message::Credential(c) => vec![c],
            _ => vec![],
        };
        for update in updates {
            if update.kind() == CredentialKind::Aws
                && update.sealed.is_some()
                && !out.iter().any(|u| u.version == update.version)
            {
                out.push(update);
            }
        }
    }
    out
}

fn sealed_env(relay: &HostileRelay, cluster: &str) -> PrivateEnv {
    relay
        .recorded(cluster)
        .into_iter()
        .filter_map(|m| match m {
            Message::Snapshot(s) => s.private_env,
            Message::PrivateEnv(e) => Some(e),
            _ => None,
        })
        .rfind(|e| e.sealed.is_some())
        .expect("a sealed env was relayed")
}

fn max_version(relay: &HostileRelay, cluster: &str) -> u64 {
    relay
        .recorded(cluster)
        .iter()
        .map(|m| match m {
            Message::Snapshot(s) => s.version,
            Message::Credential(c) => c.version,
            Message::PrivateEnv(e) => e.version,
            Message::Revocation(r) => r.version,
            Message::ClusterInfo(i) => i.version,
            Message::TokenRenewal(_) => 0,
        })
        .max()
        .unwrap_or(0)
}

async fn served_key(agent: &mut AgentProcess) -> String {
    let (status, body) = agent.aws_credentials().await;
    assert_eq!(status, 200, "{body}");
    body["AccessKeyId"].as_str().unwrap_or_default().to_owned()
}

async fn wait_served(agent: &mut AgentProcess, key: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while served_key(agent).await != key {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never served {key}\n{}",
            agent.process.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn a_hostile_relay_cannot_make_an_agent_serve_what_the_publisher_did_not_seal() {
    let test = "a_hostile_relay_cannot_make_an_agent_serve_what_the_publisher_did_not_seal";
    let Some(python) = tools::python(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token_key = dir.path().join("token.key");
    std::fs::write(&token_key, rand::random::<[u8; 32]>()).unwrap();
    let broker =
        BrokerProcess::start_dev_with(&["--token-key-file", token_key.to_str().unwrap()]).await;
    let relay = HostileRelay::start(&broker.url).await;

    // Two clusters, each with its own key, published through the real
    // session (sealing on) straight to the broker.
    let alpha_key = SealKey::generate("alpha");
    let beta_key = SealKey::generate("beta");
    let beta_key_file = write_private_file(dir.path(), "beta.seal-key", &beta_key.encode());
    let alpha = PublishSession::builder(address(
        &broker.url,
        token(&token_key, "publisher", "alpha"),
        "alpha",
    ))
    .seal(alpha_key)
    .start()
    .unwrap();
    alpha
        .publish_credential(aws_update("alpha1", HOUR))
        .await
        .unwrap();
    let beta = PublishSession::builder(address(
        &broker.url,
        token(&token_key, "publisher", "beta"),
        "beta",
    ))
    .minter(CountingMinter::new(CredentialKind::Aws, HOUR))
    .private_env([("DB_TOKEN", "env-secret-1")])
    .seal(beta_key)
    .start()
    .unwrap();

    // A beta agent behind the relay, and a raw alpha agent behind it too
    // (so that the relay sees alpha's sealed credential).
    let beta_token = write_file(
        dir.path(),
        "beta.token",
        &token(&token_key, "agent", "beta"),
    );
    let mut agent = AgentProcess::spawn(
        &relay.url,
        "beta",
        "w1",
        &beta_token,
        Some(&beta_key_file),
        dir.path(),
    );
    let env = agent.ready_env().await;
    assert_eq!(
        env.get("DB_TOKEN").map(String::as_str),
        Some("env-secret-1")
    );
    assert_eq!(served_key(&mut agent).await, "ASIAmint1");
    let channel = Channel::from_shared(relay.url.clone())
        .unwrap()
        .connect_lazy();
    let mut spy = open_agent(
        channel,
        &token(&token_key, "agent", "alpha"),
        "alpha",
        "spy",
    )
    .await
    .unwrap();
    let Message::Snapshot(alpha_snapshot) = spy.expect().await else {
        panic!("a snapshot first")
    };
    assert_eq!(alpha_snapshot.credentials.len(), 1);

    // The broker says the cluster is sealed, and holds no secret of it.
    let status = broker.status("beta").await.unwrap();
    assert!(status.credentials.iter().all(|c| c.sealed), "{status:?}");
    assert!(
        status
            .private_env
            .as_ref()
            .is_some_and(|e| e.sealed && e.names.is_empty())
    );

    // A rotation: the agent moves to the new credential.
    beta.publish_credential(aws_update("beta2", HOUR))
        .await
        .unwrap();
    wait_served(&mut agent, "ASIAbeta2").await;
    let sealed = sealed_aws(&relay, "beta");
    assert_eq!(sealed.len(), 2, "mint1 and beta2 were relayed sealed");
    let (old, good) = (sealed[0].clone(), sealed[1].clone());
    let mut version = max_version(&relay, "beta") + 1000;
    let mut next = || {
        version += 1;
        version
    };

    // (a) one byte of the sealed payload flipped.
    let mut flipped = good.clone();
    flipped.version = next();
    flipped.sealed.as_mut().unwrap().ciphertext[5] ^= 0x01;
    relay.inject("beta", Message::Credential(flipped.clone()));
    let line = agent.refusal(flipped.version).await;
    assert!(line.contains("does not verify"), "{line}");

    // (b) a credential sealed for cluster alpha, delivered to beta.
    let mut foreign = alpha_snapshot.credentials[0].clone();
    foreign.version = next();
    relay.inject("beta", Message::Credential(foreign.clone()));
    let line = agent.refusal(foreign.version).await;
    assert!(line.contains("sealed for cluster alpha"), "{line}");

    // (c) the older sealed credential re-sent under a higher version.
    let mut replayed = old.clone();
    replayed.version = next();
    relay.inject("beta", Message::Credential(replayed.clone()));
    let line = agent.refusal(replayed.version).await;
    assert!(line.contains("not newer"), "{line}");

    // (d) the seal stripped: a plaintext credential.
    let mut plain = aws_update("forged", HOUR);
    plain.version = next();
    relay.inject("beta", Message::Credential(plain.clone()));
    let line = agent.refusal(plain.version).await;
    assert!(line.contains("not sealed"), "{line}");

    // (e) the clear expiry moved a day on.
    let mut extended = good.clone();
    extended.version = next();
    extended.expires_at.as_mut().unwrap().seconds += 86_400;
    relay.inject("beta", Message::Credential(extended.clone()));
    let line = agent.refusal(extended.version).await;
    assert!(line.contains("does not verify"), "{line}");

    // The private env: a flipped byte, and a plaintext replacement.
    let mut env_flipped = sealed_env(&relay, "beta");
    env_flipped.version = next();
    env_flipped.sealed.as_mut().unwrap().ciphertext[0] ^= 0x80;
    relay.inject("beta", Message::PrivateEnv(env_flipped.clone()));
    let line = agent.refusal(env_flipped.version).await;
    assert!(line.contains("does not verify"), "{line}");
    let mut var = EnvVar::default();
    var.name = "DB_TOKEN".into();
    var.value = "forged-env".into();
    let env_plain = PrivateEnv {
        set: vec![var],
        replace_all: true,
        version: next(),
        ..Default::default()
    };
    relay.inject("beta", Message::PrivateEnv(env_plain.clone()));
    let line = agent.refusal(env_plain.version).await;
    assert!(line.contains("not sealed"), "{line}");
    for line in agent
        .process
        .stderr()
        .lines()
        .filter(|l| l.contains("refused"))
    {
        assert!(
            !line.contains("SECRETKEY") && !line.contains("forged-env"),
            "{line}"
        );
    }

    // Still the last good credential and env, to the endpoint and to boto3.
    assert_eq!(served_key(&mut agent).await, "ASIAbeta2");
    let env = agent.ready_env().await;
    assert_eq!(
        env.get("DB_TOKEN").map(String::as_str),
        Some("env-secret-1")
    );
    let (access_key, session_token) = boto3_credentials(&python, &env).await;
    assert_eq!(access_key, "ASIAbeta2");
    assert_eq!(session_token, "SESSIONTOKEN-beta2");
    let readyz = agent.ready_env().await;
    assert!(readyz.contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI"));

    // The publisher's next rotation is accepted as usual.
    beta.publish_credential(aws_update("beta3", HOUR))
        .await
        .unwrap();
    wait_served(&mut agent, "ASIAbeta3").await;
    let (access_key, _) = boto3_credentials(&python, &agent.ready_env().await).await;
    assert_eq!(access_key, "ASIAbeta3");
    alpha.shutdown().await.unwrap();
    beta.shutdown().await.unwrap();
}
