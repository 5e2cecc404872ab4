//! The env file: written when ready, 0600, atomically replaced on change,
//! readable by real shells, removed at shutdown.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use credstream_agent::env_file::{self, EnvFile};
use credstream_agent::store::CredentialStore;
use credstream_proto::v1::CredentialKind;
use tokio::sync::{oneshot, watch};

const LIMIT: Duration = Duration::from_secs(30);

async fn wait_writes(writes: &mut watch::Receiver<u64>, at_least: u64) -> u64 {
    let n = tokio::time::timeout(LIMIT, writes.wait_for(|n| *n >= at_least))
        .await
        .expect("the env file was written in time")
        .expect("the writer is running");
    *n
}

/// Sources `file` with `shell` in an empty environment and returns the
/// value of each of `names`.
fn source_with(shell: &str, file: &Path, names: &[&str]) -> Vec<String> {
    let mut script = String::from("set -a; . \"$1\"; set +a");
    for name in names {
        script.push_str(&format!("; printf '%s\\0' \"${name}\""));
    }
    let output = std::process::Command::new(shell)
        .env_clear()
        .args(["-c", &script, shell])
        .arg(file)
        .output()
        .expect("run the shell");
    assert!(
        output.status.success(),
        "{shell}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut values: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .split('\0')
        .map(str::to_owned)
        .collect();
    values.pop();
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_file_appears_when_ready_is_private_and_follows_changes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credstream.env");
    std::fs::write(&path, "STALE='from an earlier run'\n").unwrap();
    let store = CredentialStore::new();
    let agent = start(store.clone(), true).await;
    let file = EnvFile::new(
        path.clone(),
        store.clone(),
        Arc::new(agent.endpoints.clone()),
    )
    .unwrap();
    let mut writes = file.writes();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(file.run(async {
        let _ = stopped.await;
    }));

    store.apply(info(&[CredentialKind::Aws, CredentialKind::Gcp], true, 1));
    store.apply(aws(2, "ASIAFIRST", Some(Duration::from_secs(3600))));
    store.apply(gcp(3, GCP_TOKEN, Some(Duration::from_secs(3600))));
    store.apply(env(4, &[("DB", "one")]));
    let first = wait_writes(&mut writes, 1).await;

    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let contents = std::fs::read_to_string(&path).unwrap();
    assert!(!contents.contains("STALE"), "{contents}");
    let names = [
        "DB",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "GCE_METADATA_HOST",
        "CLOUDSDK_AUTH_ACCESS_TOKEN",
        "AWS_DEFAULT_REGION",
    ];
    let expected = agent
        .endpoints
        .child_env(&store.current(), SystemTime::now());
    let expected: Vec<String> = names
        .iter()
        .map(|n| expected.get(n).unwrap().to_owned())
        .collect();
    assert_eq!(source_with("sh", &path, &names), expected);
    assert_eq!(expected[0], "one");

    // Same content at a new version: nothing to write. Then a real change.
    store.apply(env(5, &[("DB", "one")]));
    store.apply(env(6, &[("DB", "two")]));
    let second = wait_writes(&mut writes, first + 1).await;
    assert_eq!(second, first + 1);
    assert_eq!(source_with("sh", &path, &["DB"]), ["two"]);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, [std::ffi::OsString::from("credstream.env")]);

    stop.send(()).unwrap();
    tokio::time::timeout(LIMIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!path.exists(), "the env file outlived the agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_file_drops_a_token_when_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("credstream.env");
    let store = CredentialStore::new();
    // Ready on AWS alone; the GCP token is exported while it lives.
    store.apply(info(&[CredentialKind::Aws], false, 1));
    store.apply(aws(2, "ASIAFIRST", Some(Duration::from_secs(3600))));
    store.apply(gcp(3, GCP_TOKEN, Some(Duration::from_secs(2))));
    let agent = start(store.clone(), true).await;
    let file = EnvFile::new(
        path.clone(),
        store.clone(),
        Arc::new(agent.endpoints.clone()),
    )
    .unwrap();
    let mut writes = file.writes();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(file.run(async {
        let _ = stopped.await;
    }));

    wait_writes(&mut writes, 1).await;
    if std::fs::read_to_string(&path).unwrap().contains(GCP_TOKEN) {
        // No message arrives: the expiry alone causes the rewrite.
        wait_writes(&mut writes, 2).await;
    }
    assert!(!std::fs::read_to_string(&path).unwrap().contains(GCP_TOKEN));
}

#[test]
fn tricky_values_survive_sh_and_bash() {
    let values = [
        "it's",
        "''",
        "$HOME `id` $(id) ${X:-y}",
        "back\\slash\\",
        "two\nlines\n",
        "  padded  ",
        "\"double\" and 'single'",
        "#hash ;semicolon &amp",
        "ünïcödé",
        "",
    ];
    let names: Vec<String> = (0..values.len()).map(|i| format!("V{i}")).collect();
    let store = CredentialStore::new();
    let pairs: Vec<(&str, &str)> = names
        .iter()
        .map(String::as_str)
        .zip(values.iter().copied())
        .collect();
    store.apply(env(1, &pairs));
    let endpoints = credstream_agent::http::LocalEndpoints {
        addr: "127.0.0.1:1".parse().unwrap(),
        token: credstream_agent::http::AuthToken::generate(),
        token_file: None,
        gce_metadata: true,
    };
    let rendered = env_file::render(&endpoints.child_env(&store.current(), SystemTime::now()));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tricky.env");
    env_file::write_atomic(&path, rendered.as_bytes()).unwrap();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    for shell in ["sh", "dash", "bash"] {
        if std::process::Command::new(shell)
            .arg("-c")
            .arg("true")
            .status()
            .is_err()
        {
            assert!(
                std::env::var("CREDSTREAM_TEST_REQUIRE_TOOLS").as_deref() != Ok("1"),
                "{shell} is not installed, and CREDSTREAM_TEST_REQUIRE_TOOLS=1 says every tool must be present"
            );
            eprintln!("skipped: tricky_values_survive_sh_and_bash: {shell} not installed");
            continue;
        }
        assert_eq!(source_with(shell, &path, &names), values, "{shell}");
    }
}
