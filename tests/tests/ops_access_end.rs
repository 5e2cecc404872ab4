//! "Workers keep access until …": the client knows when it will no longer
//! be able to mint, publishes it with each credential, and `credstream
//! publish`, `credstream status`, `GetCluster` and the broker's Prometheus
//! gauge all show it. Through the real binaries, with moto (auth on) as STS:
//!
//! - temporary credentials in the environment (`AWS_SESSION_TOKEN`, with
//!   `AWS_CREDENTIAL_EXPIRATION`), forwarded as they are: access ends when
//!   they expire;
//! - an AWS SSO login (a profile, the SSO token cache `aws sso login`
//!   writes, and a portal handing out moto-issued role credentials): access
//!   ends when the SSO session does, and 20 minutes before that is inside
//!   the 30-minute warning.

use std::time::{Duration, SystemTime};

use credstream_proto::convert::system_time;
use credstream_tests::aws_login::{SSO_PROFILE, rfc3339, sso_login, temporary_credentials};
use credstream_tests::bins::binary;
use credstream_tests::moto::{Moto, laptop_env, seed};
use credstream_tests::processes::{BrokerProcess, Process, clean_command, write_file};
use credstream_tests::tools;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `HH:MM UTC` as `credstream publish` prints a time later today (or the
/// date too, if it is another day).
fn clock(at: SystemTime) -> String {
    let at_text = rfc3339(at);
    if at_text[..10] == rfc3339(SystemTime::now())[..10] {
        format!("{} UTC", &at_text[11..16])
    } else {
        format!("{} {} UTC", &at_text[..10], &at_text[11..16])
    }
}

fn publish(env: &[(String, String)], broker: &BrokerProcess) -> Process {
    let mut command = clean_command(binary("credstream"));
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("CREDSTREAM_TOKEN", &broker.publisher_token)
        .args([
            "publish",
            "--broker",
            &broker.url,
            "--cluster",
            "dev",
            "--no-gcp",
        ]);
    Process::spawn("credstream publish", command)
}

/// Replaces (or adds) `key` in an environment list.
fn set(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    env.retain(|(k, _)| k != key);
    env.push((key.to_owned(), value.to_owned()));
}

/// `GetCluster` once the broker holds the published credential.
async fn status_with_credential(broker: &BrokerProcess) -> credstream_proto::v1::ClusterStatus {
    tokio::time::timeout(credstream_tests::broker::WAIT, async {
        loop {
            let status = broker.status("dev").await.unwrap();
            if !status.credentials.is_empty() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the broker holds the credential")
}

async fn metrics(url: &str) -> String {
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn session_credentials_in_the_environment_end_access_when_they_expire() {
    let test = "session_credentials_in_the_environment_end_access_when_they_expire";
    let Some(python) = tools::python(test) else {
        return;
    };
    let moto = Moto::start(&python).await;
    let seeded = seed(&python, &moto).await;
    moto.require_auth().await;
    // What a shell holds after `aws sts assume-role` (or aws-vault exec):
    // one-hour credentials moto issued, with their expiry beside them.
    let session = temporary_credentials(&python, &moto, &seeded, Duration::from_secs(3600)).await;
    let home = tempfile::tempdir().unwrap();
    let mut laptop = laptop_env(&moto, &seeded, home.path());
    set(&mut laptop, "AWS_ACCESS_KEY_ID", &session.access_key_id);
    set(
        &mut laptop,
        "AWS_SECRET_ACCESS_KEY",
        &session.secret_access_key,
    );
    set(&mut laptop, "AWS_SESSION_TOKEN", &session.session_token);
    set(
        &mut laptop,
        "AWS_CREDENTIAL_EXPIRATION",
        &session.expiration_text,
    );

    let broker = BrokerProcess::start_dev_with(&["--metrics-listen", "127.0.0.1:0"]).await;
    let metrics_url = broker
        .process
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("metrics on ").map(str::to_owned))
        .expect("the broker prints the metrics address");
    let mut publisher = publish(&laptop, &broker);
    let announced = publisher
        .line(|l| l.starts_with("workers keep AWS access until"))
        .await;
    assert!(
        announced.starts_with(&format!(
            "workers keep AWS access until {}, in ",
            clock(session.expiration)
        )) && announced.ends_with(" (your temporary AWS credentials expire then)"),
        "{announced}"
    );

    // GetCluster carries it with the credential.
    let status = status_with_credential(&broker).await;
    let credential = &status.credentials[0];
    let end = credential.access_end.as_ref().expect("an access end");
    assert_eq!(
        end.at.as_ref().and_then(system_time),
        Some(session.expiration)
    );
    assert_eq!(end.reason, "your temporary AWS credentials expire then");
    assert_eq!(
        credential.expires_at, end.at,
        "forwarded as they are: they expire when access ends"
    );

    // `credstream status` says it.
    let token_file = write_file(home.path(), "publisher.token", &broker.publisher_token);
    let mut status = Process::spawn("credstream status", {
        let mut command = clean_command(binary("credstream"));
        command.args(["status", "--broker", &broker.url, "--cluster", "dev"]);
        command.arg("--token-file").arg(&token_file);
        command
    });
    assert!(status.exit().await.success(), "{}", status.output());
    let report = status.stdout();
    assert!(
        report.contains(&format!(
            "\n    workers keep AWS access until {} (in ",
            rfc3339(session.expiration)
        )) && report.contains("): your temporary AWS credentials expire then\n"),
        "{report}"
    );
    assert!(!report.contains(&session.secret_access_key), "{report}");

    // The broker's gauge exposes it.
    let text = metrics(&metrics_url).await;
    let expected = format!(
        "credstream_access_end_timestamp_seconds{{cluster=\"dev\",kind=\"aws\"}} {}",
        session
            .expiration
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    );
    assert!(text.contains(&expected), "{expected} in\n{text}");
    assert!(!text.contains(&session.session_token));

    publisher.signal("TERM");
    assert!(publisher.exit().await.success(), "{}", publisher.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn an_sso_login_ends_access_when_its_session_ends_and_is_warned_about() {
    let test = "an_sso_login_ends_access_when_its_session_ends_and_is_warned_about";
    let Some(python) = tools::python(test) else {
        return;
    };
    let moto = Moto::start(&python).await;
    let seeded = seed(&python, &moto).await;
    moto.require_auth().await;
    let role = temporary_credentials(&python, &moto, &seeded, Duration::from_secs(3600)).await;
    let home = tempfile::tempdir().unwrap();
    // The SSO session ends in 20 minutes: inside the 30-minute warning.
    let now = SystemTime::now();
    let session_end = SystemTime::UNIX_EPOCH
        + Duration::from_secs(
            (now + Duration::from_secs(20 * 60))
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let (portal, config) = sso_login(home.path(), session_end, &role).await;
    let empty = write_file(home.path(), "empty-credentials", "");
    let laptop: Vec<(String, String)> = vec![
        ("HOME".into(), home.path().display().to_string()),
        ("USER".into(), "laptop-user".into()),
        ("AWS_PROFILE".into(), SSO_PROFILE.into()),
        ("AWS_CONFIG_FILE".into(), config.display().to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            empty.display().to_string(),
        ),
        ("AWS_ENDPOINT_URL_STS".into(), moto.url.clone()),
        ("AWS_ENDPOINT_URL_SSO".into(), portal.url.clone()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ];

    let broker = BrokerProcess::start_dev().await;
    let mut publisher = publish(&laptop, &broker);
    publisher
        .line(|l| l.starts_with("aws: ") && l.contains("SSO (profile work)"))
        .await;
    let announced = publisher
        .line(|l| l.starts_with("workers keep AWS access until"))
        .await;
    assert!(
        announced.starts_with(&format!(
            "workers keep AWS access until {}, in ",
            clock(session_end)
        )) && announced.ends_with(" (your SSO session ends then)"),
        "{announced}"
    );
    let warning = publisher.line(|l| l.starts_with("warning: ")).await;
    assert!(
        warning.starts_with(&format!(
            "warning: workers lose AWS access at {}, in ",
            clock(session_end)
        )) && warning
            .contains("(your SSO session ends then): log in again before then (`aws sso login`"),
        "{warning}"
    );
    // The credential came from the SSO portal (moto's, forwarded as is)
    // and the SSO end is what the broker holds.
    assert!(
        portal.received().iter().any(
            |r| r.request_line.starts_with("GET /federation/credentials")
                && r.request_line.contains("role_name=cluster-reader")
        ),
        "{:?}",
        portal.received()
    );
    let status = status_with_credential(&broker).await;
    let end = status.credentials[0]
        .access_end
        .as_ref()
        .expect("an access end");
    assert_eq!(end.at.as_ref().and_then(system_time), Some(session_end));
    assert_eq!(end.reason, "your SSO session ends then");
    assert!(!publisher.output().contains("fake-sso-access-token"));

    publisher.signal("TERM");
    assert!(publisher.exit().await.success(), "{}", publisher.output());
}
