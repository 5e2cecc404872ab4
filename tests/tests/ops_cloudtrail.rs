//! Audit and safety of what `credstream publish` mints, through the real
//! binaries against moto with authentication on:
//!
//! - CloudTrail names the person and the cluster: the `AssumeRole` call, as
//!   a recording proxy in front of moto saw it, carries `SourceIdentity`
//!   (the user's own name, or `--aws-source-identity`), the transitive
//!   session tags `credstream-cluster=<id>` and every `--aws-tag`, and the
//!   `RoleSessionName` `credstream-<id>`.
//! - Every minted credential is checked with `GetCallerIdentity` signed by
//!   it before it is published: one moto refuses (the fixed example keys its
//!   `GetSessionToken` returns, which its own authentication rejects, FACTS
//!   15) is a refresh error, the broker publishes nothing, and the agent
//!   keeps the last good credential.

use std::collections::HashMap;

use credstream_agent::store::CredentialStore;
use credstream_agent::subscription::{self, SubscriptionConfig};
use credstream_proto::v1::credential_update::Credential;
use credstream_proto::v1::{CredentialKind, RefreshHint, subscribe_request};
use credstream_tests::bins::binary;
use credstream_tests::broker::open_agent;
use credstream_tests::fake_http::form;
use credstream_tests::moto::{Moto, Seeded, laptop_env, seed};
use credstream_tests::processes::{BrokerProcess, Process, clean_command};
use credstream_tests::publish::local_address;
use credstream_tests::recording_proxy::RecordingProxy;
use credstream_tests::tools;
use tonic::transport::Channel;

/// moto seeded and enforcing auth, with a recording proxy in front.
async fn moto_with_proxy(python: &std::path::Path) -> (Moto, Seeded, RecordingProxy) {
    let moto = Moto::start(python).await;
    let seeded = seed(python, &moto).await;
    moto.require_auth().await;
    let proxy = RecordingProxy::start(&moto.url).await;
    (moto, seeded, proxy)
}

/// The laptop's environment with STS reached through the proxy.
fn laptop_through(
    proxy: &RecordingProxy,
    moto: &Moto,
    seeded: &Seeded,
    home: &std::path::Path,
) -> Vec<(String, String)> {
    let mut env = laptop_env(moto, seeded, home);
    for (key, value) in &mut env {
        if key == "AWS_ENDPOINT_URL_STS" {
            *value = proxy.url.clone();
        }
    }
    env
}

fn publish(env: &[(String, String)], broker: &BrokerProcess, args: &[&str]) -> Process {
    let mut command = clean_command(binary("credstream"));
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("CREDSTREAM_TOKEN", &broker.publisher_token)
        // In clear, so that the agent here (which holds no seal key) can
        // read what it is sent; sealing is tested on its own.
        .env("CREDSTREAM_NO_SEAL", "true")
        .args([
            "publish",
            "--broker",
            &broker.url,
            "--cluster",
            "dev",
            "--no-gcp",
        ])
        .args(args);
    Process::spawn("credstream publish", command)
}

/// The form fields of every `AssumeRole` the proxy forwarded.
fn assume_role_calls(proxy: &RecordingProxy) -> Vec<HashMap<String, String>> {
    proxy
        .received()
        .iter()
        .map(|r| form(&r.body))
        .filter(|f| f.get("Action").map(String::as_str) == Some("AssumeRole"))
        .collect()
}

fn field<'a>(call: &'a HashMap<String, String>, name: &str) -> &'a str {
    call.get(name)
        .map(String::as_str)
        .unwrap_or_else(|| panic!("AssumeRole without {name}: {call:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn assume_role_names_the_person_and_the_cluster_for_cloudtrail() {
    let test = "assume_role_names_the_person_and_the_cluster_for_cloudtrail";
    let Some(python) = tools::python(test) else {
        return;
    };
    let (moto, seeded, proxy) = moto_with_proxy(&python).await;
    let home = tempfile::tempdir().unwrap();
    let laptop = laptop_through(&proxy, &moto, &seeded, home.path());

    // The source identity defaults to the user's own name, from the ARN
    // GetCallerIdentity gives for the local keys (…:user/laptop-user).
    let broker = BrokerProcess::start_dev().await;
    let mut publisher = publish(
        &laptop,
        &broker,
        &[
            "--aws-role-arn",
            &seeded.role_arn,
            "--aws-duration",
            "15m",
            "--aws-tag",
            "team=data-eng",
            "--aws-tag",
            "cost-center=42",
        ],
    );
    let minted = publisher.line(|l| l.starts_with("minted AWS")).await;
    assert!(
        minted.starts_with(
            "minted AWS for arn:aws:sts::123456789012:assumed-role/cluster-reader/credstream-dev,"
        ),
        "{minted}"
    );
    let calls = assume_role_calls(&proxy);
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(field(call, "RoleArn"), seeded.role_arn);
    assert_eq!(field(call, "RoleSessionName"), "credstream-dev");
    assert_eq!(field(call, "SourceIdentity"), "laptop-user");
    let tags: Vec<(&str, &str)> = (1..)
        .map_while(|i| {
            Some((
                call.get(&format!("Tags.member.{i}.Key"))?.as_str(),
                call.get(&format!("Tags.member.{i}.Value"))?.as_str(),
            ))
        })
        .collect();
    assert_eq!(
        tags,
        [
            ("credstream-cluster", "dev"),
            ("team", "data-eng"),
            ("cost-center", "42")
        ]
    );
    let transitive: Vec<&str> = (1..)
        .map_while(|i| Some(call.get(&format!("TransitiveTagKeys.member.{i}"))?.as_str()))
        .collect();
    assert_eq!(transitive, ["credstream-cluster", "team", "cost-center"]);
    // moto recorded the session under that name.
    let sessions: Vec<String> = moto
        .sts_records("AssumedRole")
        .await
        .iter()
        .filter_map(|r| r["session_name"].as_str().map(str::to_owned))
        .collect();
    assert!(
        sessions.iter().any(|s| s == "credstream-dev"),
        "{sessions:?}"
    );
    publisher.signal("TERM");
    assert!(publisher.exit().await.success(), "{}", publisher.output());

    // --aws-source-identity names someone else explicitly.
    let broker = BrokerProcess::start_dev().await;
    let mut publisher = publish(
        &laptop,
        &broker,
        &[
            "--aws-role-arn",
            &seeded.role_arn,
            "--aws-duration",
            "15m",
            "--aws-source-identity",
            "alice@example.com",
        ],
    );
    publisher.line(|l| l.starts_with("minted AWS")).await;
    let calls = assume_role_calls(&proxy);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(field(&calls[1], "SourceIdentity"), "alice@example.com");
    assert_eq!(field(&calls[1], "Tags.member.1.Key"), "credstream-cluster");
    assert_eq!(calls[1].get("Tags.member.2.Key"), None);
    publisher.signal("TERM");
    assert!(publisher.exit().await.success(), "{}", publisher.output());

    // A tag STS would refuse is refused before anything is minted.
    let mut refused = publish(
        &laptop,
        &broker,
        &[
            "--aws-role-arn",
            &seeded.role_arn,
            "--aws-tag",
            "aws:owner=me",
        ],
    );
    assert_eq!(refused.exit().await.code(), Some(1), "{}", refused.output());
    assert!(
        refused
            .stderr()
            .contains("session tag key \"aws:owner\" must not start with \"aws:\""),
        "{}",
        refused.output()
    );
    assert_eq!(assume_role_calls(&proxy).len(), 2, "no AssumeRole for it");
}

/// An agent (the agent library's subscription loop) in this process.
fn library_agent(broker: &BrokerProcess, agent_id: &str) -> CredentialStore {
    let address = local_address(&broker.url, &broker.agent_token, "dev");
    let store = CredentialStore::new();
    tokio::spawn(subscription::run(
        SubscriptionConfig::new(address, agent_id),
        store.clone(),
        std::future::pending::<()>(),
    ));
    store
}

/// The AWS access key id and version the agent holds, once it holds one.
async fn held_aws(store: &CredentialStore) -> (String, u64) {
    let mut state = store.subscribe();
    let held = tokio::time::timeout(credstream_tests::broker::WAIT, async {
        loop {
            if let Some(update) = state.borrow_and_update().credentials.aws.clone()
                && let Some(Credential::Aws(aws)) = &update.credential
            {
                return (aws.access_key_id.clone(), update.version);
            }
            state.changed().await.expect("the store is alive");
        }
    })
    .await;
    held.expect("the agent holds an AWS credential")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn a_credential_sts_refuses_is_never_published_and_agents_keep_the_last_good_one() {
    let test = "a_credential_sts_refuses_is_never_published_and_agents_keep_the_last_good_one";
    let Some(python) = tools::python(test) else {
        return;
    };
    let (moto, seeded, proxy) = moto_with_proxy(&python).await;
    let broker = BrokerProcess::start_dev().await;
    let home = tempfile::tempdir().unwrap();
    let laptop = laptop_through(&proxy, &moto, &seeded, home.path());
    let agent = library_agent(&broker, "worker-1");

    // A good credential first: the role's, which moto accepts.
    let mut good = publish(
        &laptop,
        &broker,
        &["--aws-role-arn", &seeded.role_arn, "--aws-duration", "15m"],
    );
    good.line(|l| l.starts_with("minted AWS")).await;
    let (good_key, good_version) = held_aws(&agent).await;

    // Another publisher takes the cluster over, minting from the user's
    // long-term keys: GetSessionToken, whose answer moto's authentication
    // does not accept.
    let mut other_laptop = laptop.clone();
    other_laptop.push(("USER".into(), "other-user".into()));
    let mut bad = publish(&other_laptop, &broker, &[]);
    bad.line(|l| l.starts_with("connected to the broker")).await;
    assert_eq!(good.exit().await.code(), Some(3), "{}", good.output());
    let before = broker.status("dev").await.unwrap();

    // An agent asks for a fresh credential; the broker asks the publisher.
    let channel = Channel::from_shared(broker.url.clone())
        .unwrap()
        .connect_lazy();
    let probe = open_agent(channel, &broker.agent_token, "dev", "probe")
        .await
        .expect("subscribe");
    probe
        .send(subscribe_request::Message::RefreshHint(RefreshHint {
            kind: CredentialKind::Aws as i32,
            held_version: good_version,
        }))
        .await;
    let failed = bad.line(|l| l.starts_with("could not mint AWS")).await;
    assert!(
        failed.contains(
            "the credential GetSessionToken just issued failed its check (GetCallerIdentity signed with it): STS refused it ("
        ) && failed.contains("it was not published, and agents keep the last good one")
            && failed.ends_with("the broker will ask again"),
        "{failed}"
    );
    // It was minted and tried: GetSessionToken, then GetCallerIdentity.
    let actions: Vec<String> = proxy
        .received()
        .iter()
        .filter_map(|r| form(&r.body).get("Action").cloned())
        .collect();
    let minted_at = actions
        .iter()
        .rposition(|a| a == "GetSessionToken")
        .expect("GetSessionToken was called");
    assert_eq!(
        actions.get(minted_at + 1).map(String::as_str),
        Some("GetCallerIdentity"),
        "{actions:?}"
    );

    // The broker was told and published nothing: same version, same
    // credential, the error on record.
    let after = tokio::time::timeout(credstream_tests::broker::WAIT, async {
        loop {
            let status = broker.status("dev").await.unwrap();
            if status.last_refresh_error.contains("failed its check") {
                return status;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the broker records the refresh error");
    assert_eq!(after.version, before.version, "nothing new was published");
    assert_eq!(after.credentials.len(), 1);
    assert_eq!(after.credentials[0].version, good_version);
    assert_eq!(
        after.credentials[0].principal,
        "arn:aws:sts::123456789012:assumed-role/cluster-reader/credstream-dev"
    );
    // The agent still holds the good credential.
    let state = agent.subscribe().borrow().clone();
    let Some(Credential::Aws(aws)) = state
        .credentials
        .aws
        .as_ref()
        .and_then(|u| u.credential.clone())
    else {
        panic!("the agent lost its AWS credential");
    };
    assert_eq!(aws.access_key_id, good_key);
    bad.signal("TERM");
    assert!(bad.exit().await.success(), "{}", bad.output());
}
