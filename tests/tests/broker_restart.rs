//! A broker killed with SIGKILL while a publisher and agents are connected:
//! agents keep serving with no gap, and converge on what the publisher
//! re-sends to the new broker (credentials and private env).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use credstream_agent::store::CredentialStore;
use credstream_agent::subscription::{self, SubscriptionConfig};
use credstream_broker::auth::{Role, TokenKey};
use credstream_client::session::PublishSession;
use credstream_proto::v1::CredentialKind;
use credstream_tests::bins::binary;
use credstream_tests::broker::WAIT;
use credstream_tests::minter::CountingMinter;
use credstream_tests::publish::local_address;

struct BrokerProcess(Child);

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the broker binary on `port` and waits for its "listening" line.
fn start_broker(port: u16, key_file: &std::path::Path) -> BrokerProcess {
    let mut child = Command::new(binary("credstream-broker"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--token-key-file"])
        .arg(key_file)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("broker starts");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(WAIT).expect("broker printed its address");
    assert_eq!(line, format!("listening on 127.0.0.1:{port}"));
    BrokerProcess(child)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_serve_through_a_broker_crash_and_converge_on_the_republished_state() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, rand::random::<[u8; 32]>()).unwrap();
    let key = TokenKey::from_file(&key_file).unwrap();
    let port = free_port();
    let address = |role: Role| {
        local_address(
            &format!("http://127.0.0.1:{port}"),
            &key.issue(role, Some("crash"), Duration::from_secs(3600))
                .unwrap(),
            "crash",
        )
    };
    let broker = start_broker(port, &key_file);

    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let session = PublishSession::builder(address(Role::Publisher))
        .minter(minter.clone())
        .private_env([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "db-secret")])
        .start()
        .unwrap();
    let stores: Vec<CredentialStore> = (0..3).map(|_| CredentialStore::new()).collect();
    for (i, store) in stores.iter().enumerate() {
        let config = SubscriptionConfig::new(address(Role::Agent), format!("worker-{i}"));
        let store = store.clone();
        tokio::spawn(async move { subscription::run(config, store, std::future::pending()).await });
    }
    let mut before = Vec::new();
    for store in &stores {
        let state = tokio::time::timeout(
            WAIT,
            store
                .subscribe()
                .wait_for(|s| s.readiness(SystemTime::now()).is_ok()),
        )
        .await
        .expect("agents ready")
        .unwrap()
        .clone();
        before.push(state.credentials.aws.as_ref().unwrap().version);
    }
    assert_eq!(minter.count(), 1);

    // SIGKILL: no goodbye to anyone.
    drop(broker);
    // Agents keep serving what they hold: ready, same credential, same env.
    for (store, version) in stores.iter().zip(&before) {
        let state = store.current();
        assert!(state.readiness(SystemTime::now()).is_ok());
        assert_eq!(state.credentials.aws.as_ref().unwrap().version, *version);
    }

    // A new broker on the same address starts empty; the publisher
    // reconnects, is asked for what is missing, and re-sends its env.
    let _broker = start_broker(port, &key_file);
    for (store, version) in stores.iter().zip(&before) {
        let state = tokio::time::timeout(
            WAIT,
            store.subscribe().wait_for(|s| {
                s.credentials
                    .aws
                    .as_ref()
                    .is_some_and(|c| c.version > *version)
            }),
        )
        .await
        .expect("agent converged on the re-published credential")
        .unwrap()
        .clone();
        // Never a gap: still ready, env still there.
        assert!(state.readiness(SystemTime::now()).is_ok());
        let env: Vec<_> = state.env_vars().collect();
        assert_eq!(env, [("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "db-secret")]);
    }
    assert_eq!(minter.count(), 2, "one re-mint for the new broker");
    // The new broker holds the re-sent private env too.
    let admin = key
        .issue(Role::Admin, None, Duration::from_secs(60))
        .unwrap();
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_lazy();
    let mut client =
        credstream_proto::v1::admin_service_client::AdminServiceClient::with_interceptor(
            channel,
            credstream_proto::connect::CallCredentials::bearer(&admin).unwrap(),
        );
    let status = client
        .get_cluster(credstream_proto::v1::GetClusterRequest {
            cluster_id: "crash".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cluster
        .unwrap();
    assert_eq!(
        status.private_env.unwrap().names,
        ["AUTH_TOKEN_FOR_CUSTOM_DATABASE"]
    );
    drop(session);
}
