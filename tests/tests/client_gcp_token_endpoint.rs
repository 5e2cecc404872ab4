//! GCP minting from a service account key whose `token_uri` points at a
//! local token endpoint: gcp_auth must honour it (plain http), each mint
//! must be a new token request, and the JWT it sends must be signed with
//! the key and name the right audience, issuer and scopes.
//!
//! The RSA key is generated per run in Rust (`credstream_tests::gcp_key`),
//! so these tests need nothing but `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use credstream_client::mint::gcp::{DEFAULT_SCOPES, GcpMinter};
use credstream_client::mint::{MintError, Minter};
use credstream_client::whoami::whoami;
use credstream_proto::v1::{CredentialUpdate, GcpCredential, credential_update::Credential};
use credstream_tests::child::{in_child, run_child};
use credstream_tests::fake_http::{FakeHttp, Received, Responder, form};
use credstream_tests::gcp_key::{self, TestKey};

const EMAIL: &str = "minter@credstream-test.iam.gserviceaccount.com";
const PROJECT: &str = "credstream-test";

fn write_key_file(dir: &Path, key: &TestKey, token_uri: &str) -> PathBuf {
    let path = dir.join("service-account.json");
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": key.pem,
        "client_email": EMAIL,
        "client_id": "100000000000000000001",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    path
}

/// A token endpoint that hands out `token-1`, `token-2`, … for an hour.
async fn token_endpoint() -> FakeHttp {
    let respond: Responder = Arc::new(|n: usize, _: &Received| {
        (
            200,
            "application/json",
            format!(
                r#"{{"access_token": "token-{n}", "expires_in": 3600, "token_type": "Bearer"}}"#
            ),
        )
    });
    FakeHttp::start(respond).await
}

fn gcp(update: &CredentialUpdate) -> &GcpCredential {
    match &update.credential {
        Some(Credential::Gcp(gcp)) => gcp,
        other => panic!("not a GCP credential: {other:?}"),
    }
}

fn seconds_left(update: &CredentialUpdate) -> i64 {
    update
        .expiry()
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        - SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
}

/// Checks the JWT-bearer grant a request carried and returns its claims.
fn check_grant(received: &Received, key: &TestKey) -> serde_json::Value {
    assert_eq!(received.request_line, "POST /token");
    let fields = form(&received.body);
    assert_eq!(
        fields["grant_type"],
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let jwt = &fields["assertion"];
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    // gcp_auth pads its base64url; the JWT spec says not to, accept both.
    let decode = |s: &str| URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
    assert_eq!(header["alg"], "RS256");
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &key.public_pkcs1_der,
    );
    let signed = format!("{}.{}", parts[0], parts[1]);
    public
        .verify(signed.as_bytes(), &decode(parts[2]))
        .expect("the assertion is signed with the key file's key");
    serde_json::from_slice(&decode(parts[1])).unwrap()
}

#[tokio::test]
async fn service_account_tokens_come_from_the_key_files_token_uri() {
    let key = gcp_key::generate();
    let endpoint = token_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let token_uri = format!("{}/token", endpoint.url);
    let key_file = write_key_file(dir.path(), &key, &token_uri);
    let minter = GcpMinter::builder()
        .credentials_file(&key_file)
        .build()
        .unwrap();

    let first = minter.mint().await.unwrap();
    let credential = gcp(&first);
    assert_eq!(credential.access_token, "token-1");
    assert_eq!(credential.token_type, "Bearer");
    assert_eq!(credential.scopes, DEFAULT_SCOPES);
    assert_eq!(credential.project_id, PROJECT);
    assert_eq!(credential.principal_email, EMAIL);
    assert!(
        (3500..=3600).contains(&seconds_left(&first)),
        "{}",
        seconds_left(&first)
    );
    assert!(first.issued_at.is_some());

    let received = endpoint.received();
    assert_eq!(received.len(), 1);
    let claims = check_grant(&received[0], &key);
    assert_eq!(claims["iss"], EMAIL);
    assert_eq!(claims["aud"], token_uri.as_str());
    assert_eq!(claims["scope"], DEFAULT_SCOPES.join(" ").as_str());

    // A second mint is a second token request and a new token, not the
    // first one from a cache.
    let second = minter.mint().await.unwrap();
    assert_eq!(gcp(&second).access_token, "token-2");
    assert_eq!(endpoint.received().len(), 2);
}

#[tokio::test]
async fn requested_scopes_reach_the_token_endpoint() {
    let key = gcp_key::generate();
    let endpoint = token_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_key_file(dir.path(), &key, &format!("{}/token", endpoint.url));
    let scopes = [
        "https://www.googleapis.com/auth/devstorage.read_only",
        "https://www.googleapis.com/auth/bigquery",
    ];
    let minter = GcpMinter::builder()
        .credentials_file(&key_file)
        .scopes(scopes)
        .project_id("another-project")
        .build()
        .unwrap();
    let update = minter.mint().await.unwrap();
    assert_eq!(gcp(&update).scopes, scopes);
    assert_eq!(gcp(&update).project_id, "another-project");
    let claims = check_grant(&endpoint.received()[0], &key);
    assert_eq!(claims["scope"], scopes.join(" ").as_str());
}

#[tokio::test]
async fn a_refused_token_request_says_what_to_do() {
    let key = gcp_key::generate();
    let respond: Responder = Arc::new(|_, _: &Received| {
        (
            400,
            "application/json",
            r#"{"error": "invalid_grant", "error_description": "Invalid JWT Signature."}"#
                .to_owned(),
        )
    });
    let endpoint = FakeHttp::start(respond).await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_key_file(dir.path(), &key, &format!("{}/token", endpoint.url));
    let minter = GcpMinter::builder()
        .credentials_file(&key_file)
        .build()
        .unwrap();
    let err = minter.mint().await.unwrap_err();
    assert!(matches!(err, MintError::Refused { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("the token endpoint refused the request; check that the key in"),
        "{message}"
    );
    assert!(!message.contains("PRIVATE KEY"), "{message}");
}

#[tokio::test]
async fn whoami_names_the_service_account_and_its_project() {
    let key = gcp_key::generate();
    let endpoint = token_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_key_file(dir.path(), &key, &format!("{}/token", endpoint.url));
    let minter = GcpMinter::builder()
        .credentials_file(&key_file)
        .build()
        .unwrap();
    let answer = whoami(None, Some(&minter)).await;
    assert!(answer.all_found());
    let lines = answer.lines();
    assert_eq!(lines[0], format!("gcp: {EMAIL}"));
    assert_eq!(
        lines[1],
        format!(
            "gcp: source: service account key {} (the credentials file)",
            key_file.display()
        )
    );
    assert_eq!(lines[2], format!("gcp: project: {PROJECT}"));
    assert!(
        lines[3].starts_with("gcp: forwards: a new access token on every refresh"),
        "{lines:?}"
    );
    assert!(!format!("{lines:?} {answer:?}").contains("token-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_application_credentials_is_honoured() {
    const TEST: &str = "google_application_credentials_is_honoured";
    if in_child() {
        let minter = GcpMinter::builder().skip_metadata_server().build().unwrap();
        let update = minter.mint().await.unwrap();
        assert_eq!(gcp(&update).access_token, "token-1");
        assert_eq!(gcp(&update).principal_email, EMAIL);
        return;
    }
    let key = gcp_key::generate();
    let endpoint = token_endpoint().await;
    let dir = tempfile::tempdir().unwrap();
    let key_file = write_key_file(dir.path(), &key, &format!("{}/token", endpoint.url));
    let env = vec![(
        "GOOGLE_APPLICATION_CREDENTIALS",
        key_file.display().to_string(),
    )];
    tokio::task::spawn_blocking(move || run_child(TEST, &env))
        .await
        .unwrap();
    assert_eq!(endpoint.received().len(), 1);
}
