//! The broker token stays out of reach of the processes the agent serves:
//! the `exec` child, running as the same ordinary user, finds it neither in
//! `/proc/$PPID/environ`, nor in `/proc/$PPID/cmdline` or a file named there,
//! nor behind `/proc/$PPID/fd`, nor in `/proc/$PPID/mem`, whichever way the
//! token was given. A real broker and a raw publisher make the agent ready;
//! the checker (`scripts/token_checker.py`) is the attacker.
//!
//! Run as root, the test drops the agent to `nobody` with `setpriv` (a root
//! child could read any process's memory: that is not what is tested).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use credstream_broker::auth::{Role, TokenKey};
use credstream_broker::server::{self, BrokerConfig};
use credstream_proto::connect::CallCredentials;
use credstream_proto::convert::timestamp;
use credstream_proto::v1::publisher_service_client::PublisherServiceClient;
use credstream_proto::v1::{
    AwsCredential, CredentialKind, CredentialUpdate, PublishRequest, PublisherHello,
    credential_update, publish_request,
};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const LIMIT: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;
const CLUSTER: &str = "isolated";
const CHECKER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/scripts/token_checker.py"
);

/// The interpreter for the checker: the system's, which an ordinary user
/// can run (the project venv may live under root's home).
fn system_python() -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
}

/// Runs `program args` as an ordinary user: as is when the test is not root,
/// else through `setpriv` as nobody.
fn as_ordinary_user(program: &Path) -> Command {
    if rustix::process::geteuid().is_root() {
        let mut command = Command::new("setpriv");
        command
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .arg("--clear-groups")
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// A directory the ordinary user owns, for the token file and TMPDIR.
fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    }
    dir
}

fn needle(token: &str) -> String {
    token.bytes().map(|b| format!("{:02x}", b ^ 0x5a)).collect()
}

/// Runs `command` (whose stdout the checker's report goes to) and parses
/// the report.
async fn report_of(mut command: Command) -> serde_json::Value {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .expect("the checker did not finish")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{}\n{stdout}\n{stderr}",
        output.status
    );
    let line = stdout
        .lines()
        .find(|line| line.starts_with('{'))
        .unwrap_or_else(|| panic!("no report in {stdout:?}; stderr: {stderr}"));
    serde_json::from_str(line).unwrap()
}

fn found(report: &serde_json::Value) -> Vec<String> {
    report
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.as_str() == Some("found"))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Publishes a live AWS credential for `CLUSTER` and keeps the stream open
/// while the returned sender lives.
async fn publish(url: &str, token: &str) -> mpsc::Sender<PublishRequest> {
    let (tx, rx) = mpsc::channel(8);
    let message = |message| PublishRequest {
        message: Some(message),
    };
    tx.send(message(publish_request::Message::Hello(PublisherHello {
        cluster_id: CLUSTER.into(),
        kinds: vec![CredentialKind::Aws as i32],
        private_env: false,
        publisher_name: "isolation-test".into(),
        ..Default::default()
    })))
    .await
    .unwrap();
    let mut aws = AwsCredential::default();
    aws.access_key_id = "ASIAISOLATED".into();
    aws.secret_access_key = "isolated-secret".into();
    aws.session_token = "isolated-session".into();
    aws.region = "eu-west-1".into();
    let now = SystemTime::now();
    tx.send(message(publish_request::Message::Credential(
        CredentialUpdate {
            credential: Some(credential_update::Credential::Aws(aws)),
            issued_at: Some(timestamp(now)),
            expires_at: Some(timestamp(now + Duration::from_secs(3600))),
            ..Default::default()
        },
    )))
    .await
    .unwrap();
    let channel = tonic::transport::Channel::from_shared(url.to_owned())
        .unwrap()
        .connect_lazy();
    let credentials = CallCredentials::bearer(token).unwrap();
    let mut client = PublisherServiceClient::with_interceptor(channel, credentials);
    let mut responses = client
        .publish(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = responses.message().await {} });
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exec_child_cannot_take_the_broker_token_from_its_parent() {
    let Some(python) = system_python() else {
        return skip("needs a system python3 (/usr/bin/python3)");
    };
    if rustix::process::geteuid().is_root() && which("setpriv").is_none() {
        return skip("run as root, it needs setpriv (util-linux) to drop to nobody");
    }
    let key = TokenKey::generate();
    let broker = server::start(BrokerConfig::for_tests(key.clone()))
        .await
        .unwrap();
    let url = broker.url();
    let hour = Duration::from_secs(3600);
    let publisher_token = key.issue(Role::Publisher, Some(CLUSTER), hour).unwrap();
    let agent_token = key.issue(Role::Agent, Some(CLUSTER), hour).unwrap();
    let _publisher = publish(&url, &publisher_token).await;

    let dir = private_dir();
    // The checker and its directory must be readable by the ordinary user.
    let checker = dir.path().join("checker.py");
    std::fs::copy(CHECKER, &checker).unwrap();
    std::fs::set_permissions(&checker, std::fs::Permissions::from_mode(0o644)).unwrap();
    let token_file = dir.path().join("agent.token");
    std::fs::write(&token_file, &agent_token).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&token_file, Some(NOBODY), Some(NOBODY)).unwrap();
    }

    // Control: a parent that does hold the token in its environment (and so
    // in its memory) is caught by the checker, under the same user.
    let mut control = as_ordinary_user(&python);
    control
        .args([
            "-c",
            "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:], env={}))",
        ])
        .arg(&python)
        .arg(&checker)
        .arg(needle(&agent_token))
        .env_clear()
        .env("CREDSTREAM_TOKEN", &agent_token);
    let control = report_of(control).await;
    assert_eq!(found(&control), ["environ", "memory"], "{control}");

    let agent = PathBuf::from(env!("CARGO_BIN_EXE_credstream-agent"));
    type Give = fn(&mut Command, &str, &Path);
    let ways: [(&str, Give); 3] = [
        ("--token", |c, token, _| {
            c.args(["--token", token]);
        }),
        ("CREDSTREAM_TOKEN", |c, token, _| {
            c.env("CREDSTREAM_TOKEN", token);
        }),
        ("--token-file", |c, _, file| {
            c.arg("--token-file").arg(file);
        }),
    ];
    for (way, give) in ways {
        let mut command = as_ordinary_user(&agent);
        command
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("TMPDIR", dir.path())
            .env("HOME", dir.path())
            .args(["exec", "--broker", &url, "--cluster", CLUSTER])
            .args(["--agent-id", "isolation", "--wait-timeout", "30s"]);
        give(&mut command, &agent_token, &token_file);
        command
            .arg("--")
            .arg(&python)
            .arg(&checker)
            .arg(needle(&agent_token));
        let report = report_of(command).await;
        assert!(
            found(&report).is_empty(),
            "token given with {way}: {report}"
        );
        // Non-dumpable: the same user may not even open these.
        for probe in ["environ", "open descriptors", "memory"] {
            let outcome = report[probe].as_str().unwrap();
            assert!(
                outcome.starts_with("refused"),
                "token given with {way}: {probe}: {outcome}"
            );
        }
        // The agent's own arguments no longer name the token or its file.
        assert_eq!(report["cmdline"], "clean", "{way}: {report}");
        assert_eq!(report["files named in cmdline"], "clean", "{way}: {report}");
    }
}

/// Prints why the test is skipped, or fails under scripts/test.sh, which
/// sets CREDSTREAM_TEST_REQUIRE_TOOLS=1.
fn skip(why: &str) {
    let line = format!("skipped: token isolation: {why}");
    if std::env::var("CREDSTREAM_TEST_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{line}, and CREDSTREAM_TEST_REQUIRE_TOOLS=1 says every tool must be present");
    }
    eprintln!("{line}");
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|path| path.exists())
    })
}
