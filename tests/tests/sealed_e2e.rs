//! Sealed delivery across a broker restart, with real processes: a real
//! `credstream-broker` (killed and started again on the same address, with
//! nothing kept), a real `credstream-agent run` holding the seal key, the
//! publish session sealing (the code `credstream publish` runs), and boto3
//! on the worker. The agent keeps serving through the outage, takes the
//! credential and env the publisher seals anew for the restarted broker
//! (newer sequences), and boto3 sees the new credential.

use std::path::Path;
use std::time::Duration;

use credstream_client::session::PublishSession;
use credstream_proto::seal::SealKey;
use credstream_proto::v1::CredentialKind;
use credstream_tests::bins::binary;
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{
    Process, clean_command, free_low_port, write_file, write_private_file,
};
use credstream_tests::publish::local_address;
use credstream_tests::sealed_agent::{AgentProcess, boto3_credentials};
use credstream_tests::tools;

fn token(key_file: &Path, role: &str) -> String {
    let out = std::process::Command::new(binary("credstream-broker"))
        .args(["token", "--token-key-file"])
        .arg(key_file)
        .args(["--role", role, "--cluster", "dev"])
        .output()
        .expect("credstream-broker token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn broker(port: u16, key_file: &Path) -> Process {
    let mut command = clean_command(binary("credstream-broker"));
    command
        .args(["--listen", &format!("127.0.0.1:{port}"), "--token-key-file"])
        .arg(key_file)
        .env("RUST_LOG", "info");
    let mut process = Process::spawn("credstream-broker", command);
    process.line(|l| l.starts_with("listening on ")).await;
    process
}

async fn served(agent: &mut AgentProcess) -> String {
    let (status, body) = agent.aws_credentials().await;
    assert_eq!(status, 200, "{body}");
    body["AccessKeyId"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn a_sealed_cluster_survives_a_broker_restart_and_boto3_follows_the_new_credential() {
    let test = "a_sealed_cluster_survives_a_broker_restart_and_boto3_follows_the_new_credential";
    let Some(python) = tools::python(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let token_key = dir.path().join("token.key");
    std::fs::write(&token_key, rand::random::<[u8; 32]>()).unwrap();
    let port = free_low_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = broker(port, &token_key).await;

    let key = SealKey::generate("dev");
    let key_file = write_private_file(dir.path(), "dev.seal-key", &key.encode());
    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let session =
        PublishSession::builder(local_address(&url, &token(&token_key, "publisher"), "dev"))
            .minter(minter.clone())
            .private_env([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "sealed-env")])
            .seal(key)
            .start()
            .unwrap();
    let token_file = write_file(dir.path(), "agent.token", &token(&token_key, "agent"));
    let mut agent =
        AgentProcess::spawn(&url, "dev", "w1", &token_file, Some(&key_file), dir.path());
    let env = agent.ready_env().await;
    assert_eq!(env["AUTH_TOKEN_FOR_CUSTOM_DATABASE"], "sealed-env");
    assert_eq!(boto3_credentials(&python, &env).await.0, "ASIAmint1");

    // The broker dies with everything it held; the agent keeps serving.
    first.signal("KILL");
    first.exit().await;
    assert_eq!(served(&mut agent).await, "ASIAmint1");

    // A new broker on the same address: the publisher reconnects, re-seals
    // the env and mints again (the broker asks for the missing credential);
    // the agent accepts both (newer sequences) and refuses nothing.
    let _second = broker(port, &token_key).await;
    minter.wait_for(2).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while served(&mut agent).await != "ASIAmint2" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent never served the credential minted after the restart\n{}",
            agent.process.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let env = agent.ready_env().await;
    assert_eq!(env["AUTH_TOKEN_FOR_CUSTOM_DATABASE"], "sealed-env");
    let (access_key, session_token) = boto3_credentials(&python, &env).await;
    assert_eq!(
        (access_key.as_str(), session_token.as_str()),
        ("ASIAmint2", "SESSIONTOKEN-mint2")
    );
    assert!(
        !agent.process.stderr().contains("refused an update"),
        "{}",
        agent.process.output()
    );
    session.shutdown().await.unwrap();
}
