//! The real libraries against the agent's endpoints: boto3 and google-auth
//! from the project's venv (`CREDSTREAM_TEST_PYTHON`), run with nothing but
//! the variables the agent gives a child (no AWS keys, empty AWS config
//! files, no gcloud config), against a server whose store the test fills.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use common::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(120);

/// A Python process with only `vars` plus an isolated home in its
/// environment.
fn python_command<'a>(
    python: &Path,
    home: &Path,
    vars: impl Iterator<Item = (&'a str, &'a str)>,
    script: &str,
) -> Command {
    let empty = home.join("empty");
    std::fs::write(&empty, "").unwrap();
    let mut command = Command::new(python);
    command
        .env_clear()
        .envs(vars)
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", &empty)
        .env("AWS_SHARED_CREDENTIALS_FILE", &empty)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("CLOUDSDK_CONFIG", home.join("gcloud"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

async fn run_json(mut command: Command) -> serde_json::Value {
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("python finished in time")
        .expect("python ran");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

const BOTO3_CREDENTIALS: &str = r#"
import json, boto3
session = boto3.Session()
credentials = session.get_credentials()
frozen = credentials.get_frozen_credentials()
print(json.dumps({
    "method": credentials.method,
    "key": frozen.access_key,
    "secret": frozen.secret_key,
    "token": frozen.token,
    "account": getattr(frozen, "account_id", None),
    "region": session.region_name,
}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn boto3_gets_the_credential_from_the_agent_alone() {
    let Some(python) = python("boto3_gets_the_credential_from_the_agent_alone") else {
        return;
    };
    let agent = start(ready_store(), true).await;
    let home = tempfile::tempdir().unwrap();
    let env = agent
        .endpoints
        .child_env(&agent.store.current(), SystemTime::now());

    let got = run_json(python_command(
        &python,
        home.path(),
        env.iter(),
        BOTO3_CREDENTIALS,
    ))
    .await;
    assert_eq!(got["method"], "container-role");
    assert_eq!(got["key"], "ASIAFIRST");
    assert_eq!(got["secret"], format!("{AWS_SECRET}-ASIAFIRST"));
    assert_eq!(got["token"], format!("{AWS_SESSION}-ASIAFIRST"));
    assert_eq!(got["account"], "123456789012");
    assert_eq!(got["region"], "eu-west-3");

    // What `run` prints (the URI and the token *file*) is enough too.
    let exported: Vec<(&str, String)> = agent.endpoints.public_exports();
    let got = run_json(python_command(
        &python,
        home.path(),
        exported.iter().map(|(n, v)| (*n, v.as_str())),
        BOTO3_CREDENTIALS,
    ))
    .await;
    assert_eq!(got["key"], "ASIAFIRST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn long_running_boto3_picks_up_a_rotated_credential() {
    let Some(python) = python("long_running_boto3_picks_up_a_rotated_credential") else {
        return;
    };
    let store = ready_store();
    // Inside botocore's 15-minute advisory window: every use re-fetches,
    // as it will for any credential in its last quarter hour.
    store.apply(aws(10, "ASIAOLD", Some(Duration::from_secs(12 * 60))));
    let agent = start(store.clone(), true).await;
    let home = tempfile::tempdir().unwrap();
    let env = agent
        .endpoints
        .child_env(&store.current(), SystemTime::now());
    let script = r#"
import sys, boto3
credentials = boto3.Session().get_credentials()
print(credentials.get_frozen_credentials().access_key, flush=True)
for _ in sys.stdin:
    print(credentials.get_frozen_credentials().access_key, flush=True)
"#;
    let mut command = python_command(&python, home.path(), env.iter(), script);
    command.stdin(Stdio::piped());
    let mut child = command.spawn().expect("python starts");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next_line = async || {
        tokio::time::timeout(LIMIT, lines.next_line())
            .await
            .expect("python answered in time")
            .expect("read")
            .expect("python is still running")
    };

    assert_eq!(next_line().await, "ASIAOLD");
    store.apply(aws(11, "ASIANEW", Some(Duration::from_secs(3600))));
    stdin.write_all(b"again\n").await.unwrap();
    assert_eq!(next_line().await, "ASIANEW");
    stdin.write_all(b"again\n").await.unwrap();
    assert_eq!(next_line().await, "ASIANEW");
    drop(stdin);
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn google_auth_default_gets_the_token_from_the_emulation() {
    let Some(python) = python("google_auth_default_gets_the_token_from_the_emulation") else {
        return;
    };
    let agent = start(ready_store(), true).await;
    let home = tempfile::tempdir().unwrap();
    let env = agent
        .endpoints
        .child_env(&agent.store.current(), SystemTime::now());
    let script = r#"
import json, datetime
import google.auth, google.auth.transport.requests
credentials, project = google.auth.default()
credentials.refresh(google.auth.transport.requests.Request())
left = credentials.expiry.replace(tzinfo=datetime.timezone.utc) - datetime.datetime.now(datetime.timezone.utc)
print(json.dumps({
    "type": type(credentials).__module__ + "." + type(credentials).__name__,
    "project": project,
    "token": credentials.token,
    "email": credentials.service_account_email,
    "seconds_left": left.total_seconds(),
}))
"#;
    let got = run_json(python_command(&python, home.path(), env.iter(), script)).await;
    assert_eq!(
        got["type"],
        "google.auth.compute_engine.credentials.Credentials"
    );
    assert_eq!(got["project"], "demo-project");
    assert_eq!(got["token"], GCP_TOKEN);
    assert_eq!(got["email"], "worker@demo-project.iam.gserviceaccount.com");
    let left = got["seconds_left"].as_f64().unwrap();
    assert!(left > 0.0 && left <= 3600.0, "{left}");
}
