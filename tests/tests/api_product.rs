//! The API as a product: real peers in other languages and the standard tools
//! drive an in-process broker through nothing but `proto/` and reflection.
//!
//! - Python: stubs generated with grpcio-tools at test time publish,
//!   subscribe, answer a RefreshRequest and call AdminService
//!   (`tests/python/api_scenario.py`).
//! - Node.js: `@grpc/proto-loader` loads `proto/` directly for a publish →
//!   subscribe round trip (`tests/node/roundtrip.js`).
//! - grpcurl: lists and describes every service and message through
//!   reflection, checks health, calls AdminService, watches a subscription.
//! - buf: lint and format are clean.
//! - README.md's "Use from another language" and "Inspect with grpcurl":
//!   their shell commands run verbatim.
//!
//! Each external tool comes from `scripts/test.sh` (see
//! `credstream_tests::tools`); without it the test prints `skipped: ...`.
//! Every wait is bounded by [`WAIT`] and waits for an event (a line, an exit),
//! never for a fixed time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use credstream_broker::auth::Role;
use credstream_proto::v1::{CredentialKind, publish_request, publish_response};
use credstream_tests::broker::{
    RawPublisher, TestBroker, aws_update, open_publisher, publisher_hello,
};
use credstream_tests::doc_blocks::{self, ShBlock};
use credstream_tests::{bins, tools};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// The longest any single step may take before the test fails.
const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs a command to completion within [`WAIT`], returning its output.
async fn run(cmd: &mut Command, what: &str) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
async fn run_ok(cmd: &mut Command, what: &str) -> String {
    let out = run(cmd, what).await;
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Parses the one JSON object a peer script prints, failing with its output.
fn json_result(out: &Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let value: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: no JSON result ({e}, {}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        )
    });
    assert!(
        out.status.success() && value["ok"] == Value::Bool(true),
        "{what} failed ({}):\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    value
}

/// The proto module's root folder.
fn proto_dir() -> PathBuf {
    tools::repo_root().join("proto")
}

/// `host:port` of the broker, as grpcurl and the peers want it.
fn target(broker: &TestBroker) -> String {
    broker.broker.local_addr.to_string()
}

/// Generates the Python stubs from `proto/` into `out`.
async fn generate_python_stubs(python: &Path, out: &Path) {
    let proto = proto_dir();
    run_ok(
        Command::new(python)
            .args(["-m", "grpc_tools.protoc"])
            .arg(format!("-I{}", proto.display()))
            .arg(format!("--python_out={}", out.display()))
            .arg(format!("--grpc_python_out={}", out.display()))
            .arg(proto.join("credstream/v1/credstream.proto")),
        "python -m grpc_tools.protoc",
    )
    .await;
    assert!(
        out.join("credstream/v1/credstream_pb2_grpc.py").exists(),
        "grpc_tools.protoc wrote no credstream_pb2_grpc.py"
    );
}

/// Reads grpcurl's stream of pretty-printed JSON messages one at a time: each
/// top-level object ends with a `}` alone on a line.
struct JsonMessages {
    lines: Lines<BufReader<ChildStdout>>,
}

impl JsonMessages {
    fn new(stdout: ChildStdout) -> Self {
        Self {
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next message, or `None` at the end of the output.
    async fn next(&mut self) -> Option<Value> {
        let mut text = String::new();
        loop {
            let line = tokio::time::timeout(WAIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("no grpcurl output within {WAIT:?}; so far: {text}"))
                .expect("read grpcurl output")?;
            let end = line == "}";
            text.push_str(&line);
            text.push('\n');
            if end {
                return Some(serde_json::from_str(&text).expect("grpcurl printed JSON"));
            }
        }
    }

    /// Skips messages until one has the top-level field `field`.
    async fn until(&mut self, field: &str) -> Value {
        let mut seen = Vec::new();
        loop {
            match self.next().await {
                Some(message) if message.get(field).is_some() => return message,
                Some(message) => seen.push(message),
                None => panic!("grpcurl output ended before a `{field}` message; saw {seen:?}"),
            }
        }
    }
}

/// A Publish stream for `cluster`, welcomed, driven from Rust for tests whose
/// external peer only watches; with the cluster's version at the welcome.
async fn welcomed_publisher(broker: &TestBroker, cluster: &str) -> (RawPublisher, u64) {
    let mut publisher = open_publisher(
        broker.channel(),
        &broker.token(Role::Publisher, Some(cluster)),
        Some(publisher_hello(cluster, &[CredentialKind::Aws], false)),
    )
    .await
    .expect("open Publish");
    let version = publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::Welcome(w)) => Some(w.version),
            _ => None,
        })
        .await;
    (publisher, version)
}

/// Publishes an AWS credential (access key id `ASIA{tag}`) valid for an hour
/// and waits for the broker's ack of it: the first ack past `version`, the
/// cluster's version before. Returns the credential's version.
async fn publish_aws(publisher: &mut RawPublisher, tag: &str, version: u64) -> u64 {
    let update = aws_update(tag, Duration::from_secs(3600));
    publisher
        .send(publish_request::Message::Credential(update))
        .await;
    publisher
        .until(|m| match &m.message {
            Some(publish_response::Message::UpdateAck(ack)) if ack.version > version => {
                Some(ack.version)
            }
            _ => None,
        })
        .await
}

// ---------------------------------------------------------------------------
// Python
// ---------------------------------------------------------------------------

#[tokio::test]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn python_stubs_publish_subscribe_answer_refresh_and_inspect() {
    let test = "python_stubs_publish_subscribe_answer_refresh_and_inspect";
    let Some(python) = tools::python(test) else {
        return;
    };
    let broker = TestBroker::start().await;
    let stubs = tempfile::tempdir().unwrap();
    generate_python_stubs(&python, stubs.path()).await;

    let cluster = "python-scenario";
    let out = run(
        Command::new(&python)
            .arg(tools::repo_root().join("tests/python/api_scenario.py"))
            .arg("--stubs")
            .arg(stubs.path())
            .args(["--target", &target(&broker), "--cluster", cluster])
            .env(
                "CREDSTREAM_PUBLISHER_TOKEN",
                broker.token(Role::Publisher, Some(cluster)),
            )
            .env(
                "CREDSTREAM_AGENT_TOKEN",
                broker.token(Role::Agent, Some(cluster)),
            )
            .env("CREDSTREAM_ADMIN_TOKEN", broker.token(Role::Admin, None)),
        "tests/python/api_scenario.py",
    )
    .await;
    let r = json_result(&out, "tests/python/api_scenario.py");

    // The publisher was welcomed and asked for the AWS credential it declared.
    assert_eq!(
        r["welcome"]["missing"],
        serde_json::json!(["CREDENTIAL_KIND_AWS"])
    );
    assert_eq!(r["refresh_request"]["kind"], "CREDENTIAL_KIND_AWS");
    assert_eq!(r["refresh_request"]["reason"], "REFRESH_REASON_MISSING");
    assert_eq!(r["refresh_request"]["has_deadline"], true);
    let refresh_id = r["refresh_request"]["id"].as_str().unwrap();
    assert!(!refresh_id.is_empty());
    let credential_version = r["versions"]["credential"].as_u64().unwrap();
    let env_version = r["versions"]["private_env"].as_u64().unwrap();
    assert!(
        credential_version > 0 && env_version > credential_version,
        "{r}"
    );

    // The agent's snapshot is the whole state, secrets intact, and carries
    // the answer to the refresh request.
    let snapshot = &r["snapshot"];
    assert_eq!(snapshot["version"].as_u64(), Some(env_version));
    assert_eq!(
        snapshot["aws_access_key_ids"],
        serde_json::json!(["ASIAPYTHONSCENARIO01"])
    );
    assert_eq!(snapshot["secrets_intact"], true);
    assert_eq!(
        snapshot["refresh_request_ids"],
        serde_json::json!([refresh_id])
    );
    assert_eq!(
        snapshot["env_names"],
        serde_json::json!(["PY_SCENARIO_DB_TOKEN"])
    );
    assert_eq!(snapshot["env_value_intact"], true);
    assert_eq!(snapshot["env_replace_all"], true);
    assert_eq!(
        snapshot["info_kinds"],
        serde_json::json!(["CREDENTIAL_KIND_AWS"])
    );
    assert_eq!(snapshot["info_private_env"], true);

    // Then the change arrived as an update with a newer version.
    assert_eq!(r["update"]["access_key_id"], "ASIAPYTHONSCENARIO02");
    assert_eq!(r["update"]["newer_than_snapshot"], true);

    // Admin: the cluster, env names, no secret.
    assert!(
        r["list_clusters"]
            .as_array()
            .unwrap()
            .contains(&Value::from(cluster)),
        "{r}"
    );
    let status = &r["get_cluster"];
    assert_eq!(status["cluster_id"], cluster);
    assert_eq!(
        status["private_env"]["names"],
        serde_json::json!(["PY_SCENARIO_DB_TOKEN"])
    );
    let credentials = status["credentials"].as_array().expect("credentials");
    assert_eq!(credentials.len(), 1, "{status}");
    assert_eq!(credentials[0]["kind"], "CREDENTIAL_KIND_AWS");
    assert!(credentials[0]["expires_at"].is_string(), "{status}");
    assert_eq!(r["admin_leaks"], serde_json::json!([]));

    // The auth contract, seen from Python.
    assert_eq!(r["errors"]["admin_without_token"], "UNAUTHENTICATED");
    assert_eq!(r["errors"]["admin_with_bad_token"], "UNAUTHENTICATED");
    assert_eq!(r["errors"]["admin_with_agent_token"], "PERMISSION_DENIED");
    assert_eq!(r["errors"]["get_unknown_cluster"], "NOT_FOUND");

    broker.broker.shutdown().await;
}

// ---------------------------------------------------------------------------
// Node.js
// ---------------------------------------------------------------------------

#[tokio::test]
#[cfg_attr(
    not(tool_node_modules),
    ignore = "needs node and @grpc/grpc-js: set CREDSTREAM_TEST_NODE_MODULES (scripts/test.sh does)"
)]
async fn node_proto_loader_publish_subscribe_round_trip() {
    let test = "node_proto_loader_publish_subscribe_round_trip";
    let Some(node_modules) = tools::node_modules(test) else {
        return;
    };
    let node_runs = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !node_runs {
        credstream_tests::tools::missing(test, "`node` on PATH");
        return;
    }
    let broker = TestBroker::start().await;
    let cluster = "node-roundtrip";
    let out = run(
        Command::new("node")
            .arg(tools::repo_root().join("tests/node/roundtrip.js"))
            .env("NODE_PATH", &node_modules)
            .env("CREDSTREAM_TARGET", target(&broker))
            .env("CREDSTREAM_CLUSTER", cluster)
            .env("CREDSTREAM_PROTO_DIR", proto_dir())
            .env(
                "CREDSTREAM_PUBLISHER_TOKEN",
                broker.token(Role::Publisher, Some(cluster)),
            )
            .env(
                "CREDSTREAM_AGENT_TOKEN",
                broker.token(Role::Agent, Some(cluster)),
            ),
        "node tests/node/roundtrip.js",
    )
    .await;
    let r = json_result(&out, "node tests/node/roundtrip.js");
    assert_eq!(
        r["snapshot_version"], 0,
        "a fresh cluster's snapshot is empty"
    );
    assert_eq!(
        r["welcome_missing"],
        serde_json::json!(["CREDENTIAL_KIND_AWS"])
    );
    let received = &r["received"];
    assert_eq!(received["access_key_id"], "ASIANODEROUNDTRIP001");
    assert_eq!(received["secret_intact"], true);
    assert_eq!(received["expires_at_matches"], true);
    assert!(received["version"].as_u64().unwrap() > 0);
    assert_eq!(received["version"], r["ack_version"], "{r}");
    broker.broker.shutdown().await;
}

// ---------------------------------------------------------------------------
// grpcurl
// ---------------------------------------------------------------------------

/// grpcurl against the plaintext loopback broker; each call is bounded.
fn grpcurl(path: &Path) -> Command {
    let mut cmd = Command::new(path);
    cmd.args(["-plaintext", "-max-time", "30"]);
    cmd
}

/// Every `message` and `enum` declared in the proto file, fully qualified.
fn declared_types() -> Vec<String> {
    let text = std::fs::read_to_string(proto_dir().join("credstream/v1/credstream.proto"))
        .expect("read credstream.proto");
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("message" | "enum"), Some(name)) => Some(format!("credstream.v1.{name}")),
                _ => None,
            }
        })
        .collect()
}

#[tokio::test]
#[cfg_attr(
    not(tool_grpcurl),
    ignore = "needs grpcurl: set CREDSTREAM_TEST_GRPCURL (scripts/test.sh does)"
)]
async fn grpcurl_lists_and_describes_every_service_and_message() {
    let test = "grpcurl_lists_and_describes_every_service_and_message";
    let Some(grpcurl_path) = tools::grpcurl(test) else {
        return;
    };
    let broker = TestBroker::start().await;
    let addr = target(&broker);

    let listed = run_ok(grpcurl(&grpcurl_path).args([&addr, "list"]), "grpcurl list").await;
    let services: BTreeSet<&str> = listed.lines().map(str::trim).collect();
    for expected in [
        "credstream.v1.PublisherService",
        "credstream.v1.AgentService",
        "credstream.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.contains(expected),
            "`grpcurl list` lacks {expected}: {listed}"
        );
    }
    assert!(
        services.iter().any(|s| s.starts_with("grpc.reflection.")),
        "`grpcurl list` shows no reflection service: {listed}"
    );

    // Every service, with its methods.
    for (service, methods) in [
        ("credstream.v1.PublisherService", &["Publish"][..]),
        ("credstream.v1.AgentService", &["Subscribe"][..]),
        (
            "credstream.v1.AdminService",
            &["ListClusters", "GetCluster", "CreateAgentToken"][..],
        ),
    ] {
        let described = run_ok(
            grpcurl(&grpcurl_path).args([&addr, "describe", service]),
            "grpcurl describe SERVICE",
        )
        .await;
        assert!(described.contains("is a service"), "{described}");
        for method in methods {
            assert!(
                described.contains(&format!("rpc {method} (")),
                "describe {service} lacks {method}: {described}"
            );
        }
    }
    let published = run_ok(
        grpcurl(&grpcurl_path).args([&addr, "describe", "credstream.v1.PublisherService"]),
        "grpcurl describe PublisherService",
    )
    .await;
    assert!(
        published.contains("stream .credstream.v1.PublishRequest")
            && published.contains("stream .credstream.v1.PublishResponse"),
        "Publish is not shown as bidirectional: {published}"
    );

    // Every message and enum, with its comments (reflection carries source
    // info, so a developer browsing with grpcurl sees the documentation).
    let types = declared_types();
    assert!(types.len() > 30, "found only {types:?} in the proto");
    for name in &types {
        let described = run_ok(
            grpcurl(&grpcurl_path).args([&addr, "describe", name]),
            "grpcurl describe MESSAGE",
        )
        .await;
        assert!(
            described.contains(&format!("{name} is a message"))
                || described.contains(&format!("{name} is an enum")),
            "describe {name}: {described}"
        );
        assert!(
            described
                .lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("// ")),
            "describe {name} shows no documentation comment: {described}"
        );
    }
    let credential_update = run_ok(
        grpcurl(&grpcurl_path).args([&addr, "describe", "credstream.v1.CredentialUpdate"]),
        "grpcurl describe CredentialUpdate",
    )
    .await;
    for field in [
        "oneof credential",
        ".google.protobuf.Timestamp expires_at",
        "refresh_request_id",
    ] {
        assert!(credential_update.contains(field), "{credential_update}");
    }
    broker.broker.shutdown().await;
}

#[tokio::test]
#[cfg_attr(
    not(tool_grpcurl),
    ignore = "needs grpcurl: set CREDSTREAM_TEST_GRPCURL (scripts/test.sh does)"
)]
async fn grpcurl_checks_health_and_calls_admin_with_a_bearer_token() {
    let test = "grpcurl_checks_health_and_calls_admin_with_a_bearer_token";
    let Some(grpcurl_path) = tools::grpcurl(test) else {
        return;
    };
    let broker = TestBroker::start().await;
    let addr = target(&broker);

    let health = run_ok(
        grpcurl(&grpcurl_path).args([&addr, "grpc.health.v1.Health/Check"]),
        "grpcurl Health/Check",
    )
    .await;
    let health: Value = serde_json::from_str(&health).expect("health JSON");
    assert_eq!(health["status"], "SERVING");

    let cluster = "grpcurl-admin";
    let secret = "SECRETKEY-GRPCURLADMIN0001";
    let (mut publisher, version) = welcomed_publisher(&broker, cluster).await;
    publish_aws(&mut publisher, "GRPCURLADMIN0001", version).await;

    let admin = format!("authorization: Bearer {}", broker.token(Role::Admin, None));
    let listed = run_ok(
        grpcurl(&grpcurl_path).args([
            "-H",
            &admin,
            &addr,
            "credstream.v1.AdminService/ListClusters",
        ]),
        "grpcurl AdminService/ListClusters",
    )
    .await;
    let listed: Value = serde_json::from_str(&listed).expect("ListClusters JSON");
    let ids: Vec<&str> = listed["clusters"]
        .as_array()
        .expect("clusters")
        .iter()
        .filter_map(|c| c["clusterId"].as_str())
        .collect();
    assert!(ids.contains(&cluster), "{listed}");

    let got = run_ok(
        grpcurl(&grpcurl_path).args([
            "-H",
            &admin,
            "-d",
            &format!(r#"{{"cluster_id": "{cluster}"}}"#),
            &addr,
            "credstream.v1.AdminService/GetCluster",
        ]),
        "grpcurl AdminService/GetCluster",
    )
    .await;
    assert!(!got.contains(secret), "GetCluster leaked a secret: {got}");
    let got: Value = serde_json::from_str(&got).expect("GetCluster JSON");
    assert_eq!(got["cluster"]["clusterId"], cluster);
    assert_eq!(
        got["cluster"]["credentials"][0]["kind"],
        "CREDENTIAL_KIND_AWS"
    );

    // Without a token: UNAUTHENTICATED, said plainly.
    let denied = run(
        grpcurl(&grpcurl_path).args([&addr, "credstream.v1.AdminService/ListClusters"]),
        "grpcurl without a token",
    )
    .await;
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    broker.broker.shutdown().await;
}

#[tokio::test]
#[cfg_attr(
    not(tool_grpcurl),
    ignore = "needs grpcurl: set CREDSTREAM_TEST_GRPCURL (scripts/test.sh does)"
)]
async fn grpcurl_watches_a_subscription_after_half_closing() {
    let test = "grpcurl_watches_a_subscription_after_half_closing";
    let Some(grpcurl_path) = tools::grpcurl(test) else {
        return;
    };
    let broker = TestBroker::start().await;
    let cluster = "grpcurl-watch";
    let mut watch: Child = grpcurl(&grpcurl_path)
        .arg("-H")
        .arg(format!(
            "authorization: Bearer {}",
            broker.token(Role::Agent, Some(cluster))
        ))
        .args(["-d", "@", &target(&broker)])
        .arg("credstream.v1.AgentService/Subscribe")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start grpcurl");
    let mut stdin = watch.stdin.take().unwrap();
    stdin
        .write_all(
            format!(r#"{{"hello": {{"cluster_id": "{cluster}", "agent_id": "grpcurl-watch"}}}}"#)
                .as_bytes(),
        )
        .await
        .unwrap();
    drop(stdin); // half-close: grpcurl ends its sending side
    let mut messages = JsonMessages::new(watch.stdout.take().unwrap());
    let snapshot = messages.until("snapshot").await;
    assert!(
        snapshot["snapshot"].get("credentials").is_none(),
        "{snapshot}"
    );

    // Published after the half-close, still delivered.
    let (mut publisher, version) = welcomed_publisher(&broker, cluster).await;
    let version = publish_aws(&mut publisher, "GRPCURLWATCH0001", version).await;
    let update = messages.until("credential").await;
    assert_eq!(
        update["credential"]["aws"]["accessKeyId"], "ASIAGRPCURLWATCH0001",
        "{update}"
    );
    publish_aws(&mut publisher, "GRPCURLWATCH0002", version).await;
    let update = messages.until("credential").await;
    assert_eq!(
        update["credential"]["aws"]["accessKeyId"], "ASIAGRPCURLWATCH0002",
        "{update}"
    );

    watch.start_kill().unwrap();
    let _ = tokio::time::timeout(WAIT, watch.wait()).await;
    broker.broker.shutdown().await;
}

// ---------------------------------------------------------------------------
// buf
// ---------------------------------------------------------------------------

#[tokio::test]
#[cfg_attr(
    not(tool_buf),
    ignore = "needs buf: set CREDSTREAM_TEST_BUF (scripts/test.sh does)"
)]
async fn buf_lint_and_format_are_clean() {
    let test = "buf_lint_and_format_are_clean";
    let Some(buf) = tools::buf(test) else {
        return;
    };
    let root = tools::repo_root();
    run_ok(
        Command::new(&buf).arg("lint").current_dir(&root),
        "buf lint",
    )
    .await;
    run_ok(
        Command::new(&buf)
            .args(["format", "-d", "--exit-code"])
            .current_dir(&root),
        "buf format -d --exit-code",
    )
    .await;
}

// ---------------------------------------------------------------------------
// README.md's API sections, run verbatim
// ---------------------------------------------------------------------------

/// The part of the README between `<!-- doc-test: begin` and
/// `<!-- doc-test: end -->` (the "Use from another language" and "Inspect
/// with grpcurl" sections), as its sh blocks.
fn doc_blocks(readme: &str) -> Vec<ShBlock> {
    doc_blocks::sh_blocks(doc_blocks::section(readme, "doc-test"), "doc-test")
}

/// The dev broker binary's announcements: address and tokens.
struct DevBroker {
    child: Child,
    addr: String,
    env: Vec<(String, String)>,
}

async fn start_dev_broker() -> DevBroker {
    let mut child = Command::new(bins::binary("credstream-broker"))
        .args(["--listen", "127.0.0.1:0", "--dev"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start credstream-broker --dev");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    let mut env = Vec::new();
    while addr.is_none() || env.len() < 3 {
        let line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("credstream-broker --dev announces itself within WAIT")
            .expect("read broker stdout")
            .expect("credstream-broker --dev exited before printing its address and tokens");
        if let Some(rest) = line.trim().strip_prefix("listening on ") {
            addr = Some(rest.trim().to_owned());
        }
        for name in [
            "CREDSTREAM_PUBLISHER_TOKEN",
            "CREDSTREAM_AGENT_TOKEN",
            "CREDSTREAM_ADMIN_TOKEN",
        ] {
            let line = line.trim().trim_start_matches("export ");
            if let Some(value) = line.strip_prefix(&format!("{name}=")) {
                env.push((name.to_owned(), value.trim_matches(['\'', '"']).to_owned()));
            }
        }
    }
    // Keep draining stdout so the broker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    DevBroker {
        child,
        addr: addr.unwrap(),
        env,
    }
}

#[tokio::test]
#[cfg_attr(
    not(all(tool_python, tool_grpcurl)),
    ignore = "needs the project's Python venv: set CREDSTREAM_TEST_PYTHON; needs grpcurl: set CREDSTREAM_TEST_GRPCURL (scripts/test.sh does)"
)]
async fn api_usage_doc_commands_run() {
    let test = "api_usage_doc_commands_run";
    let (Some(python), Some(grpcurl_path)) = (tools::python(test), tools::grpcurl(test)) else {
        return;
    };
    let doc_path = tools::repo_root().join("README.md");
    let readme = std::fs::read_to_string(&doc_path).expect("read README.md");
    let blocks = doc_blocks(&readme);
    assert!(
        blocks.len() >= 6,
        "README.md's doc-test section has too few ```sh blocks"
    );
    assert!(blocks.iter().any(|b| b.background));

    let mut broker = start_dev_broker().await;

    // The reader's shell: the repository's proto/ and client/ in the current
    // folder, `python` and `grpcurl` on PATH, the variables the doc names.
    let cwd = tempfile::tempdir().unwrap();
    for dir in ["proto", "client"] {
        std::os::unix::fs::symlink(tools::repo_root().join(dir), cwd.path().join(dir)).unwrap();
    }
    let mut path =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect::<Vec<_>>();
    path.insert(0, grpcurl_path.parent().unwrap().to_path_buf());
    path.insert(0, python.parent().unwrap().to_path_buf());
    let path = std::env::join_paths(path).unwrap();
    let shell = |script: &str| {
        let mut cmd = Command::new("bash");
        cmd.args(["-euo", "pipefail", "-c", script])
            .current_dir(cwd.path())
            .env("PATH", &path)
            .env("CREDSTREAM_ADDR", &broker.addr)
            .envs(broker.env.iter().map(|(k, v)| (k, v)));
        cmd
    };

    let mut watch: Option<(Child, JsonMessages)> = None;
    let mut outputs = String::new();
    for block in &blocks {
        if block.background {
            let mut child = shell(&block.script)
                .process_group(0) // so that the whole pipeline can be stopped
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .expect("start background block");
            let mut messages = JsonMessages::new(child.stdout.take().unwrap());
            // The watch is live once it has printed the snapshot.
            messages.until("snapshot").await;
            watch = Some((child, messages));
            continue;
        }
        let out = run_ok(
            &mut shell(&block.script),
            &format!("doc block:\n{}", block.script),
        )
        .await;
        outputs.push_str(&out);
    }

    // What the doc promises: services listed, healthy, the cluster shown
    // without its secrets, and the watch seeing the second publish.
    for expected in [
        "credstream.v1.AdminService",
        "grpc.health.v1.Health",
        "SERVING",
        "\"clusterId\": \"dev\"",
        "AUTH_TOKEN_FOR_CUSTOM_DATABASE",
        "published an AWS credential",
    ] {
        assert!(
            outputs.contains(expected),
            "doc output lacks {expected:?}:\n{outputs}"
        );
    }
    assert!(
        !outputs.contains("s3cr3t"),
        "a secret value reached non-agent output:\n{outputs}"
    );
    let (mut child, mut messages) = watch.expect("the doc's background block ran");
    let env = messages.until("privateEnv").await;
    assert!(
        env.to_string().contains("n3w-s3cr3t"),
        "the watch did not see the second publish: {env}"
    );
    // Ctrl-C, as the doc says: the whole pipeline, not just its shell.
    let group = format!("-{}", child.id().expect("the watch is running"));
    run_ok(
        Command::new("kill").args(["-INT", "--", &group]),
        "kill the watch",
    )
    .await;
    let _ = tokio::time::timeout(WAIT, child.wait()).await;
    broker.child.start_kill().unwrap();
    let _ = tokio::time::timeout(WAIT, broker.child.wait()).await;
}
