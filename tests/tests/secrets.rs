//! Secrets are radioactive: no secret value (credential, env value, bearer
//! token) appears in logs captured at trace level from every crate, in
//! `Debug` output, or in admin answers.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use credstream_agent::store::CredentialStore;
use credstream_agent::subscription::{self, SubscriptionConfig};
use credstream_broker::auth::Role;
use credstream_client::session::PublishSession;
use credstream_proto::v1::{CredentialKind, ListClustersRequest};
use credstream_tests::broker::{TestBroker, WAIT};
use credstream_tests::minter::CountingMinter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

const ENV_SECRET: &str = "db-password-4f7a9c";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_debug_or_admin_answers() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(captured.clone())
        .with_ansi(false)
        .init();

    let broker = TestBroker::start().await;
    let cluster = "secrets";
    let publisher_address = broker.address(Role::Publisher, cluster);
    let agent_address = broker.address(Role::Agent, cluster);
    let mut tokens = vec![publisher_address.token.clone(), agent_address.token.clone()];
    let aws = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let gcp = CountingMinter::new(CredentialKind::Gcp, Duration::from_secs(3600));
    let session = PublishSession::builder(publisher_address)
        .minter(aws.clone())
        .minter(gcp.clone())
        .private_env([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", ENV_SECRET)])
        .start()
        .unwrap();
    let store = CredentialStore::new();
    let s = store.clone();
    tokio::spawn(subscription::run(
        SubscriptionConfig::new(agent_address, "w1"),
        s,
        std::future::pending(),
    ));
    let state = tokio::time::timeout(
        WAIT,
        store.subscribe().wait_for(|s| {
            s.credentials.aws.is_some() && s.credentials.gcp.is_some() && s.env.is_some()
        }),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();

    // A bad env change with a secret value is refused by the library
    // without echoing the value ...
    let err = session
        .send_private_envs([("BAD-NAME", "rejected-secret-value")])
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("rejected-secret-value"), "{err}");
    // ... and by the broker, when a raw client sends it.
    let other_token = broker.token(Role::Publisher, Some("other"));
    tokens.push(other_token.clone());
    let raw = credstream_tests::broker::open_publisher(
        broker.channel(),
        &other_token,
        Some(credstream_tests::broker::publisher_hello(
            "other",
            &[],
            true,
        )),
    )
    .await
    .unwrap();
    raw.send(credstream_proto::v1::publish_request::Message::PrivateEnv(
        credstream_proto::v1::PrivateEnv {
            set: vec![credstream_proto::v1::EnvVar {
                name: "BAD-NAME".into(),
                value: "rejected-secret-value".into(),
            }],
            ..Default::default()
        },
    ))
    .await;
    let mut raw = raw;
    let rejection = raw.ended_with().await;
    assert!(!rejection.message().contains("rejected-secret-value"));

    // Admin answers.
    let status = broker.status(cluster).await.unwrap();
    let mut admin = broker.admin();
    let list = admin
        .list_clusters(ListClustersRequest {})
        .await
        .unwrap()
        .into_inner();
    // The admin client's token is issued inside the harness; the others
    // are the ones used above.

    let debug = format!(
        "{state:?} {status:?} {list:?} {:?} {:?}",
        state.credentials.aws, state.env
    );
    let admin_text = format!("{status:?}");
    drop(session);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();

    assert!(logs.contains("credential published"), "logs were captured");
    assert!(logs.contains("TRACE"), "trace level was on");
    assert!(
        admin_text.contains("AUTH_TOKEN_FOR_CUSTOM_DATABASE"),
        "env names are shown"
    );
    let mut secrets = vec![
        "SECRETKEY-".to_owned(),
        "SESSIONTOKEN-".to_owned(),
        "GCPTOKEN-".to_owned(),
        ENV_SECRET.to_owned(),
        "rejected-secret-value".to_owned(),
    ];
    secrets.extend(tokens);
    for secret in &secrets {
        assert!(
            !logs.contains(secret.as_str()),
            "a secret ({} bytes) is in the logs",
            secret.len()
        );
        assert!(
            !debug.contains(secret.as_str()),
            "a secret is in Debug output"
        );
        assert!(
            !admin_text.contains(secret.as_str()),
            "a secret is in an admin answer"
        );
    }
}
