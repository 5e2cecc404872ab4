//! Shared helpers for the agent's integration tests: messages to fill a
//! store with, a running local server, and a raw HTTP/1.1 client (raw, so
//! that tests control every header byte and see every response header).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use credstream_agent::http::{self, AuthToken, LocalEndpoints, LocalServer, TokenFile};
use credstream_agent::store::CredentialStore;
use credstream_proto::convert::timestamp;
use credstream_proto::v1::{
    AwsCredential, ClusterInfo, CredentialKind, CredentialUpdate, EnvVar, GcpCredential,
    PrivateEnv, credential_update::Credential, subscribe_response::Message,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

pub const AWS_SECRET: &str = "wJalrXUtnFEMI-secret-access-key";
pub const AWS_SESSION: &str = "IQoJb3JpZ2luX2VjE-session-token";
pub const GCP_TOKEN: &str = "ya29.a0-gcp-access-token";

/// The publisher's declaration.
pub fn info(kinds: &[CredentialKind], private_env: bool, version: u64) -> Message {
    Message::ClusterInfo(ClusterInfo {
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        private_env,
        publisher_connected: true,
        version,
    })
}

/// An AWS credential expiring `expires_in` from now (`None`: already
/// expired a minute ago).
pub fn aws(version: u64, key_id: &str, expires_in: Option<Duration>) -> Message {
    let mut credential = AwsCredential::default();
    credential.access_key_id = key_id.to_owned();
    credential.secret_access_key = format!("{AWS_SECRET}-{key_id}");
    credential.session_token = format!("{AWS_SESSION}-{key_id}");
    credential.principal_arn = "arn:aws:sts::123456789012:assumed-role/r/s".to_owned();
    credential.account_id = "123456789012".to_owned();
    credential.region = "eu-west-3".to_owned();
    update(version, Credential::Aws(credential), expires_in)
}

/// A GCP token.
pub fn gcp(version: u64, token: &str, expires_in: Option<Duration>) -> Message {
    let mut credential = GcpCredential::default();
    credential.access_token = token.to_owned();
    credential.token_type = "Bearer".to_owned();
    credential.scopes = vec!["https://www.googleapis.com/auth/cloud-platform".to_owned()];
    credential.project_id = "demo-project".to_owned();
    credential.principal_email = "worker@demo-project.iam.gserviceaccount.com".to_owned();
    update(version, Credential::Gcp(credential), expires_in)
}

pub fn update(version: u64, credential: Credential, expires_in: Option<Duration>) -> Message {
    let now = SystemTime::now();
    let expires = match expires_in {
        Some(left) => now + left,
        None => now - Duration::from_secs(60),
    };
    Message::Credential(CredentialUpdate {
        credential: Some(credential),
        issued_at: Some(timestamp(now - Duration::from_secs(60))),
        expires_at: Some(timestamp(expires)),
        version,
        refresh_request_id: String::new(),
        ..Default::default()
    })
}

/// The whole private env.
pub fn env(version: u64, vars: &[(&str, &str)]) -> Message {
    Message::PrivateEnv(PrivateEnv {
        set: vars
            .iter()
            .map(|(name, value)| {
                let mut var = EnvVar::default();
                var.name = (*name).to_owned();
                var.value = (*value).to_owned();
                var
            })
            .collect(),
        unset: Vec::new(),
        replace_all: true,
        version,
        ..Default::default()
    })
}

/// A store that is ready: AWS and GCP live for an hour, a private env.
pub fn ready_store() -> CredentialStore {
    let store = CredentialStore::new();
    store.apply(info(&[CredentialKind::Aws, CredentialKind::Gcp], true, 1));
    store.apply(aws(2, "ASIAFIRST", Some(Duration::from_secs(3600))));
    store.apply(gcp(3, GCP_TOKEN, Some(Duration::from_secs(3600))));
    store.apply(env(
        4,
        &[("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "db-secret-value")],
    ));
    store
}

/// A local server running on the current runtime until dropped.
pub struct Running {
    pub store: CredentialStore,
    pub endpoints: LocalEndpoints,
    pub addr: SocketAddr,
    _token_file: TokenFile,
    _stop: oneshot::Sender<()>,
}

pub async fn start(store: CredentialStore, gce_metadata: bool) -> Running {
    let token = AuthToken::generate();
    let token_file = TokenFile::create(&token).expect("token file");
    let router = http::router(store.clone(), token.clone(), gce_metadata);
    let server = LocalServer::bind("127.0.0.1:0".parse().unwrap(), router)
        .await
        .expect("bind");
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.serve(async {
        let _ = stopped.await;
    }));
    Running {
        store,
        endpoints: LocalEndpoints {
            addr,
            token,
            token_file: Some(token_file.path().to_path_buf()),
            gce_metadata,
        },
        addr,
        _token_file: token_file,
        _stop: stop,
    }
}

impl Running {
    pub fn token(&self) -> &str {
        self.endpoints.token.expose()
    }
}

/// One HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Sends `GET path` with `headers` on a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    send_raw(addr, request.as_bytes()).await
}

/// Sends `GET path` with `Host: host` (no Host header at all for `None`)
/// and `headers` on a fresh connection.
pub async fn get_as(
    addr: SocketAddr,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut request = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if let Some(host) = host {
        request.push_str(&format!("Host: {host}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    send_raw(addr, request.as_bytes()).await
}

/// Sends raw bytes and parses the response.
pub async fn send_raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before reading everything (431).
    let _ = stream.write_all(request).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// The project venv's Python, or `None` after printing why the test is
/// skipped (same contract as `credstream_tests::tools::python`).
pub fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("CREDSTREAM_TEST_PYTHON").map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            let line = format!(
                "skipped: {test}: needs the project's Python venv (set CREDSTREAM_TEST_PYTHON)"
            );
            // scripts/test.sh sets this: in CI a missing tool fails.
            if std::env::var("CREDSTREAM_TEST_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!(
                    "{line}, and CREDSTREAM_TEST_REQUIRE_TOOLS=1 says every tool must be present"
                );
            }
            eprintln!("{line}");
            None
        }
    }
}
