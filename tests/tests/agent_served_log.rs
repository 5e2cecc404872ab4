//! The agent's half of the audit trail (issue 17, item 1): a real
//! `credstream-agent run` logs, per version, how many local requests it
//! served, when that version retires (a newer one replaced it) and when
//! the agent stops; never what it served.

use std::time::Duration;

use credstream_proto::v1::{CredentialKind, RefreshHint, subscribe_request};
use credstream_tests::broker::open_agent;
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{BrokerProcess, write_file};
use credstream_tests::publish::start_publisher;
use credstream_tests::sealed_agent::AgentProcess;
use tonic::transport::Channel;

async fn served(agent: &mut AgentProcess) -> String {
    let (status, body) = agent.aws_credentials().await;
    assert_eq!(status, 200, "{body}");
    body["AccessKeyId"].as_str().unwrap_or_default().to_owned()
}

fn version_in(line: &str) -> u64 {
    line.split("aws version ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no version in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_logs_how_many_requests_each_version_served() {
    let broker = BrokerProcess::start_dev().await;
    let dir = tempfile::tempdir().unwrap();
    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let session = start_publisher(&broker.url, &broker.publisher_token, "dev", minter.clone());
    let token_file = write_file(dir.path(), "agent.token", &broker.agent_token);
    let mut agent = AgentProcess::spawn(&broker.url, "dev", "w1", &token_file, None, dir.path());
    for _ in 0..3 {
        assert_eq!(served(&mut agent).await, "ASIAmint1");
    }

    // A newer credential retires the first: its count is logged then.
    let channel = Channel::from_shared(broker.url.clone())
        .unwrap()
        .connect_lazy();
    let probe = open_agent(channel, &broker.agent_token, "dev", "probe")
        .await
        .expect("subscribe");
    probe
        .send(subscribe_request::Message::RefreshHint(RefreshHint {
            kind: CredentialKind::Aws as i32,
            held_version: u64::MAX,
        }))
        .await;
    let first = agent
        .process
        .stderr_line(|l| l.contains("aws version "))
        .await;
    assert!(
        first.contains("served 3 local requests"),
        "{first}\n{}",
        agent.process.output()
    );
    for _ in 0..2 {
        assert_eq!(served(&mut agent).await, "ASIAmint2");
    }

    // Stopping logs the version still served.
    agent.process.signal("TERM");
    agent.process.exit().await;
    let output = agent.process.stderr();
    let last = output
        .lines()
        .filter(|l| l.contains("aws version "))
        .nth(1)
        .unwrap_or_else(|| panic!("no second count\n{output}"));
    assert!(last.contains("served 2 local requests"), "{last}");
    assert!(version_in(last) > version_in(&first), "{first}\n{last}");
    for secret in ["SECRETKEY", "SESSIONTOKEN"] {
        assert!(
            !output.contains(&format!("{secret}-mint")),
            "a served value reached the log\n{output}"
        );
    }
    session.shutdown().await.unwrap();
}
