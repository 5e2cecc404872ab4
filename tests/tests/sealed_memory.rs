//! Sealed delivery leaves no secret in the broker (`docs/sealing.md`):
//! after a sealed publish of an AWS credential, a GCP token and a private
//! env, delivered to an agent, the real broker process's whole memory
//! (`/proc/PID/maps` + `/proc/PID/mem`) holds none of the secret access key,
//! the session token, the GCP token or the env value. The same scan after
//! an unsealed publish (what `--no-seal` sends) finds every one of them, so
//! the scan is known to see what it looks for.

use std::io::{Read, Seek, SeekFrom};
use std::time::{Duration, SystemTime};

use credstream_client::session::PublishSession;
use credstream_proto::convert::timestamp;
use credstream_proto::seal::SealKey;
use credstream_proto::v1::credential_update::Credential;
use credstream_proto::v1::{AwsCredential, CredentialUpdate, GcpCredential};
use credstream_tests::broker::open_agent;
use credstream_tests::processes::BrokerProcess;
use credstream_tests::publish::local_address;
use tonic::transport::Channel;

/// Secrets unique to one run, so a hit cannot come from anywhere else.
struct Secrets {
    secret_key: String,
    session_token: String,
    gcp_token: String,
    env_value: String,
}

impl Secrets {
    fn new() -> Self {
        let tag = || format!("{:032x}", rand::random::<u128>());
        Secrets {
            secret_key: format!("SCANSECRETKEY{}", tag()),
            session_token: format!("SCANSESSIONTOKEN{}", tag()),
            gcp_token: format!("ya29.SCANGCPTOKEN{}", tag()),
            env_value: format!("SCANENVVALUE{}", tag()),
        }
    }

    fn all(&self) -> [(&'static str, &str); 4] {
        [
            ("secret access key", &self.secret_key),
            ("session token", &self.session_token),
            ("GCP token", &self.gcp_token),
            ("env value", &self.env_value),
        ]
    }
}

/// Publishes the secrets (sealed or not) and waits until an agent of the
/// broker received all of them.
async fn publish(broker: &BrokerProcess, secrets: &Secrets, seal: bool) -> PublishSession {
    let address = local_address(&broker.url, &broker.publisher_token, "dev");
    let mut builder = PublishSession::builder(address)
        .private_env([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", secrets.env_value.as_str())]);
    if seal {
        builder = builder.seal(SealKey::generate("dev"));
    }
    let session = builder.start().unwrap();
    let now = SystemTime::now();
    let mut aws = AwsCredential::default();
    aws.access_key_id = "ASIASCANTEST".into();
    aws.secret_access_key = secrets.secret_key.clone();
    aws.session_token = secrets.session_token.clone();
    let mut gcp = GcpCredential::default();
    gcp.access_token = secrets.gcp_token.clone();
    for credential in [Credential::Aws(aws), Credential::Gcp(gcp)] {
        session
            .publish_credential(CredentialUpdate {
                credential: Some(credential),
                issued_at: Some(timestamp(now)),
                expires_at: Some(timestamp(now + Duration::from_secs(3600))),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // An agent receives everything (the broker encoded it for agents).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let channel = Channel::from_shared(broker.url.clone())
            .unwrap()
            .connect_lazy();
        let mut agent = open_agent(channel, &broker.agent_token, "dev", "scan")
            .await
            .unwrap();
        if let credstream_proto::v1::subscribe_response::Message::Snapshot(s) = agent.expect().await
            && s.credentials.len() == 2
            && s.private_env.is_some()
        {
            assert_eq!(s.credentials.iter().all(|c| c.sealed.is_some()), seal);
            return session;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the broker never held both credentials"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often each needle occurs in the readable memory of process `pid`.
fn scan(pid: u32, needles: &[&str]) -> Vec<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut hits = vec![0; needles.len()];
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut region = vec![0u8; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue; // [vvar] and the like
        }
        scanned += region.len() as u64;
        for (needle, count) in needles.iter().zip(hits.iter_mut()) {
            *count += region
                .windows(needle.len())
                .filter(|w| *w == needle.as_bytes())
                .count();
        }
    }
    assert!(
        scanned > 1 << 20,
        "read only {scanned} bytes of the broker's memory"
    );
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_publish_leaves_no_secret_in_the_broker_process() {
    let secrets = Secrets::new();
    let broker = BrokerProcess::start_dev().await;
    let session = publish(&broker, &secrets, true).await;
    let needles: Vec<&str> = secrets.all().iter().map(|(_, s)| *s).collect();
    let hits = scan(broker.process.pid(), &needles);
    for ((what, _), count) in secrets.all().iter().zip(&hits) {
        assert_eq!(
            *count, 0,
            "the broker's memory holds the {what} {count} times"
        );
    }
    session.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_scan_finds_every_secret_after_an_unsealed_publish() {
    let secrets = Secrets::new();
    let broker = BrokerProcess::start_dev().await;
    let session = publish(&broker, &secrets, false).await;
    let needles: Vec<&str> = secrets.all().iter().map(|(_, s)| *s).collect();
    let hits = scan(broker.process.pid(), &needles);
    for ((what, _), count) in secrets.all().iter().zip(&hits) {
        assert!(
            *count > 0,
            "the scan did not find the {what} in an unsealed broker"
        );
    }
    session.shutdown().await.unwrap();
}
