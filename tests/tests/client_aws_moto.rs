//! AWS minting against a real moto server (STS): what is called, with what,
//! and what comes out. Tests that exercise the default credential chain
//! from environment variables run their body in a child process (see
//! `credstream_tests::child::run_child`) so the parallel tests here keep their environment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use credstream_client::mint::aws::AwsMinter;
use credstream_client::mint::{MintError, Minter};
use credstream_client::whoami::whoami;
use credstream_proto::v1::{AwsCredential, CredentialUpdate, credential_update::Credential};
use credstream_tests::child::{in_child, run_child};
use credstream_tests::moto::Moto;
use credstream_tests::tools::python;

const MOTO_USER_ARN: &str = "arn:aws:sts::123456789012:user/moto";
const LONG_TERM_KEY_ID: &str = "AKIALONGTERMEXAMPLE1";
const LONG_TERM_SECRET: &str = "long-term-secret-never-forwarded";

fn long_term_keys() -> Credentials {
    Credentials::new(LONG_TERM_KEY_ID, LONG_TERM_SECRET, None, None, "test")
}

fn aws(update: &CredentialUpdate) -> &AwsCredential {
    match &update.credential {
        Some(Credential::Aws(aws)) => aws,
        other => panic!("not an AWS credential: {other:?}"),
    }
}

fn seconds_from_now(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
        - SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
}

fn rfc3339(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn long_term_keys_are_exchanged_with_get_session_token() {
    let Some(python) = python("long_term_keys_are_exchanged_with_get_session_token") else {
        return;
    };
    let moto = Moto::start(&python).await;
    let minter = AwsMinter::builder()
        .credentials_provider(long_term_keys())
        .endpoint_url(&moto.url)
        .region("us-east-1")
        .duration(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();

    let update = minter.mint().await.unwrap();
    let credential = aws(&update);
    assert!(!credential.session_token.is_empty());
    assert_ne!(credential.access_key_id, LONG_TERM_KEY_ID);
    assert_ne!(credential.secret_access_key, LONG_TERM_SECRET);
    assert_eq!(credential.principal_arn, MOTO_USER_ARN);
    assert_eq!(credential.account_id, "123456789012");
    assert_eq!(credential.region, "us-east-1");
    let left = seconds_from_now(update.expiry().unwrap());
    assert!((3500..=3700).contains(&left), "expires in {left}s");
    assert!(update.issued_at.is_some());
    assert_eq!(update.version, 0);
    assert!(update.refresh_request_id.is_empty());
    assert_eq!(moto.sts_records("Token").await.len(), 1);
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn two_mints_are_two_sts_calls() {
    let Some(python) = python("two_mints_are_two_sts_calls") else {
        return;
    };
    let moto = Moto::start(&python).await;
    let minter = AwsMinter::builder()
        .credentials_provider(long_term_keys())
        .endpoint_url(&moto.url)
        .region("us-east-1")
        .build()
        .await
        .unwrap();
    let first = minter.mint().await.unwrap();
    let second = minter.mint().await.unwrap();
    assert_eq!(moto.sts_records("Token").await.len(), 2);
    // The default duration is 12 hours.
    for update in [&first, &second] {
        let left = seconds_from_now(update.expiry().unwrap());
        assert!(
            (12 * 3600 - 100..=12 * 3600 + 100).contains(&left),
            "{left}s"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn role_arn_with_session_policy_calls_assume_role_with_that_policy() {
    let Some(python) = python("role_arn_with_session_policy_calls_assume_role_with_that_policy")
    else {
        return;
    };
    let moto = Moto::start(&python).await;
    let dir = tempfile::tempdir().unwrap();
    let policy_path = dir.path().join("policy.json");
    let policy = r#"{
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::data/*"}]
    }"#;
    std::fs::write(&policy_path, policy).unwrap();
    let role = "arn:aws:iam::123456789012:role/cluster-reader";
    let minter = AwsMinter::builder()
        .credentials_provider(long_term_keys())
        .endpoint_url(&moto.url)
        .region("eu-west-1")
        .role_arn(role)
        .role_session_name("credstream-test")
        .session_policy_file(&policy_path)
        .duration(Duration::from_secs(2 * 3600))
        .build()
        .await
        .unwrap();

    let update = minter.mint().await.unwrap();
    let credential = aws(&update);
    assert_eq!(
        credential.principal_arn,
        "arn:aws:sts::123456789012:assumed-role/cluster-reader/credstream-test"
    );
    assert_eq!(credential.account_id, "123456789012");
    assert_eq!(credential.region, "eu-west-1");
    assert!(credential.access_key_id.starts_with("ASIA"));
    let left = seconds_from_now(update.expiry().unwrap());
    assert!((7100..=7300).contains(&left), "expires in {left}s");

    // moto recorded the AssumeRole call with exactly that policy.
    let roles = moto.sts_records("AssumedRole").await;
    assert_eq!(roles.len(), 1, "{roles:?}");
    let record = &roles[0];
    assert_eq!(record["role_arn"], role);
    assert_eq!(record["session_name"], "credstream-test");
    assert_eq!(record["access_key_id"], credential.access_key_id.as_str());
    let sent: serde_json::Value =
        serde_json::from_str(record["policy"].as_str().expect("a policy was sent")).unwrap();
    let written: serde_json::Value = serde_json::from_str(policy).unwrap();
    assert_eq!(sent, written);
    assert!(moto.sts_records("Token").await.is_empty());
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn session_token_in_environment_is_forwarded_as_is() {
    const TEST: &str = "session_token_in_environment_is_forwarded_as_is";
    if in_child() {
        // The default chain, configured only by the environment below,
        // including the STS endpoint (AWS_ENDPOINT_URL_STS).
        let minter = AwsMinter::builder().build().await.unwrap();
        let update = minter.mint().await.unwrap();
        let credential = aws(&update);
        assert_eq!(credential.access_key_id, "ASIAENVIRONMENTEXAMP");
        assert_eq!(credential.secret_access_key, "environment-secret");
        assert_eq!(credential.session_token, "environment-session-token");
        assert_eq!(credential.principal_arn, MOTO_USER_ARN);
        assert_eq!(credential.region, "eu-central-1");
        let expected: u64 = std::env::var("EXPECTED_EXPIRY").unwrap().parse().unwrap();
        assert_eq!(
            update.expiry().unwrap(),
            UNIX_EPOCH + Duration::from_secs(expected)
        );
        return;
    }
    let Some(python) = python(TEST) else {
        return;
    };
    let moto = Moto::start(&python).await;
    let expiry = UNIX_EPOCH
        + Duration::from_secs(
            (SystemTime::now() + Duration::from_secs(2400))
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    run_child(
        TEST,
        &[
            ("AWS_ACCESS_KEY_ID", "ASIAENVIRONMENTEXAMP".into()),
            ("AWS_SECRET_ACCESS_KEY", "environment-secret".into()),
            ("AWS_SESSION_TOKEN", "environment-session-token".into()),
            ("AWS_CREDENTIAL_EXPIRATION", rfc3339(expiry)),
            ("AWS_REGION", "eu-central-1".into()),
            ("AWS_ENDPOINT_URL_STS", moto.url.clone()),
            (
                "EXPECTED_EXPIRY",
                expiry
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    .to_string(),
            ),
        ],
    );
    // GetSessionToken was never called (AWS would refuse it).
    assert!(moto.sts_records("Token").await.is_empty());
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn whoami_prints_the_caller_identity_and_its_source() {
    const TEST: &str = "whoami_prints_the_caller_identity_and_its_source";
    if in_child() {
        let minter = AwsMinter::builder().build().await.unwrap();
        let answer = whoami(Some(&minter), None).await;
        let lines = answer.lines();
        println!("{}", lines.join("\n"));
        assert!(answer.all_found(), "{lines:?}");
        assert_eq!(
            lines,
            [
                format!("aws: {MOTO_USER_ARN} (account 123456789012)"),
                "aws: source: environment variables (AWS_ACCESS_KEY_ID)".to_owned(),
                "aws: region: ap-south-1".to_owned(),
                "aws: forwards: GetSessionToken credentials for 12h (the long-term keys stay here)"
                    .to_owned(),
            ]
        );
        let printed = format!("{answer:?} {lines:?}");
        assert!(!printed.contains(LONG_TERM_SECRET), "{printed}");
        return;
    }
    let Some(python) = python(TEST) else {
        return;
    };
    let moto = Moto::start(&python).await;
    run_child(
        TEST,
        &[
            ("AWS_ACCESS_KEY_ID", LONG_TERM_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY", LONG_TERM_SECRET.into()),
            ("AWS_DEFAULT_REGION", "ap-south-1".into()),
            // The general endpoint variable, this time.
            ("AWS_ENDPOINT_URL", moto.url.clone()),
        ],
    );
    // whoami mints nothing.
    assert!(moto.sts_records("Token").await.is_empty());
}

#[tokio::test]
async fn missing_credentials_say_how_to_log_in() {
    const TEST: &str = "missing_credentials_say_how_to_log_in";
    if in_child() {
        let minter = AwsMinter::builder().build().await.unwrap();
        let err = minter.mint().await.unwrap_err();
        assert!(matches!(err, MintError::NoCredentials { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "no local AWS credentials: run `aws configure` or `aws sso login`, or set AWS_PROFILE"
        );
        let answer = whoami(Some(&minter), None).await;
        assert!(!answer.all_found());
        assert_eq!(
            answer.lines(),
            [
                "aws: none: no local AWS credentials: run `aws configure` or `aws sso login`, or set AWS_PROFILE"
            ]
        );
        return;
    }
    // No moto needed: nothing is found, so nothing is called.
    run_child(TEST, &[("AWS_REGION", "us-east-1".into())]);
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn rejected_keys_say_how_to_fix_them() {
    let Some(python) = python("rejected_keys_say_how_to_fix_them") else {
        return;
    };
    // With auth on, moto accepts only keys it issued.
    let moto = Moto::start_with_env(&python, &[("INITIAL_NO_AUTH_ACTION_COUNT", "0")]).await;
    let minter = AwsMinter::builder()
        .credentials_provider(long_term_keys())
        .endpoint_url(&moto.url)
        .region("us-east-1")
        .build()
        .await
        .unwrap();
    let err = minter.mint().await.unwrap_err();
    assert!(matches!(err, MintError::Refused { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with(
            "AWS refused to mint: GetSessionToken: AWS does not accept the local credentials: run `aws configure` or `aws sso login`, or set AWS_PROFILE (InvalidClientTokenId:"
        ),
        "{message}"
    );
    assert!(!message.contains(LONG_TERM_SECRET), "{message}");
}

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn access_denied_names_the_call_and_the_fix() {
    let Some(python) = python("access_denied_names_the_call_and_the_fix") else {
        return;
    };
    // Two unauthenticated actions to create a user without any policy.
    let moto = Moto::start_with_env(&python, &[("INITIAL_NO_AUTH_ACTION_COUNT", "2")]).await;
    let script = format!(
        "import boto3, json\n\
         iam = boto3.client('iam', endpoint_url='{}', region_name='us-east-1', aws_access_key_id='AKIASETUPEXAMPLE1234', aws_secret_access_key='x')\n\
         iam.create_user(UserName='nopolicy')\n\
         key = iam.create_access_key(UserName='nopolicy')['AccessKey']\n\
         print(json.dumps([key['AccessKeyId'], key['SecretAccessKey']]))\n",
        moto.url
    );
    let output = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (key_id, secret): (String, String) = serde_json::from_slice(&output.stdout).unwrap();
    let minter = AwsMinter::builder()
        .credentials_provider(Credentials::new(key_id, secret, None, None, "test"))
        .endpoint_url(&moto.url)
        .region("us-east-1")
        .build()
        .await
        .unwrap();
    let message = minter.mint().await.unwrap_err().to_string();
    assert!(
        message.starts_with(
            "AWS refused to mint: GetSessionToken: access denied: the local identity needs permission for this call"
        ),
        "{message}"
    );
    assert!(message.contains("sts:GetSessionToken"), "{message}");

    // whoami still works: GetCallerIdentity needs no permission.
    let answer = whoami(Some(&minter), None).await;
    assert_eq!(
        answer.lines()[0],
        "aws: arn:aws:iam::123456789012:user/nopolicy (account 123456789012)"
    );
}

#[tokio::test]
async fn unreachable_sts_says_so() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let minter = AwsMinter::builder()
        .credentials_provider(long_term_keys())
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .region("us-east-1")
        .build()
        .await
        .unwrap();
    let err = minter.mint().await.unwrap_err();
    assert!(matches!(err, MintError::Failed { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.starts_with("AWS minting failed: GetSessionToken: could not reach AWS STS"),
        "{message}"
    );
    assert!(message.contains("AWS_ENDPOINT_URL_STS"), "{message}");
}
