//! The scaled-down fault suite (issue 13): the broker process is
//! SIGKILLed while 50 `credstream-agent run` processes serve credentials to
//! fetch loops. Not one fetch fails — through the outage the agents keep
//! serving what they hold — and the restarted broker costs exactly one
//! mint, which every agent converges on.
//!
//! Real processes: the broker binary (killed and restarted on the same
//! port with the same token key) and 50 agent binaries; the fetch loops
//! speak HTTP/1.1 to each agent's `/aws/credentials` with its local token,
//! as botocore does. The publisher is the client library's session with a
//! counting minter, so that mints are counted exactly.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use credstream_broker::auth::{Role, TokenKey};
use credstream_client::session::PublishSession;
use credstream_proto::v1::CredentialKind;
use credstream_tests::bins::binary;
use credstream_tests::http1;
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{PROCESS_WAIT, Process, clean_command};
use credstream_tests::publish::local_address;

const AGENTS: usize = 50;
const FETCH_LOOPS: usize = 10;
const CLUSTER: &str = "faults";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_broker(port: u16, key_file: &Path) -> Process {
    let mut command = clean_command(binary("credstream-broker"));
    command
        .args(["--listen", &format!("127.0.0.1:{port}"), "--token-key-file"])
        .arg(key_file)
        .env("RUST_LOG", "warn");
    let mut broker = Process::spawn("credstream-broker", command);
    broker.line(|l| l.starts_with("listening on ")).await;
    broker
}

/// One agent as a fetch loop sees it: where it listens and its local token.
#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    token: String,
}

/// `GET /aws/credentials` as the AWS SDKs' container provider does it:
/// status and body.
async fn fetch(endpoint: &Endpoint) -> std::io::Result<(u16, String)> {
    http1::request(
        &endpoint.addr.to_string(),
        "GET",
        "/aws/credentials",
        &[("Authorization", &endpoint.token)],
        "",
    )
    .await
}

/// The access key id an agent serves now, if it serves one.
async fn serving(endpoint: &Endpoint) -> Option<String> {
    let (status, body) = fetch(endpoint).await.ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["AccessKeyId"].as_str().map(str::to_owned)
}

async fn until_all_serve(endpoints: &[Endpoint], key_id: &str) {
    let deadline = tokio::time::Instant::now() + PROCESS_WAIT;
    for endpoint in endpoints {
        while serving(endpoint).await.as_deref() != Some(key_id) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {} never served {key_id}",
                endpoint.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_sigkill_under_fifty_agents_and_fetch_loops_loses_no_fetch_and_mints_once() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, rand::random::<[u8; 32]>()).unwrap();
    let key = TokenKey::from_file(&key_file).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let broker = start_broker(port, &key_file).await;

    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let session = PublishSession::builder(local_address(
        &url,
        &key.issue(Role::Publisher, Some(CLUSTER), Duration::from_secs(3600))
            .unwrap(),
        CLUSTER,
    ))
    .minter(minter.clone())
    .start()
    .unwrap();

    let token_file = dir.path().join("agent.token");
    let agent_token = key
        .issue(Role::Agent, Some(CLUSTER), Duration::from_secs(3600))
        .unwrap();
    std::fs::write(&token_file, &agent_token).unwrap();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let mut command = clean_command(binary("credstream-agent"));
        command
            .args(["run", "--broker", &url, "--cluster", CLUSTER])
            .args(["--agent-id", &format!("worker-{i}"), "--no-gce-metadata"])
            .arg("--token-file")
            .arg(&token_file)
            .env("RUST_LOG", "warn");
        agents.push(Process::spawn(&format!("agent {i}"), command));
    }
    let mut endpoints = Vec::new();
    for agent in &mut agents {
        let listening = agent.line(|l| l.starts_with("listening on ")).await;
        let addr: SocketAddr = listening
            .trim_start_matches("listening on ")
            .parse()
            .expect("an address");
        let file = agent
            .line(|l| l.starts_with("export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE="))
            .await;
        let path = file
            .split_once('=')
            .unwrap()
            .1
            .trim_matches('\'')
            .to_owned();
        let token = std::fs::read_to_string(&path).expect("the agent's token file");
        endpoints.push(Endpoint {
            addr,
            token: token.trim().to_owned(),
        });
    }
    until_all_serve(&endpoints, "ASIAmint1").await;
    assert_eq!(minter.count(), 1);

    // Fetch loops, round robin over every agent, from now to the end.
    let tally = Arc::new(Tally::default());
    let running = Arc::new(AtomicBool::new(true));
    let mut loops = Vec::new();
    for n in 0..FETCH_LOOPS {
        let endpoints = endpoints.clone();
        let tally = tally.clone();
        let running = running.clone();
        loops.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            let mut i = n;
            while running.load(Ordering::Relaxed) {
                pace.tick().await;
                let endpoint = &endpoints[i % endpoints.len()];
                i += 1;
                let answer = fetch(endpoint).await;
                let key_id = answer.as_ref().ok().and_then(|(status, body)| {
                    let json: serde_json::Value = serde_json::from_str(body).ok()?;
                    (*status == 200).then(|| json["AccessKeyId"].as_str().map(str::to_owned))?
                });
                match key_id {
                    Some(id) if id.starts_with("ASIAmint") => {
                        tally.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        eprintln!("fetch from {} failed: {answer:?}", endpoint.addr);
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let fetched = |n: u64| {
        let tally = tally.clone();
        async move {
            let deadline = tokio::time::Instant::now() + PROCESS_WAIT;
            let start = tally.ok.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed);
            while tally.ok.load(Ordering::Relaxed) + tally.failed.load(Ordering::Relaxed)
                < start + n
            {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "fetch loops stalled"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    fetched(200).await;

    // SIGKILL: no goodbye to anyone. The outage lasts while every agent is
    // fetched from several times.
    drop(broker);
    fetched(4 * AGENTS as u64).await;
    let _broker = start_broker(port, &key_file).await;
    // The publisher reconnects, is asked for what the new broker lacks, and
    // every agent converges on that one re-mint.
    until_all_serve(&endpoints, "ASIAmint2").await;
    fetched(200).await;
    running.store(false, Ordering::Relaxed);
    for task in loops {
        task.await.unwrap();
    }
    let (ok, failed) = (
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    eprintln!("{ok} fetches from {AGENTS} agents, {failed} failed");
    assert_eq!(failed, 0, "{ok} fetches succeeded");
    assert!(ok >= 400 + 4 * AGENTS as u64);
    assert_eq!(minter.count(), 2, "one mint for the restart");
    for agent in &mut agents {
        assert!(!agent.has_exited(), "{}", agent.output());
    }
    session.shutdown().await.unwrap();
}
