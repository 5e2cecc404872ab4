//! Join strings across machines (issue 32): a broker made with
//! `credstream-broker init` in a network namespace of its own, on a
//! non-loopback address; `credstream publish` in a "laptop" namespace and
//! `credstream-agent` in a "worker" namespace join it with the printed
//! strings alone. A second broker with another key, answering at an address
//! a join string for the first one names, is refused in the TLS handshake
//! and never receives the token; a wrong pin, an expired token and a
//! revoked key each fail with an error that names the cause and the fix.
//!
//! Needs root and iproute2 (`ip netns`): without them the test prints a
//! `skipped:` line, or fails under `CREDSTREAM_TEST_REQUIRE_TOOLS=1`. The
//! namespaces, their bridge and veth pairs exist only for the test (the
//! addresses are in 10.231.0.0/16, inside the namespaces only) and are
//! removed when it ends, also when it fails.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

use base64::Engine;
use credstream_proto::join::{JoinString, SpkiPin};
use credstream_tests::bins::binary;
use credstream_tests::processes::{Process, clean_command, write_private_file};
use credstream_tests::tools;

const TEST: &str = "join_strings_work_across_network_namespaces_and_refuse_what_they_should";
/// The port both brokers listen on (each namespace has its own ports).
const PORT: u16 = 50051;

/// Three network namespaces: the broker's holds a bridge with the
/// brokers' addresses, the laptop's and the worker's each a veth pair to
/// it. Dropping it deletes them (and with them every link and address).
struct Namespaces {
    prefix: String,
    created: Vec<String>,
    /// The third byte of the 10.231.0.0/16 network, per run.
    net: u32,
}

impl Namespaces {
    fn name(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    fn broker_a(&self) -> String {
        format!("10.231.{}.1", self.net)
    }

    fn broker_b(&self) -> String {
        format!("10.231.{}.2", self.net)
    }

    /// Creates the namespaces and their links; `Err` if `ip netns add`
    /// itself is not possible here (not root, no iproute2).
    fn create() -> Result<Namespaces, String> {
        let pid = std::process::id();
        let mut namespaces = Namespaces {
            prefix: format!("csj-{pid}"),
            created: Vec::new(),
            net: 20 + pid % 200,
        };
        for role in ["broker", "laptop", "worker"] {
            let name = namespaces.name(role);
            ip(&["netns", "add", &name])?;
            namespaces.created.push(name.clone());
            namespaces.ip_in(&name, &["link", "set", "lo", "up"]);
        }
        let broker = namespaces.name("broker");
        let net = namespaces.net;
        namespaces.ip_in(&broker, &["link", "add", "br0", "type", "bridge"]);
        namespaces.ip_in(&broker, &["link", "set", "br0", "up"]);
        for address in [namespaces.broker_a(), namespaces.broker_b()] {
            namespaces.ip_in(
                &broker,
                &["addr", "add", &format!("{address}/24"), "dev", "br0"],
            );
        }
        for (role, host) in [("laptop", 10), ("worker", 20)] {
            let name = namespaces.name(role);
            let port = format!("v-{role}");
            namespaces.ip_in(
                &name,
                &[
                    "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", &broker,
                ],
            );
            namespaces.ip_in(&broker, &["link", "set", &port, "master", "br0"]);
            namespaces.ip_in(&broker, &["link", "set", &port, "up"]);
            let address = format!("10.231.{net}.{host}/24");
            namespaces.ip_in(&name, &["addr", "add", &address, "dev", "eth0"]);
            namespaces.ip_in(&name, &["link", "set", "eth0", "up"]);
        }
        Ok(namespaces)
    }

    /// `ip -n NAME args`, which must succeed.
    fn ip_in(&self, name: &str, args: &[&str]) {
        let mut all = vec!["-n", name];
        all.extend_from_slice(args);
        if let Err(error) = ip(&all) {
            panic!("{error}");
        }
    }

    /// `ip netns exec NAME program` with a clean environment.
    fn command(&self, role: &str, program: &Path) -> tokio::process::Command {
        let mut command = clean_command("ip");
        command
            .args(["netns", "exec", &self.name(role)])
            .arg(program);
        command
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.created.drain(..) {
            if let Err(error) = ip(&["netns", "del", &name]) {
                eprintln!("cannot remove the test's network namespace: {error}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("cannot run ip {}: {error}", args.join(" ")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// The value of the `NAME=` line of `init`'s output.
fn printed(stdout: &str, name: &str) -> String {
    let prefix = format!("{name}=");
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}= line in the output of init"))
        .to_owned()
}

/// A one-shot command's exit status and its output, after it ended.
async fn run(name: &str, command: tokio::process::Command) -> (ExitStatus, String) {
    let mut process = Process::spawn(name, command);
    let status = process.exit().await;
    (status, process.output())
}

/// `credstream-broker init` in the broker namespace: its stdout.
async fn init(ns: &Namespaces, dir: &Path, address: &str, ttl: &str) -> String {
    let mut command = ns.command("broker", &binary("credstream-broker"));
    command.arg("init").arg("--state-dir").arg(dir).args([
        "--address",
        address,
        "--cluster",
        "c1",
        "--ttl",
        ttl,
    ]);
    let mut process = Process::spawn("credstream-broker init", command);
    let status = process.exit().await;
    assert!(status.success(), "init failed\n{}", process.output());
    process.stdout()
}

/// `credstream-broker --state-dir dir --listen address` in the broker
/// namespace, with its audit trail in `dir/audit.log`, once it listens.
async fn serve(ns: &Namespaces, dir: &Path, address: &str) -> Process {
    let mut command = ns.command("broker", &binary("credstream-broker"));
    command
        .arg("--state-dir")
        .arg(dir)
        .args(["--listen", address, "--audit-log"])
        .arg(dir.join("audit.log"))
        .env("RUST_LOG", "info");
    let mut process = Process::spawn(&format!("credstream-broker at {address}"), command);
    process.line(|l| l.starts_with("listening on ")).await;
    process
}

/// `credstream publish --join-file join` in the laptop namespace.
fn publish(ns: &Namespaces, dir: &Path, join: &Path) -> tokio::process::Command {
    let mut command = ns.command("laptop", &binary("credstream"));
    command
        .arg("publish")
        .arg("--join-file")
        .arg(join)
        .args(["--cluster", "c1", "--no-aws", "--no-gcp"])
        .args(["--env", "JOINED_SECRET=from-the-laptop"])
        .arg("--seal-key-file")
        .arg(dir.join("seal.key"))
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir.join("config"));
    command
}

/// Runs a publish that must fail, and returns its output.
async fn publish_fails(ns: &Namespaces, dir: &Path, name: &str, join: &Path) -> String {
    let (status, output) = run(name, publish(ns, dir, join)).await;
    assert!(!status.success(), "{name} succeeded\n{output}");
    output
}

/// The audit records of `dir/audit.log` (none if it does not exist yet).
fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("audit.log")).unwrap_or_default();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("an audit line is JSON"))
        .collect()
}

/// Waits (bounded) until `dir/audit.log` holds `count` records.
async fn audit_records_at_least(dir: &Path, count: usize) -> Vec<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let records = audit_records(dir);
        if records.len() >= count {
            return records;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the audit trail has {} records, not {count}: {records:?}",
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_join(dir: &Path, name: &str, join: &JoinString) -> PathBuf {
    write_private_file(dir, name, join.encode().as_str())
}

#[tokio::test]
#[cfg_attr(
    not(tool_netns),
    ignore = "needs root and iproute2 (ip netns); run as root or with CREDSTREAM_TEST_REQUIRE_TOOLS=1"
)]
async fn join_strings_work_across_network_namespaces_and_refuse_what_they_should() {
    let ns = match Namespaces::create() {
        Ok(ns) => ns,
        Err(error) => {
            tools::missing(TEST, &format!("root and iproute2 ({error})"));
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path();
    let state_a = dir.join("broker-a");
    let state_b = dir.join("broker-b");
    let address_a = format!("{}:{PORT}", ns.broker_a());
    let address_b = format!("{}:{PORT}", ns.broker_b());

    // The broker, initialised for its non-loopback address, and the strings
    // it printed, each in a 0600 file of its role.
    let printed_a = init(&ns, &state_a, &address_a, "1h").await;
    let publisher_join = printed(&printed_a, "CREDSTREAM_PUBLISHER_JOIN");
    let agent_join = printed(&printed_a, "CREDSTREAM_AGENT_JOIN");
    let publisher_file = write_private_file(dir, "publisher.join", &publisher_join);
    let agent_file = write_private_file(dir, "agent.join", &agent_join);
    let publisher = JoinString::parse(&publisher_join).expect("init prints a join string");
    assert_eq!(publisher.address, address_a);
    let mut broker_a = serve(&ns, &state_a, &address_a).await;

    // The cluster's seal key, made on the laptop, handed to the worker.
    let mut seal_key = ns.command("laptop", &binary("credstream"));
    seal_key
        .args(["seal-key", "--cluster", "c1", "--seal-key-file"])
        .arg(dir.join("seal.key"));
    let (status, output) = run("credstream seal-key", seal_key).await;
    assert!(status.success(), "{output}");

    // Publish from the laptop and serve on the worker, by join strings only.
    let mut publishing = Process::spawn("credstream publish", publish(&ns, dir, &publisher_file));
    publishing
        .line(|l| l.starts_with("connected to the broker at"))
        .await;
    let env_file = dir.join("w1.env");
    let mut agent = ns.command("worker", &binary("credstream-agent"));
    agent
        .arg("run")
        .arg("--join-file")
        .arg(&agent_file)
        .args([
            "--cluster",
            "c1",
            "--agent-id",
            "w1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--seal-key-file")
        .arg(dir.join("seal.key"))
        .arg("--env-file")
        .arg(&env_file)
        .env("RUST_LOG", "credstream_agent=info");
    let mut agent = Process::spawn("credstream-agent w1", agent);
    agent.stderr_line(|l| l.contains("env file written")).await;
    let env = std::fs::read_to_string(&env_file).expect("the agent's env file");
    assert!(
        env.lines().any(|l| l == "JOINED_SECRET='from-the-laptop'"),
        "the worker did not get the laptop's env: {env}"
    );

    // A man in the middle: broker B (another key) answers at an address a
    // copy of A's string names. The handshake fails on the pin; B never
    // sees a call. A call with A's token that B's key does get through
    // (B's pin) is recorded, so a token sent before would have been too.
    let printed_b = init(&ns, &state_b, &address_b, "1h").await;
    let pin_b = JoinString::parse(&printed(&printed_b, "CREDSTREAM_PUBLISHER_JOIN"))
        .expect("B's join string")
        .pins[0];
    assert!(!publisher.pins.contains(&pin_b), "A and B share a key");
    let _broker_b = serve(&ns, &state_b, &address_b).await;
    let to_b = JoinString::new(address_b.clone(), &publisher.token, publisher.pins.clone())
        .expect("a join string");
    let mitm = publish_fails(
        &ns,
        dir,
        "publish to B",
        &write_join(dir, "mitm.join", &to_b),
    )
    .await;
    assert!(
        mitm.contains("does not pin") && mitm.contains("No token was sent"),
        "{mitm}"
    );
    assert!(
        mitm.contains("get a new join string"),
        "the error names no fix: {mitm}"
    );
    let control =
        JoinString::new(address_b.clone(), &publisher.token, vec![pin_b]).expect("a join string");
    let refused = publish_fails(
        &ns,
        dir,
        "publish to B pinned",
        &write_join(dir, "control.join", &control),
    )
    .await;
    assert!(refused.contains("rejected the token"), "{refused}");
    let records = audit_records_at_least(&state_b, 1).await;
    assert_eq!(
        records.len(),
        1,
        "B recorded more than the one call that reached it: {records:?}"
    );
    assert_eq!(records[0]["event"], "call_refused", "{records:?}");
    assert_eq!(records[0]["code"], "Unauthenticated", "{records:?}");

    // A wrong pin: A's address and token, a key A does not hold.
    let wrong_pin = JoinString::new(address_a.clone(), &publisher.token, vec![SpkiPin([7; 32])])
        .expect("a join string");
    let wrong = publish_fails(
        &ns,
        dir,
        "publish with a wrong pin",
        &write_join(dir, "wrong-pin.join", &wrong_pin),
    )
    .await;
    assert!(
        wrong.contains("does not pin") && wrong.contains("get a new join string"),
        "{wrong}"
    );

    // An expired token: a string valid 1 s, used once the clock passed it.
    let before = SystemTime::now();
    let printed_short = init(&ns, &state_a, &address_a, "1s").await;
    let short_file = write_private_file(
        dir,
        "short.join",
        &printed(&printed_short, "CREDSTREAM_PUBLISHER_JOIN"),
    );
    // Token times are whole seconds: 2 s after `before` is past the expiry.
    let expired_at = before + Duration::from_secs(2);
    while let Ok(left) = expired_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    let expired = publish_fails(&ns, dir, "publish with an expired token", &short_file).await;
    assert!(expired.contains("expired"), "{expired}");
    assert!(
        expired.contains("fix:"),
        "the error names no fix: {expired}"
    );

    // A revoked key: A's ring now holds only a new key (SIGHUP reloads it);
    // the string signed by the old key is refused.
    let mut new_key = [0u8; 32];
    rand::Rng::fill(&mut rand::thread_rng(), &mut new_key[..]);
    let ring = format!(
        "credstream-keys v1\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(new_key)
    );
    std::fs::write(state_a.join("token-key"), ring).expect("rewrite the key ring");
    broker_a.signal("HUP");
    broker_a
        .stderr_line(|l| l.contains("token keys reloaded"))
        .await;
    let revoked = publish_fails(&ns, dir, "publish with a revoked key", &publisher_file).await;
    assert!(
        revoked.contains("rejected the token") && revoked.contains("removed from the key file"),
        "{revoked}"
    );
    assert!(
        revoked.contains("fix:"),
        "the error names no fix: {revoked}"
    );
    for output in [&mitm, &refused, &wrong, &expired, &revoked] {
        assert!(
            !output.contains(publisher.token.as_str()),
            "an error shows the token"
        );
    }
    drop(publishing);
    drop(agent);
}
