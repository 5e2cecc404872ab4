//! The `credstream` binary against real peers: a `credstream-broker`
//! process, moto's STS (and IAM) for the laptop's identity, and an agent
//! (the agent library's subscription loop) on the other side.
//!
//! Tests that need moto print `skipped:` without the project's Python venv;
//! the error-message tests need nothing external.

use std::net::TcpListener;

use credstream_agent::store::{AgentState, CredentialStore};
use credstream_agent::subscription::{self, SubscriptionConfig};
use credstream_broker::auth::Role;
use credstream_proto::v1::credential_update::Credential;
use credstream_tests::bins::binary;
use credstream_tests::broker::{TestBroker, WAIT};
use credstream_tests::moto::{Moto, laptop_env, seed};
use credstream_tests::pki::Pki;
use credstream_tests::processes::{BrokerProcess, Process, clean_command, write_file};
use credstream_tests::publish::local_address;
use credstream_tests::tools;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

const DB_SECRET: &str = "db-secret-value-7f3a";

/// `credstream ARGS` with exactly `env` (plus `PATH`), publishing
/// unsealed (`CREDSTREAM_NO_SEAL`): these agents hold no seal key, and
/// sealing end to end is tested in `e2e_*.rs` and `sealed_*.rs`.
fn credstream(env: &[(String, String)], args: &[&str]) -> Command {
    let mut command = clean_command(binary("credstream"));
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("CREDSTREAM_NO_SEAL", "true")
        .args(args);
    command
}

/// An agent (the agent library's subscription loop) in this process.
struct LibraryAgent {
    store: CredentialStore,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), subscription::SubscriptionError>>,
}

impl LibraryAgent {
    fn start(url: &str, token: &str, cluster: &str, agent_id: &str) -> Self {
        let address = local_address(url, token, cluster);
        let store = CredentialStore::new();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(subscription::run(
            SubscriptionConfig::new(address, agent_id),
            store.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            store,
            stop: Some(stop),
            task,
        }
    }

    /// Waits until the agent's state satisfies `accept`.
    async fn until(&self, what: &str, accept: impl Fn(&AgentState) -> bool) -> AgentState {
        let mut states: watch::Receiver<AgentState> = self.store.subscribe();
        tokio::time::timeout(WAIT, states.wait_for(|s| accept(s)))
            .await
            .unwrap_or_else(|_| panic!("the agent never reached: {what}"))
            .expect("store open")
            .clone()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(WAIT, self.task).await;
    }
}

/// The number in a `delivered version N to …` line.
fn delivered_version(line: &str) -> u64 {
    line.trim_start_matches("delivered version ")
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a delivered line: {line}"))
}

fn assert_no_secret(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "{what} printed a secret ({} bytes starting {:?}):\n{text}",
            secret.len(),
            &secret[..4.min(secret.len())]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn publish_forwards_session_credentials_minted_by_moto_sts_from_long_term_keys() {
    let test = "publish_forwards_session_credentials_minted_by_moto_sts_from_long_term_keys";
    let Some(python) = tools::python(test) else {
        return;
    };
    let moto = Moto::start(&python).await;
    let seeded = seed(&python, &moto).await;
    let broker = BrokerProcess::start_dev().await;
    let home = tempfile::tempdir().unwrap();
    let laptop = laptop_env(&moto, &seeded, home.path());

    // whoami: the identity moto's STS reports for the IAM user's keys.
    let mut whoami = Process::spawn(
        "credstream whoami",
        credstream(&laptop, &["whoami", "--no-gcp"]),
    );
    assert!(whoami.exit().await.success(), "{}", whoami.output());
    let identity = whoami.stdout();
    assert!(
        identity.contains(&format!("aws: {} (account 123456789012)", seeded.user_arn)),
        "{identity}"
    );
    assert!(
        identity.contains("aws: forwards: GetSessionToken"),
        "{identity}"
    );
    assert_no_secret("whoami", &whoami.output(), &[&seeded.secret_access_key]);

    let agent = LibraryAgent::start(&broker.url, &broker.agent_token, "dev", "worker-1");
    let env_arg = format!("AUTH_TOKEN_FOR_CUSTOM_DATABASE={DB_SECRET}");
    let mut command = credstream(
        &laptop,
        &[
            "publish",
            "--broker",
            &broker.url,
            "--cluster",
            "dev",
            "--no-gcp",
            "--aws-duration",
            "1h",
            "--revoke-on-exit",
            "--env",
            &env_arg,
        ],
    );
    command.env("CREDSTREAM_TOKEN", &broker.publisher_token);
    let mut publish = Process::spawn("credstream publish", command);
    publish
        .line(|l| l.starts_with("publishing AWS, 1 private env variable to cluster dev"))
        .await;
    publish
        .line(|l| l.starts_with("connected to the broker"))
        .await;
    publish
        .line(|l| l == "refresh requested: AWS (missing)")
        .await;
    let minted = publish.line(|l| l.starts_with("minted AWS")).await;
    assert!(
        minted.starts_with(&format!("minted AWS for {}, valid until ", seeded.user_arn))
            && minted.contains("(in "),
        "{minted}"
    );

    // The agent holds session credentials: not the long-term keys.
    let state = agent
        .until("an AWS credential and the private env", |s| {
            s.credentials.aws.is_some() && s.env.is_some()
        })
        .await;
    let update = state.credentials.aws.clone().unwrap();
    let Some(Credential::Aws(aws)) = &update.credential else {
        panic!("not an AWS credential");
    };
    assert!(!aws.session_token.is_empty());
    assert_ne!(aws.access_key_id, seeded.access_key_id);
    assert_ne!(aws.secret_access_key, seeded.secret_access_key);
    assert_eq!(aws.region, "us-east-1");
    assert_eq!(aws.principal_arn, seeded.user_arn);
    assert_eq!(
        moto.sts_records("Token").await.len(),
        1,
        "one GetSessionToken"
    );
    let env: Vec<(&str, &str)> = state.env_vars().collect();
    assert_eq!(env, [("AUTH_TOKEN_FOR_CUSTOM_DATABASE", DB_SECRET)]);

    // The publisher hears that the agent holds that version (or newer).
    publish
        .line(|l| {
            l.starts_with("delivered version ")
                && l.ends_with(" to 1/1 agent")
                && delivered_version(l) >= update.version
        })
        .await;

    // status: the agent, the versions, the expiry; no secret.
    let token_file = write_file(home.path(), "publisher.token", &broker.publisher_token);
    let token_file = token_file.display().to_string();
    let mut status = Process::spawn(
        "credstream status",
        credstream(
            &[],
            &[
                "status",
                "--broker",
                &broker.url,
                "--cluster",
                "dev",
                "--token-file",
                &token_file,
            ],
        ),
    );
    assert!(status.exit().await.success(), "{}", status.output());
    let report = status.stdout();
    assert!(
        report.contains("publisher: laptop-user@")
            && report.contains(" connected; publishes AWS, private env"),
        "{report}"
    );
    assert!(
        report.contains(&format!(
            "AWS version {}, {}",
            update.version, seeded.user_arn
        )),
        "{report}"
    );
    assert!(report.contains(", expires "), "{report}");
    assert!(report.contains("agents: 1 connected"), "{report}");
    assert!(report.contains("  worker-1 holds version "), "{report}");
    assert!(
        report.contains("private env: version")
            && report.contains("AUTH_TOKEN_FOR_CUSTOM_DATABASE"),
        "{report}"
    );
    let secrets = [
        aws.secret_access_key.as_str(),
        aws.session_token.as_str(),
        DB_SECRET,
        seeded.secret_access_key.as_str(),
        broker.publisher_token.as_str(),
    ];
    assert_no_secret("status", &status.output(), &secrets);

    // SIGTERM with --revoke-on-exit: revoked first, then a clean exit.
    publish.signal("TERM");
    let exit = publish.exit().await;
    assert!(exit.success(), "{}", publish.output());
    assert!(
        publish
            .stdout()
            .contains("revoked everything published to cluster dev"),
        "{}",
        publish.output()
    );
    agent
        .until("the revocation", |s| {
            s.credentials.aws.is_none() && s.env.is_none()
        })
        .await;
    assert_no_secret("publish", &publish.output(), &secrets);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_stops_publish_and_status_with_the_fix() {
    let broker = TestBroker::start().await;
    let url = broker.url();
    let other_cluster = broker.token(Role::Publisher, Some("other"));
    for (token, expected) in [
        ("cs1.not-a-real-token", "the broker rejected the token: "),
        (
            other_cluster.as_str(),
            "the token may not be used for cluster \"dev\"",
        ),
    ] {
        let mut publish = Process::spawn(
            "credstream publish",
            credstream(
                &[],
                &[
                    "publish",
                    "--broker",
                    &url,
                    "--cluster",
                    "dev",
                    "--no-aws",
                    "--no-gcp",
                    "--env",
                    "A=1",
                    "--token",
                    token,
                ],
            ),
        );
        let exit = publish.exit().await;
        assert_eq!(exit.code(), Some(1), "{}", publish.output());
        let stderr = publish.stderr();
        assert!(stderr.starts_with("credstream: "), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(stderr.contains("fix: "), "{stderr}");
        if token.starts_with("cs1.not") {
            assert!(
                stderr.contains(
                    "credstream-broker token --token-key-file KEY --role publisher --cluster dev"
                ),
                "{stderr}"
            );
        }

        let mut status = Process::spawn(
            "credstream status",
            credstream(
                &[("CREDSTREAM_TOKEN".into(), token.into())],
                &["status", "--broker", &url, "--cluster", "dev"],
            ),
        );
        assert_eq!(status.exit().await.code(), Some(1), "{}", status.output());
        assert!(status.stderr().contains(expected), "{}", status.output());
        assert_no_secret("status", &status.output(), &[token]);
    }
    broker.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_reported_with_the_fix() {
    // A port nobody listens on: bound, then released.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let mut publish = Process::spawn(
        "credstream publish",
        credstream(
            &[],
            &[
                "publish",
                "--broker",
                &url,
                "--cluster",
                "dev",
                "--token",
                "t",
                "--no-aws",
                "--no-gcp",
                "--env",
                "A=1",
            ],
        ),
    );
    assert_eq!(publish.exit().await.code(), Some(1), "{}", publish.output());
    let stderr = publish.stderr();
    assert!(
        stderr.contains(&format!("cannot reach the broker at {url}")),
        "{stderr}"
    );
    assert!(
        stderr.contains("fix: check the host and port in --broker"),
        "{stderr}"
    );

    // Plaintext to a remote host is refused before connecting.
    let mut remote = Process::spawn(
        "credstream publish",
        credstream(
            &[],
            &[
                "publish",
                "--broker",
                "http://broker.example.com:50051",
                "--cluster",
                "dev",
                "--token",
                "t",
                "--no-aws",
                "--no-gcp",
                "--env",
                "A=1",
            ],
        ),
    );
    assert_eq!(remote.exit().await.code(), Some(1), "{}", remote.output());
    assert!(
        remote.stderr().contains("--insecure"),
        "{}",
        remote.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_failure_names_ca_cert_and_the_ca_fixes_it() {
    let pki = Pki::new("credstream cli test CA");
    let ca_path = pki.ca_path().display().to_string();
    let broker = TestBroker::start_with(|config| config.tls = Some(pki.broker_tls(false))).await;
    let url = format!("https://localhost:{}", broker.broker.local_addr.port());
    let token = broker.token(Role::Publisher, Some("tls"));
    let status_args = [
        "status",
        "--broker",
        &url,
        "--cluster",
        "tls",
        "--token",
        &token,
    ];

    let mut untrusted = Process::spawn("credstream status", credstream(&[], &status_args));
    assert_eq!(
        untrusted.exit().await.code(),
        Some(1),
        "{}",
        untrusted.output()
    );
    let stderr = untrusted.stderr();
    assert!(
        stderr.contains(&format!("TLS with the broker at {url} failed")),
        "{stderr}"
    );
    assert!(stderr.contains("--ca-cert"), "{stderr}");

    // With the CA the same call reaches the broker, which holds nothing yet.
    let mut command = credstream(&[], &status_args);
    command.args(["--ca-cert", &ca_path]);
    let mut trusted = Process::spawn("credstream status", command);
    assert_eq!(trusted.exit().await.code(), Some(1), "{}", trusted.output());
    assert!(
        trusted
            .stdout()
            .contains("holds nothing for cluster \"tls\""),
        "{}",
        trusted.output()
    );

    // And publish over TLS works: connected, the env is with the broker,
    // Ctrl-C ends it cleanly.
    let mut publish = Process::spawn(
        "credstream publish",
        credstream(
            &[],
            &[
                "publish",
                "--broker",
                &url,
                "--cluster",
                "tls",
                "--token",
                &token,
                "--no-aws",
                "--no-gcp",
                "--env",
                "A=1",
                "--ca-cert",
                &ca_path,
            ],
        ),
    );
    publish
        .line(|l| l.starts_with("connected to the broker at https://localhost:"))
        .await;
    publish
        .line(|l| l.starts_with("version ") && l.ends_with("no agents are connected yet"))
        .await;
    publish.signal("INT");
    assert!(publish.exit().await.success(), "{}", publish.output());
    assert!(publish.stdout().contains("stopping (interrupted)"));
    broker.broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_with_nothing_to_publish_fails_plainly() {
    let mut publish = Process::spawn(
        "credstream publish",
        credstream(
            &[],
            &[
                "publish",
                "--broker",
                "http://127.0.0.1:1",
                "--cluster",
                "dev",
                "--token",
                "t",
                "--no-aws",
                "--no-gcp",
            ],
        ),
    );
    assert_eq!(publish.exit().await.code(), Some(1), "{}", publish.output());
    assert!(
        publish.stderr().contains("nothing to publish"),
        "{}",
        publish.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_agent_present_client_certificates_to_a_mutual_tls_broker() {
    let pki = Pki::new("credstream mtls test CA");
    let broker = TestBroker::start_with(|config| config.tls = Some(pki.broker_tls(true))).await;
    let url = format!("https://localhost:{}", broker.broker.local_addr.port());
    let ca = pki.ca_path().display().to_string();
    let laptop = pki.leaf("laptop", &["laptop"]);
    let worker = pki.leaf("worker", &["worker-1"]);
    let (laptop_cert, laptop_key) = (
        laptop.cert.display().to_string(),
        laptop.key.display().to_string(),
    );
    let publisher_token = broker.token(Role::Publisher, Some("mtls"));
    let broker_args = |token: &str| -> Vec<String> {
        [
            "--broker",
            &url,
            "--cluster",
            "mtls",
            "--token",
            token,
            "--ca-cert",
            &ca,
        ]
        .map(String::from)
        .to_vec()
    };

    // Without a client certificate the broker refuses the connection, and
    // the message says which flags fix it.
    let mut args = vec!["status".to_owned()];
    args.extend(broker_args(&publisher_token));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut refused = Process::spawn("credstream status", credstream(&[], &args));
    assert_eq!(refused.exit().await.code(), Some(1), "{}", refused.output());
    assert!(
        refused.stderr().contains("--tls-client-cert"),
        "{}",
        refused.output()
    );
    // A certificate without its key is refused before connecting.
    let mut half = credstream(&[], &args);
    half.args(["--tls-client-cert", &laptop_cert]);
    let mut half = Process::spawn("credstream status", half);
    assert_eq!(half.exit().await.code(), Some(2), "{}", half.output());
    assert!(
        half.stderr().contains("--tls-client-key"),
        "{}",
        half.output()
    );

    // With the laptop's certificate the client publishes.
    let mut args = vec!["publish".to_owned()];
    args.extend(broker_args(&publisher_token));
    args.extend(
        [
            "--no-aws",
            "--no-gcp",
            "--env",
            "MTLS_SECRET=from-the-laptop",
            "--tls-client-cert",
            &laptop_cert,
            "--tls-client-key",
            &laptop_key,
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut publish = Process::spawn("credstream publish", credstream(&[], &args));
    publish
        .line(|l| l.starts_with("connected to the broker at https://localhost:"))
        .await;

    // And the agent, with the worker's certificate, hands the env to its
    // child.
    let mut agent = clean_command(binary("credstream-agent"));
    agent
        .env("CREDSTREAM_TOKEN", broker.token(Role::Agent, Some("mtls")))
        .args([
            "exec",
            "--broker",
            &url,
            "--cluster",
            "mtls",
            "--ca-cert",
            &ca,
        ])
        .args(["--agent-id", "worker-1", "--wait-timeout", "30s"])
        .arg("--tls-client-cert")
        .arg(&worker.cert)
        .arg("--tls-client-key")
        .arg(&worker.key)
        .args(["--", "sh", "-c", "echo \"got=$MTLS_SECRET\""]);
    let mut agent = Process::spawn("credstream-agent exec", agent);
    assert!(agent.exit().await.success(), "{}", agent.output());
    assert!(
        agent.stdout().contains("got=from-the-laptop"),
        "{}",
        agent.output()
    );

    publish.signal("INT");
    assert!(publish.exit().await.success(), "{}", publish.output());
    broker.broker.shutdown().await;
}
