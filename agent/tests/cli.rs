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
/// How long a request may wait while idle connections are held: longer than
/// anything a working agent needs, shorter than a starved one waits (a slot
/// used to free only when a 10 s header timeout fired, and reconnecting
/// idle clients took the freed slots first).
const WAIT: Duration = Duration::from_secs(20);

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

/// `run`'s address and AWS token file, from its first lines.
async fn banner(child: &mut tokio::process::Child) -> (std::net::SocketAddr, String) {
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
        .unwrap()
        .parse()
        .unwrap();
    let _uri = next().await;
    let file = next().await;
    let file = file
        .strip_prefix("export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE='")
        .and_then(|rest| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("{file}"));
    (addr, std::fs::read_to_string(file).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_starve_a_request() {
    const IDLE: usize = 1_000;
    let mut child = agent("run").spawn().unwrap();
    let (addr, token) = banner(&mut child).await;

    // An attacker holds IDLE connections that never send a byte and opens
    // a new one whenever the agent closes one.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (opened_tx, mut opened) = tokio::sync::mpsc::channel::<()>(IDLE);
    let mut holders = Vec::new();
    for _ in 0..IDLE {
        let mut stopped = stopped.clone();
        let opened = opened_tx.clone();
        holders.push(tokio::spawn(async move {
            let mut first = true;
            while !*stopped.borrow() {
                let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                    // Pace retries; the agent may be gone.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if std::mem::take(&mut first) {
                    let _ = opened.send(()).await;
                }
                let mut byte = [0u8; 1];
                tokio::select! {
                    _ = tokio::io::AsyncReadExt::read(&mut stream, &mut byte) => {}
                    _ = stopped.changed() => break,
                }
            }
        }));
    }
    for _ in 0..IDLE {
        tokio::time::timeout(LIMIT, opened.recv())
            .await
            .expect("the agent did not take the idle connections");
    }

    let started = std::time::Instant::now();
    let ready = tokio::time::timeout(WAIT, get_as_sdks_do(addr, "/readyz", None))
        .await
        .expect("/readyz was not answered while idle connections were held");
    let ready_latency = started.elapsed();
    assert_eq!(ready.status, 503, "{ready:?}");
    let started = std::time::Instant::now();
    let aws = tokio::time::timeout(WAIT, get_as_sdks_do(addr, "/aws/credentials", Some(&token)))
        .await
        .expect("/aws/credentials was not answered while idle connections were held");
    let aws_latency = started.elapsed();
    assert_eq!(aws.status, 503, "{aws:?}");
    assert_eq!(aws.json()["code"], "aws_credential_unavailable");
    eprintln!(
        "with {IDLE} idle connections held: /readyz answered in {ready_latency:?}, \
         /aws/credentials in {aws_latency:?}"
    );
    stop.send_replace(true);
    for holder in holders {
        holder.await.unwrap();
    }
}

/// A GET that, like boto3 (3 attempts, docs/facts.md fact 4), tries again
/// on a new connection when one is closed before an answer: with the
/// connection cap full of idle attackers, a fresh connection can be the one
/// closed to make room before its request arrives. The answer must still
/// come, and promptly.
async fn get_as_sdks_do(
    addr: std::net::SocketAddr,
    path: &'static str,
    token: Option<&str>,
) -> common::Reply {
    let token = token.map(str::to_owned);
    for attempt in 1..=3 {
        let token = token.clone();
        let answer = tokio::spawn(async move {
            match &token {
                Some(token) => get(addr, path, &[("Authorization", token)]).await,
                None => get(addr, path, &[]).await,
            }
        })
        .await;
        match answer {
            Ok(reply) => return reply,
            Err(_) if attempt < 3 => continue,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }
    unreachable!("the third attempt returns or panics")
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_token_file_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.token");
    std::fs::write(&file, " \n").unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_credstream-agent"));
    command
        .args(["run", "--broker", "http://127.0.0.1:1", "--cluster", "c1"])
        .args(["--agent-id", "worker-1", "--token-file"])
        .arg(&file)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    fails_with(
        command,
        &["the token is empty; give the agent token with --join-file, --join-fd, CREDSTREAM_JOIN, --token-file, --token-fd or --token"],
    )
    .await;
}

/// Finding 11 (issue 34): the agent applies the publisher's rule to its
/// seal key file. A key file other users can read (or a link to one) is
/// refused before anything listens, naming the file and `chmod 600`; the
/// same file at 0600, reached through the link, is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_key_file_other_users_can_read_is_refused_before_anything_is_served() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("c1.seal-key");
    let key_line = credstream_proto::seal::SealKey::generate("c1").encode();
    std::fs::write(&key, format!("{}\n", key_line.as_str())).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let link = dir.path().join("seal-key-link");
    std::os::unix::fs::symlink(&key, &link).unwrap();
    let target = std::fs::canonicalize(&key).unwrap();

    for given in [&key, &link] {
        let mut command = agent("run");
        command.arg("--seal-key-file").arg(given);
        let output = tokio::time::timeout(LIMIT, command.output())
            .await
            .unwrap()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("seal key file {}", given.display()))
                && stderr.contains(&format!("run `chmod 600 {}`", target.display()))
                && stderr.contains("mode 644"),
            "{stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "served before refusing the key: {}",
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(!stderr.contains(key_line.split(':').next_back().unwrap()));
    }

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = agent("run");
    command.arg("--seal-key-file").arg(&link);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("the banner");
    assert!(first.starts_with("listening on "), "{first}");
}

/// Finding 6 (issue 34): `--state-file` keeps sealed sequences, so it needs
/// a seal key; and it is created 0600 at start, before anything is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_needs_a_seal_key_and_is_created_private_at_start() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("w1.state");
    let mut command = agent("run");
    command.arg("--state-file").arg(&state);
    fails_with(command, &["--state-file", "--seal-key-file"]).await;
    assert!(!state.exists());

    let key = dir.path().join("c1.seal-key");
    let key_line = credstream_proto::seal::SealKey::generate("c1").encode();
    std::fs::write(&key, format!("{}\n", key_line.as_str())).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut command = agent("run");
    command
        .arg("--seal-key-file")
        .arg(&key)
        .arg("--state-file")
        .arg(&state);
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(LIMIT, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .expect("the banner");
    assert!(first.starts_with("listening on "), "{first}");
    let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains(r#""cluster":"c1""#), "{text}");
}

/// A join string for a closed loopback port with the token `join-token-…`.
fn join_string() -> String {
    use credstream_proto::join::{JoinString, SpkiPin};
    JoinString::new(
        "127.0.0.1:1".into(),
        "join-token-4f1c9e",
        vec![SpkiPin([7; 32])],
    )
    .unwrap()
    .encode()
    .as_str()
    .to_owned()
}

/// `credstream-agent run` given no broker and no token.
fn agent_for_join() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_credstream-agent"));
    command
        .args(["run", "--cluster", "c1", "--agent-id", "worker-1"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// The running agent's command line and environment hold no token and no
/// join string; its command line names the descriptor it read (and
/// closed) instead of `way`.
fn assert_join_handed_over(pid: u32, way: &str) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("--join-fd"), "{way}: {cmdline}");
    assert!(
        !cmdline.contains("csj1.") && !cmdline.contains("--join-file"),
        "{way}: {cmdline}"
    );
    // Readable only with CAP_SYS_PTRACE (root): the agent is non-dumpable.
    if let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) {
        let environ = String::from_utf8_lossy(&environ);
        assert!(!environ.contains("CREDSTREAM_JOIN"), "{way}: {environ}");
    }
    // The descriptor it read is closed: none of its descriptors leads to
    // the string (a memory file or the join file).
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let target = std::fs::read_link(entry.unwrap().path()).unwrap_or_default();
        let target = target.to_string_lossy();
        assert!(
            !target.contains("memfd:") && !target.ends_with("agent.join"),
            "{way}: a descriptor still leads to the join string: {target}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_string_from_credstream_join_or_a_descriptor_is_read_then_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let join_file = dir.path().join("agent.join");
    std::fs::write(&join_file, join_string()).unwrap();
    // CREDSTREAM_JOIN: re-executed with the string on a descriptor.
    let mut from_env = agent_for_join();
    from_env.env("CREDSTREAM_JOIN", join_string());
    // --join-fd given by the caller: read and closed, no re-execution.
    let mut from_fd = Command::new("sh");
    from_fd
        .arg("-c")
        .arg(format!(
            "exec \"$0\" run --cluster c1 --agent-id worker-1 --join-fd 3 3<'{}'",
            join_file.display()
        ))
        .arg(env!("CARGO_BIN_EXE_credstream-agent"))
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (way, mut command) in [("CREDSTREAM_JOIN", from_env), ("--join-fd", from_fd)] {
        let mut child = command.spawn().unwrap();
        let _ = banner(&mut child).await;
        assert_join_handed_over(child.id().unwrap(), way);
        child.start_kill().unwrap();
        let output = child.wait_with_output().await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("join-token-4f1c9e"), "{way}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_conflicting_join_string_is_refused_without_quoting_it() {
    let mut bad = agent_for_join();
    bad.env("CREDSTREAM_JOIN", "join-token-4f1c9e");
    fails_with(bad, &["CREDSTREAM_JOIN is not usable", "csj1."]).await;
    let mut both = agent_for_join();
    both.env("CREDSTREAM_JOIN", join_string())
        .args(["--broker", "http://127.0.0.1:1"]);
    fails_with(both, &["CREDSTREAM_JOIN gives the broker", "--broker"]).await;
    let mut closed = agent_for_join();
    closed.args(["--join-fd", "97"]);
    fails_with(closed, &["cannot read the join string from descriptor 97"]).await;
}
