//! AWS minting against a stand-in STS (the tests crate's recording HTTP
//! server) for what moto cannot show: moto never answers "Cannot call
//! GetSessionToken with session credentials" (docs/facts.md, fact 15), so
//! the stand-in refuses every call but `GetCallerIdentity` and records which
//! actions the minter asked for. Also what the local credential chain's
//! failures tell the user (an SSO login whose session has ended).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use credstream_client::mint::aws::AwsMinter;
use credstream_client::mint::{MintError, Minter};
use credstream_proto::convert::system_time as system_time_of;
use credstream_proto::v1::credential_update;
use credstream_tests::aws_login::{SSO_PROFILE, TemporaryCredentials, sso_login};
use credstream_tests::child::{in_child, run_child};
use credstream_tests::fake_http::{FakeHttp, form};

const CALLER_IDENTITY: &str = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::210987654321:assumed-role/Dev/alice</Arn>
    <UserId>AROAEXAMPLE:alice</UserId>
    <Account>210987654321</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>1</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#;

const SESSION_CREDENTIALS_REFUSED: &str = "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>Cannot call GetSessionToken with session credentials</Message></Error><RequestId>1</RequestId></ErrorResponse>";

/// A one-trick STS: answers `GetCallerIdentity`; anything else gets a 400
/// (what AWS answers `GetSessionToken` with session credentials).
async fn fake_sts() -> FakeHttp {
    FakeHttp::start(Arc::new(|_, request| {
        if form(&request.body).get("Action").map(String::as_str) == Some("GetCallerIdentity") {
            (200, "text/xml", CALLER_IDENTITY.to_owned())
        } else {
            (400, "text/xml", SESSION_CREDENTIALS_REFUSED.to_owned())
        }
    }))
    .await
}

/// The `Action` of every request the stand-in STS received, in order.
fn actions(sts: &FakeHttp) -> Vec<String> {
    sts.received()
        .iter()
        .map(|request| form(&request.body).remove("Action").unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn temporary_credentials_are_forwarded_as_they_are() {
    let sts = fake_sts().await;
    let expiry = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 1800,
        );
    let local = Credentials::new(
        "ASIATEMPORARYEXAMPLE",
        "temporary-secret",
        Some("temporary-session-token".into()),
        Some(expiry),
        "test",
    );
    let minter = AwsMinter::builder()
        .credentials_provider(local)
        .endpoint_url(&sts.url)
        .region("eu-west-1")
        .build()
        .await
        .unwrap();
    for _ in 0..2 {
        let update = minter.mint().await.unwrap();
        assert_eq!(update.expiry(), Some(expiry));
        let Some(credential_update::Credential::Aws(aws)) = &update.credential else {
            panic!("not an AWS credential: {update:?}");
        };
        assert_eq!(aws.access_key_id, "ASIATEMPORARYEXAMPLE");
        assert_eq!(aws.secret_access_key, "temporary-secret");
        assert_eq!(aws.session_token, "temporary-session-token");
        assert_eq!(
            aws.principal_arn,
            "arn:aws:sts::210987654321:assumed-role/Dev/alice"
        );
        assert_eq!(aws.account_id, "210987654321");
        assert_eq!(aws.region, "eu-west-1");
        // Nothing renews them: minting ends when they expire.
        let end = update.access_end.as_ref().expect("an access end");
        assert_eq!(end.at.as_ref().and_then(system_time_of), Some(expiry));
        assert_eq!(end.reason, "your temporary AWS credentials expire then");
    }
    // GetSessionToken would have been refused; it was never asked.
    assert_eq!(actions(&sts), ["GetCallerIdentity", "GetCallerIdentity"]);
}

#[tokio::test]
async fn expired_temporary_credentials_are_refused_before_any_call() {
    let sts = fake_sts().await;
    let local = Credentials::new(
        "ASIATEMPORARYEXAMPLE",
        "temporary-secret",
        Some("temporary-session-token".into()),
        Some(SystemTime::now() - Duration::from_secs(60)),
        "test",
    );
    let minter = AwsMinter::builder()
        .credentials_provider(local)
        .endpoint_url(&sts.url)
        .build()
        .await
        .unwrap();
    let err = minter.mint().await.unwrap_err().to_string();
    assert!(
        err.contains("expired") && err.contains("aws sso login"),
        "{err}"
    );
    assert!(!err.contains("temporary-secret"), "{err}");
    assert!(sts.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_sso_session_says_to_log_in_again() {
    const TEST: &str = "an_ended_sso_session_says_to_log_in_again";
    if in_child() {
        let minter = AwsMinter::builder().build().await.unwrap();
        let err = minter.mint().await.unwrap_err();
        assert!(matches!(err, MintError::Refused { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.starts_with("AWS refused to mint: could not get the local credentials: ")
                && message.ends_with("; run `aws sso login` (with --profile if you use one)"),
            "{message}"
        );
        assert!(!message.contains("fake-sso-access-token"), "{message}");
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let ended = SystemTime::now() - Duration::from_secs(60);
    let unused = TemporaryCredentials {
        access_key_id: "ASIASSOEXAMPLE".into(),
        secret_access_key: "sso-secret".into(),
        session_token: "sso-session-token".into(),
        expiration: SystemTime::now() + Duration::from_secs(3600),
        expiration_text: String::new(),
    };
    // The profile and the token cache of a login whose session ended a
    // minute ago; the portal refuses its token, as Identity Center does.
    let (_, config) = sso_login(home.path(), ended, &unused).await;
    let portal = FakeHttp::start(Arc::new(|_, _| {
        (
            401,
            "application/json",
            r#"{"__type":"UnauthorizedException","message":"Session token not found or invalid"}"#
                .to_owned(),
        )
    }))
    .await;
    run_child(
        TEST,
        &[
            ("HOME", home.path().display().to_string()),
            ("AWS_PROFILE", SSO_PROFILE.into()),
            ("AWS_CONFIG_FILE", config.display().to_string()),
            ("AWS_ENDPOINT_URL_SSO", portal.url.clone()),
            // Nothing may reach STS: the chain fails first.
            ("AWS_ENDPOINT_URL_STS", "http://127.0.0.1:9".into()),
        ],
    );
    // The portal was asked for role credentials, and refused.
    let asked = portal.received();
    assert!(
        !asked.is_empty()
            && asked
                .iter()
                .all(|r| r.request_line.starts_with("GET /federation/credentials")),
        "{asked:?}"
    );
}
