//! End to end on AWS (docs/design.md §7): the seed's own `read_object()` with
//! boto3, run on a "worker" that has no AWS credentials of its own, reads an
//! S3 object from moto with credentials that `credstream publish` minted
//! through moto's STS (`AssumeRole`) and `credstream-agent exec` served.
//!
//! Real peers only: moto (S3, STS and IAM, enforcing authentication after
//! seeding, so only credentials moto issued are accepted), the
//! `credstream-broker`, `credstream` and `credstream-agent` binaries, and
//! boto3. Without the project's Python venv the tests print `skipped:`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use credstream_proto::seal::{SealKey, open_credential};
use credstream_proto::v1::credential_update::Credential;
use credstream_proto::v1::{
    AgentAck, CredentialKind, RefreshHint, subscribe_request, subscribe_response,
};
use credstream_tests::bins::binary;
use credstream_tests::broker::{RawAgent, open_agent};
use credstream_tests::moto::{Moto, Seeded, laptop_env, seed, worker_env};
use credstream_tests::processes::{BrokerProcess, Process, clean_command, write_file};
use credstream_tests::sealed_agent::worker_seal_key;
use credstream_tests::tools;
use tokio::process::Command;
use tonic::transport::Channel;

const DB_TOKEN: &str = "custom-db-token-5d1e9c";

/// The seed's function, verbatim, and a main that prints what it read, the
/// private env variable, and which access key signed the request.
const READ_OBJECT_SCRIPT: &str = r#"import boto3
def read_object(bucket, key):
    s3 = boto3.client("s3")
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def _signing_key_recorder(seen):
    # Which access key signed each request (from the SigV4 header), without
    # touching how boto3 finds its credentials.
    def record(request, **kwargs):
        auth = request.headers.get("Authorization", b"")
        if isinstance(auth, bytes):
            auth = auth.decode()
        seen.append(auth.split("Credential=", 1)[1].split("/", 1)[0])
    return record


if __name__ == "__main__":
    import os, sys
    bucket, key = sys.argv[1], sys.argv[2]
    boto3.setup_default_session()
    seen = []
    boto3.DEFAULT_SESSION.events.register("before-send.s3.GetObject", _signing_key_recorder(seen))
    print("AUTH_TOKEN_FOR_CUSTOM_DATABASE=" + repr(os.environ.get("AUTH_TOKEN_FOR_CUSTOM_DATABASE")), flush=True)
    if len(sys.argv) > 3 and sys.argv[3] == "--loop":
        # Long-running: one read per line on stdin; a line "probe N" asks
        # the agent's endpoint directly and prints its HTTP status.
        for line in sys.stdin:
            if line.startswith("probe"):
                import urllib.error, urllib.request
                request = urllib.request.Request(
                    os.environ["AWS_CONTAINER_CREDENTIALS_FULL_URI"],
                    headers={"Authorization": os.environ["AWS_CONTAINER_AUTHORIZATION_TOKEN"]},
                )
                try:
                    status = urllib.request.urlopen(request, timeout=5).status
                except urllib.error.HTTPError as error:
                    status = error.code
                print(f"{line.strip()}: {status}", flush=True)
                continue
            try:
                body = read_object(bucket, key).decode()
                print(f"read {line.strip()}: {body} signed by {seen[-1]}", flush=True)
            except Exception as error:
                print(f"failed {line.strip()}: {type(error).__name__}: {error}", flush=True)
    else:
        body = read_object(bucket, key).decode()
        print(f"read: {body} signed by {seen[-1]}", flush=True)
"#;

struct World {
    _python: PathBuf,
    moto: Moto,
    seeded: Seeded,
    broker: BrokerProcess,
    dir: tempfile::TempDir,
    script: PathBuf,
    laptop: Vec<(String, String)>,
    worker: Vec<(String, String)>,
    /// The cluster's seal key as the worker got it (`credstream seal-key`).
    seal_key_file: PathBuf,
    seal_key: SealKey,
}

/// moto seeded and enforcing auth, a broker, the script, and the laptop's
/// and the worker's environments.
async fn world(python: &Path) -> World {
    let moto = Moto::start(python).await;
    let seeded = seed(python, &moto).await;
    moto.require_auth().await;
    let broker = BrokerProcess::start_dev().await;
    let dir = tempfile::tempdir().unwrap();
    let script = write_file(dir.path(), "read_object.py", READ_OBJECT_SCRIPT);
    let laptop_home = dir.path().join("laptop");
    let worker_home = dir.path().join("worker");
    std::fs::create_dir_all(&laptop_home).unwrap();
    std::fs::create_dir_all(&worker_home).unwrap();
    let laptop = laptop_env(&moto, &seeded, &laptop_home);
    let worker = worker_env(&moto, &worker_home);
    // Sealing is on by default: the laptop's key, handed to the worker out
    // of band (`publish` uses the same key file, created here first).
    let (seal_key_file, seal_key) = worker_seal_key(&laptop, "dev", dir.path()).await;
    World {
        _python: python.to_owned(),
        moto,
        seeded,
        broker,
        dir,
        script,
        laptop,
        worker,
        seal_key_file,
        seal_key,
    }
}

impl World {
    /// `credstream publish` of the role's credentials (15 minutes, the STS
    /// minimum) and the private env, from the laptop.
    fn publish(&self) -> Process {
        self.publish_with("15m", &[])
    }

    /// `credstream publish` of the role's credentials for `duration`, with
    /// `extra` flags.
    fn publish_with(&self, duration: &str, extra: &[&str]) -> Process {
        let env_arg = format!("AUTH_TOKEN_FOR_CUSTOM_DATABASE={DB_TOKEN}");
        let mut command = clean_command(binary("credstream"));
        command
            .envs(self.laptop.iter().map(|(k, v)| (k, v)))
            .env("CREDSTREAM_TOKEN", &self.broker.publisher_token)
            .args(["publish", "--broker", &self.broker.url, "--cluster", "dev"])
            .args(["--no-gcp", "--aws-role-arn", &self.seeded.role_arn])
            .args(["--aws-duration", duration, "--env", &env_arg])
            .args(extra);
        Process::spawn("credstream publish", command)
    }

    /// `credstream-agent exec ... -- python read_object.py BUCKET KEY [ARGS]`
    /// in the worker's environment.
    fn exec(&self, python: &Path, args: &[&str]) -> Process {
        self.exec_under(&[], python, args)
    }

    /// [`World::exec`] with the script run under `wrapper` (a command and
    /// its arguments that run the rest, such as `env VAR=VALUE`).
    fn exec_under(&self, wrapper: &[&OsStr], python: &Path, args: &[&str]) -> Process {
        let token_file = write_file(self.dir.path(), "agent.token", &self.broker.agent_token);
        let mut command = worker_command(binary("credstream-agent"), &self.worker);
        command
            .args(["exec", "--broker", &self.broker.url, "--cluster", "dev"])
            .args(["--agent-id", "worker-1", "--wait-timeout", "60s"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--seal-key-file")
            .arg(&self.seal_key_file)
            .arg("--")
            .args(wrapper)
            .arg(python)
            .arg(&self.script)
            .args([&self.seeded.bucket, &self.seeded.key])
            .args(args);
        Process::spawn("credstream-agent exec", command)
    }
}

fn worker_command(program: PathBuf, worker: &[(String, String)]) -> Command {
    let mut command = clean_command(program);
    command.envs(worker.iter().map(|(k, v)| (k, v)));
    command
}

/// Access key ids of the credentials moto's `AssumeRole` issued.
async fn assumed_role_keys(moto: &Moto) -> Vec<String> {
    let data = moto.data().await;
    let mut keys = Vec::new();
    collect_strings(&data["sts"], "access_key_id", &mut keys);
    keys
}

fn collect_strings(value: &serde_json::Value, field: &str, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (name, inner) in map {
                match inner {
                    serde_json::Value::String(text) if name == field => out.push(text.clone()),
                    other => collect_strings(other, field, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                collect_strings(item, field, out);
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn read_object_on_a_worker_uses_credentials_minted_through_moto_sts() {
    let test = "read_object_on_a_worker_uses_credentials_minted_through_moto_sts";
    let Some(python) = tools::python(test) else {
        return;
    };
    let world = world(&python).await;

    // The worker alone has no credentials: the same script fails there.
    let mut alone = worker_command(python.clone(), &world.worker);
    alone
        .arg(&world.script)
        .args([&world.seeded.bucket, &world.seeded.key]);
    let mut alone = Process::spawn("python without the agent", alone);
    assert!(!alone.exit().await.success(), "{}", alone.output());
    assert!(
        alone.stderr().contains("NoCredentialsError"),
        "{}",
        alone.output()
    );

    // moto enforces authentication: keys it did not issue are refused.
    let mut forged = worker_command(python.clone(), &world.worker);
    forged
        .env("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
        .env(
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        )
        .arg(&world.script)
        .args([&world.seeded.bucket, &world.seeded.key]);
    let mut forged = Process::spawn("python with keys moto did not issue", forged);
    assert!(!forged.exit().await.success(), "{}", forged.output());
    assert!(
        forged.stderr().contains("InvalidAccessKeyId"),
        "{}",
        forged.output()
    );

    let mut publish = world.publish();
    let minted = publish.line(|l| l.starts_with("minted AWS")).await;
    assert!(
        minted.starts_with("minted AWS for arn:aws:sts::123456789012:assumed-role/cluster-reader/credstream-dev, valid until "),
        "{minted}"
    );

    let mut worker = world.exec(&python, &[]);
    let read = worker.line(|l| l.starts_with("read: ")).await;
    let expected = format!("read: {} signed by ", world.seeded.body);
    assert!(read.starts_with(&expected), "{read}");
    let key_id = read.trim_start_matches(&expected);
    assert!(
        key_id.starts_with("ASIA"),
        "temporary credentials: {key_id}"
    );
    assert!(
        assumed_role_keys(&world.moto)
            .await
            .iter()
            .any(|k| k == key_id),
        "the worker signed with {key_id}, which moto's AssumeRole did not issue"
    );
    assert!(
        worker
            .stdout()
            .contains(&format!("AUTH_TOKEN_FOR_CUSTOM_DATABASE='{DB_TOKEN}'")),
        "{}",
        worker.output()
    );
    let exit = worker.exit().await;
    assert!(exit.success(), "{}", worker.output());

    publish.signal("TERM");
    assert!(publish.exit().await.success(), "{}", publish.output());
}

/// Sends an ack for `version` from a raw agent.
async fn ack(agent: &RawAgent, version: u64) {
    agent
        .send(subscribe_request::Message::Ack(AgentAck { version }))
        .await;
}

/// The AWS credential's (version, access key id) in a message, if any,
/// opened with the cluster's seal key as an agent does.
fn aws_in(message: &subscribe_response::Message, key: &SealKey) -> Option<(u64, String)> {
    let credentials: Vec<_> = match message {
        subscribe_response::Message::Snapshot(snapshot) => snapshot.credentials.iter().collect(),
        subscribe_response::Message::Credential(update) => vec![update],
        _ => vec![],
    };
    credentials.into_iter().find_map(|update| {
        let opened = open_credential(key, update).expect("a sealed credential that opens");
        match &opened.update.credential {
            Some(Credential::Aws(aws)) => Some((update.version, aws.access_key_id.clone())),
            _ => None,
        }
    })
}

/// Reads a raw agent's stream (acknowledging everything) until it carries
/// an AWS credential; returns its version and access key id.
async fn next_aws(agent: &mut RawAgent, key: &SealKey) -> (u64, String) {
    loop {
        let message = agent.expect().await;
        let version = match &message {
            subscribe_response::Message::Snapshot(s) => s.version,
            subscribe_response::Message::Credential(c) => c.version,
            subscribe_response::Message::PrivateEnv(e) => e.version,
            subscribe_response::Message::Revocation(r) => r.version,
            subscribe_response::Message::ClusterInfo(i) => i.version,
            subscribe_response::Message::TokenRenewal(_) => continue,
        };
        ack(agent, version).await;
        if let Some(found) = aws_in(&message, key) {
            return found;
        }
    }
}

fn delivered_to_all(line: &str, at_least: u64, agents: u32) -> bool {
    let Some(rest) = line.strip_prefix("delivered version ") else {
        return false;
    };
    let mut words = rest.split_whitespace();
    let version: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    version >= at_least && rest.ends_with(&format!(" to {agents}/{agents} agents"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn a_long_running_boto3_process_keeps_reading_across_a_rotation() {
    let test = "a_long_running_boto3_process_keeps_reading_across_a_rotation";
    let Some(python) = tools::python(test) else {
        return;
    };
    let world = world(&python).await;
    let mut publish = world.publish();
    publish.line(|l| l.starts_with("minted AWS")).await;

    let mut worker = world.exec(&python, &["--loop"]);
    worker
        .line(|l| l.starts_with("AUTH_TOKEN_FOR_CUSTOM_DATABASE="))
        .await;
    worker.send_line("1").await;
    let first = worker
        .line(|l| l.starts_with("read 1:") || l.starts_with("failed 1:"))
        .await;
    let prefix = format!("read 1: {} signed by ", world.seeded.body);
    assert!(first.starts_with(&prefix), "{first}");
    let first_key = first.trim_start_matches(&prefix).to_owned();

    // A second agent (a raw subscriber) holds the same credential and asks
    // for a fresh one: the broker asks the publisher, which mints again
    // through moto's STS and publishes to every agent.
    let channel = Channel::from_shared(world.broker.url.clone())
        .unwrap()
        .connect_lazy();
    let mut probe = open_agent(channel, &world.broker.agent_token, "dev", "probe")
        .await
        .expect("subscribe");
    let (held_version, held_key) = next_aws(&mut probe, &world.seal_key).await;
    assert_eq!(held_key, first_key, "both agents hold the same credential");
    probe
        .send(subscribe_request::Message::RefreshHint(RefreshHint {
            kind: CredentialKind::Aws as i32,
            held_version,
        }))
        .await;
    publish
        .line(|l| l == "refresh requested: AWS (an agent asked)")
        .await;
    publish.nth_line(2, |l| l.starts_with("minted AWS")).await;
    let (new_version, new_key) = next_aws(&mut probe, &world.seal_key).await;
    assert!(new_version > held_version);
    assert_ne!(new_key, first_key, "a new credential");
    // Both agents (the worker's and the probe) applied it.
    publish.line(|l| delivered_to_all(l, new_version, 2)).await;

    // The same boto3 process, still running, now signs with the new key
    // (its 15-minute credentials are inside boto3's refresh window, so it
    // asks the agent again) and moto accepts it.
    worker.send_line("2").await;
    let second = worker
        .line(|l| l.starts_with("read 2:") || l.starts_with("failed 2:"))
        .await;
    assert_eq!(
        second,
        format!("read 2: {} signed by {new_key}", world.seeded.body)
    );
    assert!(assumed_role_keys(&world.moto).await.contains(&new_key));

    worker.close_stdin();
    assert!(worker.exit().await.success(), "{}", worker.output());
    publish.signal("TERM");
    assert!(publish.exit().await.success(), "{}", publish.output());
}

/// Revocation reaches a boto3 client that cached the credential, within
/// the bound the agent's advertised expiry sets (agent/src/http/advertised.rs):
/// the worker's default session, untouched, keeps the hour-long credential
/// it fetched; after `--revoke-on-exit`, the agent refuses it at once, and
/// boto3 stops signing with it when its own refresh window says so. The
/// worker process's clock is moved forward with libfaketime instead of
/// waiting the minutes (the agent and moto keep real time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(all(tool_python, tool_libfaketime)),
    ignore = "needs the project's Python venv and libfaketime: set CREDSTREAM_TEST_PYTHON and CREDSTREAM_TEST_LIBFAKETIME (scripts/test.sh does)"
)]
async fn a_cached_boto3_client_stops_using_a_revoked_credential_within_the_advertised_bound() {
    let test = "a_cached_boto3_client_stops_using_a_revoked_credential_within_the_advertised_bound";
    let (Some(python), Some(libfaketime)) = (tools::python(test), tools::libfaketime(test)) else {
        return;
    };
    let world = world(&python).await;
    let mut publish = world.publish_with("1h", &["--revoke-on-exit"]);
    publish.line(|l| l.starts_with("minted AWS")).await;

    // libfaketime re-reads the offset file on every clock read.
    let clock = write_file(world.dir.path(), "worker-clock", "+0");
    let preload = format!("LD_PRELOAD={}", libfaketime.display());
    let clock_file = format!("FAKETIME_TIMESTAMP_FILE={}", clock.display());
    let wrapper = [
        OsStr::new("env"),
        OsStr::new(&preload),
        OsStr::new(&clock_file),
        OsStr::new("FAKETIME_NO_CACHE=1"),
    ];
    let mut worker = world.exec_under(&wrapper, &python, &["--loop"]);
    worker
        .line(|l| l.starts_with("AUTH_TOKEN_FOR_CUSTOM_DATABASE="))
        .await;
    let first = read(&mut worker, "1").await;
    let prefix = format!("read 1: {} signed by ", world.seeded.body);
    assert!(first.starts_with(&prefix), "{first}");
    let key = first.trim_start_matches(&prefix).to_owned();

    publish.signal("INT");
    publish
        .line(|l| l.starts_with("revoked everything published to cluster dev"))
        .await;
    // The agent refuses the credential from now on.
    for n in 1.. {
        let label = format!("probe {n}");
        worker.send_line(&label).await;
        let answer = worker.line(|l| l.starts_with(&format!("{label}:"))).await;
        if answer == format!("{label}: 503") {
            break;
        }
        assert_eq!(
            answer,
            format!("{label}: 200"),
            "the agent answered neither"
        );
        assert!(n < 600, "the agent still serves a revoked credential");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // 3 minutes on, 13 of the advertised 16 remain: inside boto3's advisory
    // window, its fetch fails and it keeps the credential it holds. This is
    // the bound at work, not a leak beyond it.
    std::fs::write(&clock, "+180").unwrap();
    let within = read(&mut worker, "2").await;
    assert_eq!(
        within,
        format!("read 2: {} signed by {key}", world.seeded.body)
    );

    // 7 minutes on, 9 remain: inside boto3's mandatory window the failed
    // fetch is raised, and the revoked key signs nothing more. Without the
    // advertised bound, boto3 would hold the real expiry (an hour) and read.
    std::fs::write(&clock, "+420").unwrap();
    let after = read(&mut worker, "3").await;
    assert!(after.starts_with("failed 3: "), "{after}");
    assert!(
        after.contains("503"),
        "the agent's refusal reaches the user: {after}"
    );
}

/// Asks the `--loop` script for a read labelled `label`; its answer line.
async fn read(worker: &mut Process, label: &str) -> String {
    worker.send_line(label).await;
    let read = format!("read {label}:");
    let failed = format!("failed {label}:");
    worker
        .line(|l| l.starts_with(&read) || l.starts_with(&failed))
        .await
}
