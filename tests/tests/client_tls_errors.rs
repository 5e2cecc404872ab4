//! Connection failures are told apart by the types in the error's source
//! chain (`credstream_client::connect_failure`), from real failures against
//! real brokers: a plaintext port, an untrusted CA, a certificate for
//! another name, an expired one, a mutual-TLS broker without a client
//! certificate, plaintext to a TLS port, a closed port; and `credstream
//! status` says the fix for each.

use std::error::Error;
use std::path::PathBuf;

use credstream_broker::auth::Role;
use credstream_broker::server::TlsFiles;
use credstream_client::connect_failure::{CertificateProblem, ConnectFailure, classify};
use credstream_proto::connect::BrokerAddress;
use credstream_proto::v1::GetClusterRequest;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_tests::bins::binary;
use credstream_tests::broker::TestBroker;
use credstream_tests::pki::Pki;
use credstream_tests::processes::{Process, clean_command};

/// The error of connecting to `address` and, if that succeeds (TLS 1.3
/// lets a client finish before the broker checks its certificate), of one
/// call on the channel.
async fn failure(address: &BrokerAddress) -> Box<dyn Error + Send + Sync> {
    let channel = match address.endpoint().unwrap().connect().await {
        Ok(channel) => channel,
        Err(error) => return Box::new(error),
    };
    let mut admin = AdminServiceClient::with_interceptor(channel, address.interceptor().unwrap());
    let request = GetClusterRequest {
        cluster_id: address.cluster_id.clone(),
    };
    match admin.get_cluster(request).await {
        Ok(_) => panic!("the call to {} succeeded", address.url),
        Err(status) => Box::new(status),
    }
}

/// Broker TLS files whose certificate is signed by a CA of its own, for
/// `localhost`, and expired: valid from 2020 to 2021.
fn expired_broker_tls(dir: &std::path::Path) -> (TlsFiles, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let files = TlsFiles {
        cert: write("expired.pem", cert.pem()),
        key: write("expired.key", key.serialize_pem()),
        client_ca: None,
    };
    (files, write("expired-ca.pem", ca.pem()))
}

struct Brokers {
    pki: Pki,
    plaintext: TestBroker,
    tls: TestBroker,
    mutual: TestBroker,
    wrong_name: TestBroker,
    expired: TestBroker,
    expired_ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl Brokers {
    async fn start() -> Self {
        let pki = Pki::new("credstream tls errors CA");
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = pki.leaf("elsewhere", &["elsewhere.example"]);
        let (expired_files, expired_ca) = expired_broker_tls(dir.path());
        Self {
            plaintext: TestBroker::start().await,
            tls: TestBroker::start_with(|c| c.tls = Some(pki.broker_tls(false))).await,
            mutual: TestBroker::start_with(|c| c.tls = Some(pki.broker_tls(true))).await,
            wrong_name: TestBroker::start_with(|c| {
                c.tls = Some(TlsFiles {
                    cert: elsewhere.cert.clone(),
                    key: elsewhere.key.clone(),
                    client_ca: None,
                })
            })
            .await,
            expired: TestBroker::start_with(|c| c.tls = Some(expired_files)).await,
            expired_ca,
            pki,
            _dir: dir,
        }
    }

    /// `scheme://localhost:PORT` of `broker`, trusting `ca`.
    fn address(broker: &TestBroker, scheme: &str, ca: Option<PathBuf>) -> BrokerAddress {
        let mut address = broker.address(Role::Publisher, "tls");
        address.url = format!("{scheme}://localhost:{}", broker.broker.local_addr.port());
        address.ca_cert = ca;
        address
    }
}

/// How many connections a test makes to see a failure whose cause the
/// client reads only if it reads before the broker closes.
const ATTEMPTS: usize = 30;

/// Connects to `address` until the failure is `cause`; every failure
/// before it must be a closed connection.
async fn seen_within_attempts(address: &BrokerAddress, cause: ConnectFailure) {
    for _ in 0..ATTEMPTS {
        let error = failure(address).await;
        match classify(&*error) {
            found if found == cause => return,
            ConnectFailure::Unreachable => {}
            other => panic!("{}: {other:?} from {error:?}", address.url),
        }
    }
    panic!("{}: no {cause:?} in {ATTEMPTS} attempts", address.url);
}

fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_failure_is_classified_by_its_type() {
    let b = Brokers::start().await;
    let ca = || Some(b.pki.ca_path());
    let cases = [
        (
            "https to a plaintext port",
            Brokers::address(&b.plaintext, "https", ca()),
            ConnectFailure::NotTls,
        ),
        (
            "a private CA not given",
            Brokers::address(&b.tls, "https", None),
            ConnectFailure::BrokerCertificate(CertificateProblem::UnknownIssuer),
        ),
        (
            "a certificate for another name",
            Brokers::address(&b.wrong_name, "https", ca()),
            ConnectFailure::BrokerCertificate(CertificateProblem::WrongName),
        ),
        (
            "an expired certificate",
            Brokers::address(&b.expired, "https", Some(b.expired_ca.clone())),
            ConnectFailure::BrokerCertificate(CertificateProblem::OutsideValidity),
        ),
    ];
    for (what, address, expected) in cases {
        let error = failure(&address).await;
        assert_eq!(classify(&*error), expected, "{what}: {error:?}");
    }

    let mut refused = Brokers::address(&b.plaintext, "http", None);
    refused.url = format!("http://127.0.0.1:{}", closed_port());
    let error = failure(&refused).await;
    assert_eq!(classify(&*error), ConnectFailure::Unreachable, "{error:?}");

    // Two failures show their cause only if the client reads what the
    // broker wrote before it closed the connection; otherwise the client
    // sees a closed connection (unreachable). Each attempt is one of the
    // two, and the cause shows within a few attempts.
    //
    // Plaintext to a TLS port: the broker's TLS alert read as HTTP/2 frames.
    let plaintext_to_tls = Brokers::address(&b.tls, "http", None);
    seen_within_attempts(&plaintext_to_tls, ConnectFailure::NotHttp2).await;
    // A mutual-TLS broker refuses a client without a certificate after the
    // client's TLS 1.3 handshake: its alert.
    let no_certificate = Brokers::address(&b.mutual, "https", ca());
    seen_within_attempts(&no_certificate, ConnectFailure::ClientCertificateRefused).await;
    // With the right certificate the same broker answers.
    let mut allowed = Brokers::address(&b.mutual, "https", ca());
    allowed.client_identity = Some(b.pki.leaf("laptop", &["laptop"]).client_identity());
    let channel = allowed.endpoint().unwrap().connect().await.unwrap();
    let mut admin = AdminServiceClient::with_interceptor(channel, allowed.interceptor().unwrap());
    let status = admin
        .get_cluster(GetClusterRequest {
            cluster_id: "tls".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}

/// `credstream status` against `address`: exit 1, and its stderr.
async fn status_stderr(address: &BrokerAddress) -> String {
    let mut command = clean_command(binary("credstream"));
    command.args([
        "status",
        "--broker",
        &address.url,
        "--cluster",
        "tls",
        "--token",
        &address.token,
    ]);
    if let Some(ca) = &address.ca_cert {
        command.arg("--ca-cert").arg(ca);
    }
    let mut status = Process::spawn("credstream status", command);
    assert_eq!(status.exit().await.code(), Some(1), "{}", status.output());
    status.stderr()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credstream_status_names_the_fix_for_each_failure() {
    let b = Brokers::start().await;
    let ca = || Some(b.pki.ca_path());
    let cases = [
        (
            Brokers::address(&b.plaintext, "https", ca()),
            ["did not answer with TLS", "fix: check the port in --broker"],
        ),
        (
            Brokers::address(&b.tls, "https", None),
            ["TLS with the broker at", "--ca-cert FILE"],
        ),
        (
            Brokers::address(&b.wrong_name, "https", ca()),
            [
                "TLS with the broker at",
                "use a host in --broker that the broker's certificate is issued for",
            ],
        ),
        (
            Brokers::address(&b.expired, "https", Some(b.expired_ca.clone())),
            ["TLS with the broker at", "has expired or is not valid yet"],
        ),
    ];
    for (address, expected) in cases {
        let stderr = status_stderr(&address).await;
        for text in expected {
            assert!(
                stderr.contains(text),
                "{}: {text:?} in\n{stderr}",
                address.url
            );
        }
        assert!(
            stderr.contains(&address.url),
            "the message names the URL: {stderr}"
        );
    }
    // Plaintext to a TLS port, until the client reads the broker's alert
    // (see each_connection_failure_is_classified_by_its_type).
    let plaintext_to_tls = Brokers::address(&b.tls, "http", None);
    for _ in 0..ATTEMPTS {
        let stderr = status_stderr(&plaintext_to_tls).await;
        if stderr.contains("does not speak plaintext gRPC") {
            assert!(
                stderr.contains("fix: if it serves TLS, use https:// in --broker"),
                "{stderr}"
            );
            return;
        }
        assert!(stderr.contains("cannot reach the broker at"), "{stderr}");
    }
    panic!("no \"does not speak plaintext gRPC\" in {ATTEMPTS} attempts");
}
