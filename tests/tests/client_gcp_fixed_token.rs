//! A GCP source that cannot refresh (issue 17, item 4): a fixed access
//! token in `GOOGLE_OAUTH_ACCESS_TOKEN` is forwarded as it is, described by
//! a token info endpoint (a local stand-in for Google's, as the token
//! endpoint tests use a local OAuth2 endpoint), and its expiry is published
//! as the cluster's access end, which `GetCluster` shows (asked from the
//! child, while its session is connected). The real minter,
//! the real session and a `credstream-broker --dev` process; the child
//! process has exactly the environment the test gives it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use credstream_client::mint::gcp::GcpMinter;
use credstream_client::mint::{MintError, Minter};
use credstream_proto::connect::CallCredentials;
use credstream_proto::convert::system_time;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{CredentialKind, GetClusterRequest, credential_update::Credential};
use credstream_tests::child::{in_child, run_child};
use credstream_tests::fake_http::{FakeHttp, Responder, form};
use credstream_tests::processes::BrokerProcess;
use credstream_tests::publish::start_publisher;
use tonic::transport::Channel;

const TOKEN: &str = "ya29.a0-fixed+token/for=tests";
const EMAIL: &str = "person@example.com";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent"))
}

/// An hour from now, in whole Unix seconds (what the endpoint answers).
fn an_hour_from_now() -> u64 {
    (SystemTime::now() + Duration::from_secs(3600))
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn tokeninfo(expires: u64) -> FakeHttp {
    let respond: Responder = Arc::new(move |_, request| {
        if form(&request.body).get("access_token").map(String::as_str) == Some(TOKEN) {
            (
                200,
                "application/json",
                format!(
                    r#"{{"azp":"x","aud":"x","scope":"https://www.googleapis.com/auth/devstorage.read_only","exp":"{expires}","expires_in":"3599","email":"{EMAIL}","email_verified":"true"}}"#
                ),
            )
        } else {
            (
                400,
                "application/json",
                r#"{"error":"invalid_token","error_description":"Invalid Value"}"#.to_owned(),
            )
        }
    });
    FakeHttp::start(respond).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_token_is_forwarded_and_says_when_access_ends() {
    const TEST: &str = "a_fixed_token_is_forwarded_and_says_when_access_ends";
    if in_child() {
        let minter = GcpMinter::builder()
            .skip_metadata_server()
            .tokeninfo_url(env("TEST_TOKENINFO_URL"))
            .build()
            .unwrap();
        let update = minter.mint().await.unwrap();
        let Some(Credential::Gcp(gcp)) = &update.credential else {
            panic!("not a GCP credential: {update:?}");
        };
        assert_eq!(gcp.access_token, TOKEN);
        assert_eq!(gcp.principal_email, EMAIL);
        assert_eq!(
            gcp.scopes,
            ["https://www.googleapis.com/auth/devstorage.read_only"]
        );
        let expires = UNIX_EPOCH + Duration::from_secs(env("TEST_EXPIRES").parse().unwrap());
        assert_eq!(
            update.expires_at.as_ref().and_then(system_time),
            Some(expires)
        );
        let end = update.access_end.as_ref().expect("an access end");
        assert_eq!(end.at.as_ref().and_then(system_time), Some(expires));
        assert_eq!(
            end.reason,
            "the GCP access token in GOOGLE_OAUTH_ACCESS_TOKEN expires then and cannot be refreshed"
        );

        // Published, the broker shows when the cluster's access ends.
        let session = start_publisher(
            &env("TEST_BROKER_URL"),
            &env("TEST_PUBLISHER_TOKEN"),
            "dev",
            Arc::new(minter),
        );
        let mut ends = session.watch_access_ends();
        let sent = tokio::time::timeout(
            credstream_tests::broker::WAIT,
            ends.wait_for(|ends| ends.contains_key(&CredentialKind::Gcp)),
        )
        .await
        .expect("the session reports the access end")
        .unwrap()
        .clone();
        assert_eq!(sent[&CredentialKind::Gcp].reason, end.reason);
        // GetCluster shows it once the broker has taken the credential.
        let channel = Channel::from_shared(env("TEST_BROKER_URL"))
            .unwrap()
            .connect_lazy();
        let credentials = CallCredentials::bearer(&env("TEST_ADMIN_TOKEN")).unwrap();
        let mut admin = AdminServiceClient::with_interceptor(channel, credentials);
        let deadline = tokio::time::Instant::now() + credstream_tests::broker::WAIT;
        let (status, shown) = loop {
            let status = admin
                .get_cluster(GetClusterRequest {
                    cluster_id: "dev".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .cluster
                .expect("cluster");
            let shown = status
                .credentials
                .iter()
                .find(|c| c.kind() == CredentialKind::Gcp)
                .and_then(|c| c.access_end.clone());
            if let Some(shown) = shown {
                break (status, shown);
            }
            assert!(tokio::time::Instant::now() < deadline, "{status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(shown.at.as_ref().and_then(system_time), Some(expires));
        assert_eq!(shown.reason, end.reason);
        assert!(
            !format!("{status:?}").contains("ya29"),
            "no token in status"
        );
        session.shutdown().await.unwrap();
        return;
    }
    let expires = an_hour_from_now();
    let endpoint = tokeninfo(expires).await;
    let broker = BrokerProcess::start_dev().await;
    let env = vec![
        ("TEST_EXPIRES", expires.to_string()),
        ("GOOGLE_OAUTH_ACCESS_TOKEN", TOKEN.to_owned()),
        ("TEST_TOKENINFO_URL", format!("{}/tokeninfo", endpoint.url)),
        ("TEST_BROKER_URL", broker.url.clone()),
        ("TEST_PUBLISHER_TOKEN", broker.publisher_token.clone()),
        ("TEST_ADMIN_TOKEN", broker.admin_token.clone()),
    ];
    tokio::task::spawn_blocking(move || run_child(TEST, &env))
        .await
        .unwrap();

    // The token went in a form body, never in the URL.
    let received = endpoint.received();
    assert!(!received.is_empty());
    for request in &received {
        assert!(
            request.request_line.starts_with("POST /tokeninfo")
                && !request.request_line.contains('?'),
            "{}",
            request.request_line
        );
        assert!(!request.request_line.contains("ya29"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_fixed_token_says_how_to_replace_it() {
    const TEST: &str = "a_rejected_fixed_token_says_how_to_replace_it";
    if in_child() {
        let minter = GcpMinter::builder()
            .skip_metadata_server()
            .tokeninfo_url(env("TEST_TOKENINFO_URL"))
            .build()
            .unwrap();
        let err = minter.mint().await.unwrap_err();
        assert!(matches!(err, MintError::NoCredentials { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(
                "the access token in GOOGLE_OAUTH_ACCESS_TOKEN is invalid or has expired"
            ) && message.contains("`gcloud auth print-access-token`"),
            "{message}"
        );
        assert!(!message.contains("ya29"), "{message}");
        return;
    }
    let endpoint = tokeninfo(an_hour_from_now()).await;
    let env = vec![
        ("GOOGLE_OAUTH_ACCESS_TOKEN", "ya29.expired".to_owned()),
        ("TEST_TOKENINFO_URL", format!("{}/tokeninfo", endpoint.url)),
    ];
    tokio::task::spawn_blocking(move || run_child(TEST, &env))
        .await
        .unwrap();
    assert_eq!(endpoint.received().len(), 1);
}
