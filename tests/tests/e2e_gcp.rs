//! End to end on Google Cloud (docs/design.md §7): `credstream publish --no-aws`
//! mints from a service account key (whose `token_uri` is a local token
//! endpoint) and, on a "worker" with no Google credentials of its own,
//! unmodified `google.auth.default()` in a process started by
//! `credstream-agent exec` finds the agent's metadata emulation and gets
//! exactly the token the endpoint issued; `CLOUDSDK_AUTH_ACCESS_TOKEN` holds
//! it too.
//!
//! Real peers: google-auth (and `cryptography` for the test's RSA key) from
//! the project's Python venv, and the three binaries. Without the venv the
//! test prints `skipped:`.

use std::path::Path;
use std::sync::Arc;

use credstream_tests::bins::binary;
use credstream_tests::fake_http::FakeHttp;
use credstream_tests::processes::{BrokerProcess, Process, clean_command, write_file};
use credstream_tests::tools;

const EMAIL: &str = "pipeline@credstream-e2e.iam.gserviceaccount.com";
const PROJECT: &str = "credstream-e2e";

/// What the worker runs: Google's default credentials, refreshed, printed.
const ADC_SCRIPT: &str = r#"import os
import google.auth
from google.auth.transport.requests import Request

credentials, project = google.auth.default()
credentials.refresh(Request())
print("class=" + type(credentials).__module__ + "." + type(credentials).__name__)
print("project=" + str(project))
print("email=" + str(getattr(credentials, "service_account_email", None)))
print("token=" + credentials.token)
print("CLOUDSDK_AUTH_ACCESS_TOKEN=" + os.environ.get("CLOUDSDK_AUTH_ACCESS_TOKEN", "<unset>"))
"#;

/// An OAuth2 token endpoint on 127.0.0.1:0 that answers every POST with a
/// new token (`ya29.e2e-1`, `ya29.e2e-2`, …) valid for an hour.
async fn token_endpoint() -> FakeHttp {
    FakeHttp::start(Arc::new(|number, _| {
        let body = format!(
            r#"{{"access_token": "{}", "expires_in": 3600, "token_type": "Bearer"}}"#,
            issued_token(number)
        );
        (200, "application/json", body)
    }))
    .await
}

fn issued_token(number: usize) -> String {
    format!("ya29.e2e-{number}")
}

/// The tokens the endpoint has issued, in order.
fn issued(endpoint: &FakeHttp) -> Vec<String> {
    (1..=endpoint.received().len()).map(issued_token).collect()
}

fn key_file(dir: &Path, pem: &str, token_uri: &str) -> String {
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123456789abcdef",
        "private_key": pem,
        "client_email": EMAIL,
        "client_id": "100000000000000000002",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    });
    write_file(dir, "service-account.json", &json.to_string())
        .display()
        .to_string()
}

/// A "worker" environment: an empty home (no gcloud configuration, no
/// application default credentials), nothing else.
fn worker_env(home: &Path) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), home.display().to_string()),
        (
            "CLOUDSDK_CONFIG".into(),
            home.join("gcloud").display().to_string(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn google_auth_default_on_a_worker_gets_the_token_the_client_published() {
    let test = "google_auth_default_on_a_worker_gets_the_token_the_client_published";
    let Some(python) = tools::python(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let laptop_home = dir.path().join("laptop");
    let worker_home = dir.path().join("worker");
    std::fs::create_dir_all(&laptop_home).unwrap();
    std::fs::create_dir_all(&worker_home).unwrap();
    let endpoint = token_endpoint().await;
    let key = key_file(
        dir.path(),
        &credstream_tests::gcp_key::generate().pem,
        &format!("{}/token", endpoint.url),
    );
    let script = write_file(dir.path(), "adc.py", ADC_SCRIPT);
    let worker = worker_env(&worker_home);

    // The worker alone has no Google credentials (the metadata server it
    // would ping is a closed loopback port here).
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    };
    let mut alone = clean_command(&python);
    alone
        .envs(worker.iter().map(|(k, v)| (k, v)))
        .env("GCE_METADATA_HOST", &closed)
        .env("GCE_METADATA_IP", &closed)
        .arg(&script);
    let mut alone = Process::spawn("python without the agent", alone);
    assert!(!alone.exit().await.success(), "{}", alone.output());
    assert!(
        alone.stderr().contains("DefaultCredentialsError"),
        "{}",
        alone.output()
    );

    let broker = BrokerProcess::start_dev().await;
    let mut publish = clean_command(binary("credstream"));
    publish
        .env("HOME", &laptop_home)
        .env("GOOGLE_APPLICATION_CREDENTIALS", &key)
        .env("CREDSTREAM_TOKEN", &broker.publisher_token)
        .args([
            "publish",
            "--broker",
            &broker.url,
            "--cluster",
            "dev",
            "--no-aws",
        ]);
    let mut publish = Process::spawn("credstream publish", publish);
    publish.line(|l| l == format!("gcp: {EMAIL}")).await;
    publish
        .line(|l| l.starts_with("publishing GCP to cluster dev"))
        .await;
    let minted = publish.line(|l| l.starts_with("minted GCP")).await;
    assert!(
        minted.starts_with(&format!("minted GCP for {EMAIL}, valid until ")),
        "{minted}"
    );
    // Sealed (the default): the worker gets the key out of band.
    publish
        .line(|l| l.starts_with("sealing every credential and env change for cluster dev"))
        .await;
    let laptop = [("HOME".to_owned(), laptop_home.display().to_string())];
    let (seal_key, _) =
        credstream_tests::sealed_agent::worker_seal_key(&laptop, "dev", dir.path()).await;
    // The published token is the endpoint's latest (the first one only
    // proved the key works, for the `gcp:` line above).
    let published = issued(&endpoint).last().cloned().expect("a token");

    let token_file = write_file(dir.path(), "agent.token", &broker.agent_token);
    let mut exec = clean_command(binary("credstream-agent"));
    exec.envs(worker.iter().map(|(k, v)| (k, v)))
        .args(["exec", "--broker", &broker.url, "--cluster", "dev"])
        .args(["--agent-id", "worker-1", "--wait-timeout", "60s"])
        .arg("--token-file")
        .arg(&token_file)
        .arg("--seal-key-file")
        .arg(&seal_key)
        .arg("--")
        .arg(&python)
        .arg(&script);
    let mut exec = Process::spawn("credstream-agent exec", exec);
    let exit = exec.exit().await;
    assert!(exit.success(), "{}", exec.output());
    let out = exec.stdout();
    let expect = |line: String| assert!(out.lines().any(|l| l == line), "{line}\n{out}");
    expect("class=google.auth.compute_engine.credentials.Credentials".to_owned());
    expect(format!("project={PROJECT}"));
    expect(format!("email={EMAIL}"));
    expect(format!("token={published}"));
    expect(format!("CLOUDSDK_AUTH_ACCESS_TOKEN={published}"));
    assert_eq!(
        issued(&endpoint).len(),
        2,
        "the worker's refresh asked the agent, not Google: {:?}",
        issued(&endpoint)
    );

    publish.signal("TERM");
    assert!(publish.exit().await.success(), "{}", publish.output());
}
