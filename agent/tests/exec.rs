//! `exec`: the child starts only when ready, gets the agent's variables,
//! receives forwarded signals, gives its exit code, and restarts once per
//! burst of private env changes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use credstream_agent::exec::{self, ExecConfig, ExecError, ForwardedSignal, Waited};
use credstream_agent::http::LocalEndpoints;
use credstream_agent::store::CredentialStore;
use credstream_proto::v1::CredentialKind;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(60);

fn sh(script: &str, args: &[&Path]) -> ExecConfig {
    let mut all = vec!["-c".into(), script.into(), "sh".into()];
    all.extend(args.iter().map(|p| p.as_os_str().to_owned()));
    ExecConfig::new("sh".into(), all)
}

/// A named pipe: the child writing to it blocks until the test reads, so
/// "the child got this far" is an event, not a guess.
fn fifo(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = std::process::Command::new("mkfifo")
        .arg(&path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    path
}

async fn read_fifo(path: &Path) -> String {
    let path = path.to_path_buf();
    tokio::time::timeout(
        LIMIT,
        tokio::task::spawn_blocking(move || std::fs::read_to_string(path).unwrap()),
    )
    .await
    .expect("the child wrote in time")
    .unwrap()
}

fn spawn_supervise(
    config: ExecConfig,
    store: CredentialStore,
    endpoints: LocalEndpoints,
) -> (
    mpsc::Sender<ForwardedSignal>,
    tokio::task::JoinHandle<Result<i32, ExecError>>,
) {
    let (tx, mut rx) = mpsc::channel(4);
    let task =
        tokio::spawn(async move { exec::supervise(&config, &store, &endpoints, &mut rx).await });
    (tx, task)
}

async fn finish(task: tokio::task::JoinHandle<Result<i32, ExecError>>) -> Result<i32, ExecError> {
    tokio::time::timeout(LIMIT, task)
        .await
        .expect("exec finished in time")
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn exec_gives_up_after_the_timeout_naming_what_it_waited_for() {
    let store = CredentialStore::new();
    store.apply(info(&[CredentialKind::Aws], false, 1));
    let (_tx, mut rx) = mpsc::channel(1);
    let error = exec::wait_ready(&store, Duration::from_secs(60), &mut rx)
        .await
        .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("1m"), "{message}");
    assert!(
        message.contains("no aws credential received yet"),
        "{message}"
    );

    let nothing = CredentialStore::new();
    let error = exec::wait_ready(&nothing, Duration::from_secs(5), &mut rx)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("first snapshot"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn a_signal_while_waiting_ends_exec_without_starting_anything() {
    let store = CredentialStore::new();
    let (tx, mut rx) = mpsc::channel(1);
    tx.send(ForwardedSignal::Terminate).await.unwrap();
    let waited = exec::wait_ready(&store, Duration::from_secs(60), &mut rx)
        .await
        .unwrap();
    assert!(matches!(
        waited,
        Waited::Signalled(ForwardedSignal::Terminate)
    ));
    assert_eq!(ForwardedSignal::Terminate.exit_code(), 143);
    assert_eq!(ForwardedSignal::Interrupt.exit_code(), 130);
}

#[tokio::test]
async fn the_child_starts_once_ready_with_the_agents_variables_and_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let store = CredentialStore::new();
    let agent = start(store.clone(), true).await;
    let config = sh(
        r#"printf '%s\n' "$AWS_CONTAINER_CREDENTIALS_FULL_URI" "$AUTH_TOKEN_FOR_CUSTOM_DATABASE" "$CLOUDSDK_AUTH_ACCESS_TOKEN" "$GCE_METADATA_HOST" > "$1"; exit 7"#,
        &[&out],
    );
    let (_tx, task) = spawn_supervise(config, store.clone(), agent.endpoints.clone());

    // Not ready yet: nothing may start.
    store.apply(info(&[CredentialKind::Aws, CredentialKind::Gcp], true, 1));
    store.apply(aws(2, "ASIAFIRST", Some(Duration::from_secs(3600))));
    store.apply(gcp(3, GCP_TOKEN, Some(Duration::from_secs(3600))));
    tokio::task::yield_now().await;
    assert!(
        !out.exists(),
        "the child started before the private env arrived"
    );
    store.apply(env(
        4,
        &[("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "db-secret-value")],
    ));

    assert_eq!(finish(task).await.unwrap(), 7);
    let lines: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        lines,
        [
            agent.endpoints.aws_credentials_uri(),
            "db-secret-value".to_owned(),
            GCP_TOKEN.to_owned(),
            agent.endpoints.gce_metadata_host(),
        ]
    );
}

#[tokio::test]
async fn signals_are_forwarded_and_the_childs_status_becomes_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(ready_store(), true).await;

    // A child that handles SIGTERM exits with its own code.
    let started = fifo(dir.path(), "term");
    let config = sh(
        r#"trap 'exit 42' TERM; echo started > "$1"; while :; do sleep 1; done"#,
        &[&started],
    );
    let (tx, task) = spawn_supervise(config, agent.store.clone(), agent.endpoints.clone());
    assert_eq!(read_fifo(&started).await.trim(), "started");
    tx.send(ForwardedSignal::Terminate).await.unwrap();
    assert_eq!(finish(task).await.unwrap(), 42);

    // A child killed by SIGINT gives 128 + 2, as a shell reports it.
    let started = fifo(dir.path(), "int");
    let config = sh(r#"echo started > "$1"; exec sleep 1000"#, &[&started]);
    let (tx, task) = spawn_supervise(config, agent.store.clone(), agent.endpoints.clone());
    assert_eq!(read_fifo(&started).await.trim(), "started");
    tx.send(ForwardedSignal::Interrupt).await.unwrap();
    assert_eq!(finish(task).await.unwrap(), 130);
}

#[tokio::test]
async fn a_missing_program_is_a_clear_error() {
    let agent = start(ready_store(), true).await;
    let config = ExecConfig::new("/nonexistent/credstream-test-program".into(), vec![]);
    let (_tx, task) = spawn_supervise(config, agent.store.clone(), agent.endpoints.clone());
    let error = finish(task).await.unwrap_err();
    assert!(
        error.to_string().contains("cannot start /nonexistent"),
        "{error}"
    );
}

#[tokio::test]
async fn a_burst_of_private_env_changes_restarts_the_child_once() {
    let dir = tempfile::tempdir().unwrap();
    let started = fifo(dir.path(), "started");
    let log = dir.path().join("log");
    let store = ready_store();
    store.apply(env(10, &[("V", "1")]));
    let agent = start(store.clone(), true).await;
    let mut config = sh(
        r#"printf '%s\n' "$V" >> "$2"; printf '%s\n' "$V" > "$1"; exec sleep 1000"#,
        &[&started, &log],
    );
    config.restart_on_change = true;
    config.restart_debounce = Duration::from_millis(50);
    let (tx, task) = spawn_supervise(config, store.clone(), agent.endpoints.clone());

    assert_eq!(read_fifo(&started).await, "1\n");
    // A credential rotation is not an env change.
    store.apply(aws(11, "ASIASECOND", Some(Duration::from_secs(3600))));
    // The burst: applied without yielding, so the supervisor sees it whole.
    store.apply(env(12, &[("V", "2")]));
    store.apply(env(13, &[("V", "3")]));
    store.apply(env(14, &[("V", "4")]));
    assert_eq!(read_fifo(&started).await, "4\n");

    tx.send(ForwardedSignal::Terminate).await.unwrap();
    assert_eq!(finish(task).await.unwrap(), 143);
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "1\n4\n");
}
