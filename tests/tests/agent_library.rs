//! The agent as a library (issue 14, item 3): a front end other than the
//! binary starts an agent inside its own process and runtime, against a
//! real `credstream-broker --dev`, with no subprocess for the agent.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use credstream_agent::subscription::SubscriptionError;
use credstream_agent::{Agent, AgentConfig, AgentError};
use credstream_client::session::PublishSession;
use credstream_proto::v1::CredentialKind;
use credstream_tests::broker::WAIT;
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::BrokerProcess;
use credstream_tests::publish::local_address;
use credstream_tests::sealed_agent::aws_credentials_at;
use credstream_tests::wait::eventually;
use tokio::net::TcpStream;

fn publisher(broker: &BrokerProcess) -> PublishSession {
    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    PublishSession::builder(local_address(&broker.url, &broker.publisher_token, "dev"))
        .minter(minter)
        .start()
        .expect("publisher starts")
}

/// The env file's `NAME='value'` lines (the test's values have no quote).
fn read_env_file(path: &Path) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let vars = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.trim_matches('\'').to_owned()))
        .collect();
    Some(vars)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_what_the_publisher_published_until_its_shutdown_future_resolves() {
    let broker = BrokerProcess::start_dev().await;
    let session = publisher(&broker);
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("agent.env");
    let mut config = AgentConfig::new(
        broker.url.clone(),
        "dev",
        "in-process",
        broker.agent_token.clone().into(),
    );
    config.env_file = Some(env_file.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(credstream_agent::run(config, async {
        let _ = stopped.await;
    }));

    // The env file appears once the agent is ready; it says where it serves.
    let vars = eventually("the agent's env file", || async {
        read_env_file(&env_file)
    })
    .await;
    let uri = &vars["AWS_CONTAINER_CREDENTIALS_FULL_URI"];
    let token_file = Path::new(&vars["AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"]).to_owned();
    let (status, body) = aws_credentials_at(uri, &vars["AWS_CONTAINER_AUTHORIZATION_TOKEN"]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["AccessKeyId"], "ASIAmint1", "{body}");
    assert!(token_file.is_file(), "{}", token_file.display());

    stop.send(()).expect("the agent is still running");
    let ended = tokio::time::timeout(WAIT, agent)
        .await
        .expect("the agent stops once its shutdown future resolves")
        .expect("the agent task did not panic");
    assert!(ended.is_ok(), "{ended:?}");
    let addr = uri.trim_start_matches("http://").split('/').next().unwrap();
    let refused = TcpStream::connect(addr).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the listener on {addr} is still open: {refused:?}"
    );
    assert!(!env_file.exists(), "the env file outlived the agent");
    assert!(!token_file.exists(), "the token file outlived the agent");
    session.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_the_handles_failure_and_stop_closes_the_listener() {
    let broker = BrokerProcess::start_dev().await;
    let config = AgentConfig::new(
        broker.url.clone(),
        "dev",
        "in-process",
        String::from("not-a-token").into(),
    );
    let mut agent = Agent::start(config).await.expect("the agent starts");
    let addr = agent.endpoints().addr;
    TcpStream::connect(addr)
        .await
        .expect("the listener is open once started");

    let failure = tokio::time::timeout(WAIT, agent.failure())
        .await
        .expect("a rejected token ends the subscription");
    assert!(
        matches!(
            failure,
            AgentError::Subscription(SubscriptionError::Unauthenticated(_))
        ),
        "{failure:?}"
    );
    // What the binary prints (`{:#}`): the context, then the fix.
    let message = format!("{:#}", anyhow::Error::from(failure));
    assert!(
        message.starts_with(
            "the subscription to the broker failed: the broker rejected the agent token: "
        ) && message.ends_with("; ask the publisher for a new one"),
        "{message}"
    );
    assert!(!message.contains("not-a-token"), "{message}");
    assert!(
        agent
            .store()
            .current()
            .readiness(std::time::SystemTime::now())
            .is_err(),
        "not ready without a subscription"
    );

    tokio::time::timeout(WAIT, agent.stop())
        .await
        .expect("stop is bounded");
    let refused = TcpStream::connect(addr).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the listener on {addr} is still open: {refused:?}"
    );
}
