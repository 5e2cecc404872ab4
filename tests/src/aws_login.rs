//! The user's AWS logins the operations tests need besides long-term keys:
//! temporary credentials that moto's STS really issued (what
//! `AWS_SESSION_TOKEN` in a shell, or an SSO role, hands the client), and an
//! AWS SSO login — a profile, the SSO token cache `aws sso login` writes
//! (`~/.aws/sso/cache/<sha1>.json`) and a stand-in for the SSO portal's
//! `GetRoleCredentials` (moto has no SSO portal) that returns moto-issued
//! credentials, so that everything the client does with them is checked by
//! moto.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fake_http::FakeHttp;
use crate::moto::{Moto, Seeded};
use crate::processes::{Process, clean_command};

/// Temporary credentials from moto's STS.
#[derive(Clone, Debug)]
pub struct TemporaryCredentials {
    /// `ASIA…`.
    pub access_key_id: String,
    /// The secret key.
    pub secret_access_key: String,
    /// The session token.
    pub session_token: String,
    /// When moto says they expire.
    pub expiration: SystemTime,
    /// `expiration` as boto3 printed it (RFC 3339).
    pub expiration_text: String,
}

const ASSUME_SCRIPT: &str = r#"
import json, sys
import boto3
url, key, secret, role, seconds = sys.argv[1:6]
sts = boto3.client("sts", endpoint_url=url, region_name="us-east-1",
                   aws_access_key_id=key, aws_secret_access_key=secret)
c = sts.assume_role(RoleArn=role, RoleSessionName="laptop-shell",
                    DurationSeconds=int(seconds))["Credentials"]
print(json.dumps({"AccessKeyId": c["AccessKeyId"], "SecretAccessKey": c["SecretAccessKey"],
                  "SessionToken": c["SessionToken"],
                  "Expiration": c["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "Epoch": int(c["Expiration"].timestamp())}))
"#;

/// `AssumeRole` of the seeded role with the seeded user's keys, through
/// boto3 (works with moto's authentication on), for `lifetime`.
pub async fn temporary_credentials(
    python: &Path,
    moto: &Moto,
    seeded: &Seeded,
    lifetime: Duration,
) -> TemporaryCredentials {
    let mut command = clean_command(python);
    command.args([
        "-c",
        ASSUME_SCRIPT,
        &moto.url,
        &seeded.access_key_id,
        &seeded.secret_access_key,
        &seeded.role_arn,
        &lifetime.as_secs().to_string(),
    ]);
    let mut process = Process::spawn("boto3 assume_role", command);
    assert!(process.exit().await.success(), "{}", process.output());
    let json: serde_json::Value =
        serde_json::from_str(process.stdout().trim()).expect("the script prints JSON");
    let text = |name: &str| json[name].as_str().expect(name).to_owned();
    TemporaryCredentials {
        access_key_id: text("AccessKeyId"),
        secret_access_key: text("SecretAccessKey"),
        session_token: text("SessionToken"),
        expiration: UNIX_EPOCH + Duration::from_secs(json["Epoch"].as_u64().expect("Epoch")),
        expiration_text: text("Expiration"),
    }
}

/// RFC 3339 (`2026-12-01T17:42:00Z`) of a time.
pub fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

/// The start URL of the fake SSO login.
pub const SSO_START_URL: &str = "https://credstream-test.awsapps.com/start";
/// The profile that uses it.
pub const SSO_PROFILE: &str = "work";

/// An AWS SSO login on the "laptop": `home/.aws/config` with profile
/// [`SSO_PROFILE`], the SSO token cache entry whose access token expires at
/// `session_end`, and the portal answering `GetRoleCredentials` with
/// `credentials`. Returns the portal (which records what it was asked) and
/// the config file's path.
pub async fn sso_login(
    home: &Path,
    session_end: SystemTime,
    credentials: &TemporaryCredentials,
) -> (FakeHttp, PathBuf) {
    let aws = home.join(".aws");
    std::fs::create_dir_all(aws.join("sso/cache")).unwrap();
    let config = aws.join("config");
    std::fs::write(
        &config,
        format!(
            "[profile {SSO_PROFILE}]\n\
             sso_start_url = {SSO_START_URL}\n\
             sso_region = us-east-1\n\
             sso_account_id = 123456789012\n\
             sso_role_name = cluster-reader\n\
             region = us-east-1\n"
        ),
    )
    .unwrap();
    // What `aws sso login` writes for a profile without `sso_session`
    // (aws-config reads the same file).
    let cache = credstream_client::mint::sso_cache::cache_path(home, SSO_START_URL);
    std::fs::write(
        &cache,
        serde_json::json!({
            "startUrl": SSO_START_URL,
            "region": "us-east-1",
            "accessToken": "fake-sso-access-token",
            "expiresAt": rfc3339(session_end),
        })
        .to_string(),
    )
    .unwrap();
    let reply = serde_json::json!({
        "roleCredentials": {
            "accessKeyId": credentials.access_key_id,
            "secretAccessKey": credentials.secret_access_key,
            "sessionToken": credentials.session_token,
            "expiration": credentials
                .expiration
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        }
    })
    .to_string();
    let portal = FakeHttp::start(Arc::new(move |_, request| {
        if request
            .request_line
            .starts_with("GET /federation/credentials")
        {
            (200, "application/json", reply.clone())
        } else {
            (404, "application/json", "{}".to_owned())
        }
    }))
    .await;
    (portal, config)
}
