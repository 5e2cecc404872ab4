//! The `credstream-agent` binary's command line: what `run` prints, what it
//! refuses, and how `exec` gives up. No broker runs here (the address is a
//! closed loopback port), so these are the behaviours before a snapshot.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::get;
use rustix::process::{Pid, Signal, kill_process};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(60);

fn agent(subcommand: &str) -> Command {
    let mut command = agent_without_broker(subcommand);
    command.args(["--broker", "http://127.0.0.1:1"]);
    command
}

fn agent_without_broker(subcommand: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_credstream-agent"));
    command
        .arg(subcommand)
        .args([
            "--cluster",
            "c1",
            "--agent-id",
            "worker-1",
            "--token",
            "agent-token",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_prints_the_address_and_exports_then_stops_on_sigterm() {
    let mut child = agent("run").spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(LIMIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("a line")
    };
    let first = next().await;
    let addr = first
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{first}"));
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0);

    let mut exports = Vec::new();
    for _ in 0..4 {
        exports.push(next().await);
    }
    assert_eq!(
        exports[0],
        format!("export AWS_CONTAINER_CREDENTIALS_FULL_URI='http://{addr}/aws/credentials'")
    );
    let token_file = exports[1]
        .strip_prefix("export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE='")
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("{}", exports[1]));
    assert!(std::path::Path::new(token_file).exists());
    assert_eq!(exports[2], format!("export GCE_METADATA_HOST='{addr}'"));
    assert_eq!(exports[3], format!("export GCE_METADATA_IP='{addr}'"));

    let ready = get(addr, "/readyz", &[]).await;
    assert_eq!(ready.status, 503);

    let pid = Pid::from_raw(child.id().unwrap() as i32).unwrap();
    kill_process(pid, Signal::TERM).unwrap();
    let status = tokio::time::timeout(LIMIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !std::path::Path::new(token_file).exists(),
        "the token file outlived the agent"
    );
}

async fn fails_with(mut command: Command, expected: &[&str]) {
    let output = tokio::time::timeout(LIMIT, command.output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for text in expected {
        assert!(stderr.contains(text), "{text:?} not in {stderr}");
    }
    assert!(!stderr.contains("agent-token"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_to_listen_beyond_loopback() {
    let mut command = agent("run");
    command.args(["--listen", "0.0.0.0:0"]);
    fails_with(command, &["loopback"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_a_plaintext_token_to_a_remote_broker() {
    // Through the environment, as every flag can be given.
    let mut command = agent_without_broker("run");
    command.env("CREDSTREAM_BROKER", "http://192.0.2.1:50051");
    fails_with(command, &["--insecure"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_gives_up_after_wait_timeout_saying_what_it_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let mut command = agent("exec");
    command
        .args(["--wait-timeout", "1s", "--", "touch"])
        .arg(&marker);
    fails_with(command, &["not starting the command", "1s", "snapshot"]).await;
    assert!(!marker.exists(), "the command started without credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_requires_a_command() {
    let mut command = agent("exec");
    command.arg("--");
    fails_with(command, &["required"]).await;
}
