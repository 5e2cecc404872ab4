//! The systemd units in `deploy/systemd/`: `systemd-analyze verify` (Debian's
//! `systemd` package, found through `CREDSTREAM_TEST_SYSTEMD_ANALYZE`, which
//! `scripts/test.sh` sets) accepts each of them without a single warning,
//! and each keeps the hardening and credential handling the README promises.
//!
//! `verify` also checks that every `ExecStart=` program exists and is
//! executable, so the units are verified with `/usr/local/bin/` (where the
//! README installs the binaries) replaced by the directory of the binaries
//! this workspace just built; nothing else in them is changed.
//!
//! systemd cannot start units here (it is not PID 1), so what the agent and
//! workload units promise about users (finding 3 of issue 34: the workload
//! must not read the agent's broker token or seal key) is shown with real
//! processes as the units lay them out: as root, the agent unit's own
//! `ExecStart=` runs under one uid with its credentials in a directory as
//! systemd makes it, and the workload runs under another uid with the
//! environment the workload unit gives it
//! (`the_workload_user_reaches_its_credentials_but_not_the_agent_token_or_seal_key`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use credstream_broker::auth::Role;
use credstream_client::session::PublishSession;
use credstream_proto::seal::SealKey;
use credstream_proto::v1::CredentialKind;
use credstream_tests::bins::binary;
use credstream_tests::broker::{TestBroker, WAIT};
use credstream_tests::child::{CHILD_ENV, in_child};
use credstream_tests::minter::CountingMinter;
use credstream_tests::processes::{Process, clean_command};
use credstream_tests::publish::local_address;
use credstream_tests::sealed_agent::{aws_credentials_at, parse_env_file};
use credstream_tests::tools::{missing, repo_root};

/// The units, and the instance each template is verified as.
const UNITS: &[(&str, &str)] = &[
    ("credstream-broker.service", "credstream-broker.service"),
    (
        "credstream-agent@.service",
        "credstream-agent@analysis.service",
    ),
    (
        "credstream-publish@.service",
        "credstream-publish@analysis.service",
    ),
    (
        "credstream-workload@.service",
        "credstream-workload@analysis.service",
    ),
];

/// The agent unit and the workload unit it serves.
const AGENT_UNIT: &str = "credstream-agent@.service";
const WORKLOAD_UNIT: &str = "credstream-workload@.service";

/// What every unit must say (key=value lines, exactly).
const HARDENING: &[&str] = &[
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "DynamicUser=yes",
    "CapabilityBoundingSet=",
    "RestrictSUIDSGID=yes",
    "SystemCallFilter=@system-service",
    "UMask=0077",
];

fn systemd_analyze(test: &str) -> Option<PathBuf> {
    const VAR: &str = "CREDSTREAM_TEST_SYSTEMD_ANALYZE";
    match std::env::var_os(VAR).map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            missing(
                test,
                &format!(
                    "systemd-analyze (Debian's systemd package; set {VAR}, scripts/test.sh provides it)"
                ),
            );
            None
        }
    }
}

fn unit_text(name: &str) -> String {
    let path = repo_root().join("deploy/systemd").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect()
}

/// The value of every `key=` line.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    lines(text)
        .into_iter()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
#[cfg_attr(
    not(tool_systemd_analyze),
    ignore = "needs systemd-analyze: set CREDSTREAM_TEST_SYSTEMD_ANALYZE (scripts/test.sh does)"
)]
fn systemd_analyze_verify_accepts_every_unit_without_a_warning() {
    let test = "systemd_analyze_verify_accepts_every_unit_without_a_warning";
    let Some(analyze) = systemd_analyze(test) else {
        return;
    };
    // Built (or rebuilt) now, so verify finds the real executables.
    let bin_dir = binary("credstream-broker")
        .parent()
        .expect("target dir")
        .to_path_buf();
    for name in ["credstream", "credstream-agent"] {
        binary(name);
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, _) in UNITS {
        let text = unit_text(file);
        assert!(
            *file == WORKLOAD_UNIT || text.contains("ExecStart=/usr/local/bin/credstream"),
            "{file} runs the binary from /usr/local/bin"
        );
        let local = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        std::fs::write(dir.path().join(file), local).unwrap();
    }
    for (file, instance) in UNITS {
        let output = verify(&analyze, dir.path(), instance);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stderr.trim().is_empty() && stdout.trim().is_empty(),
            "systemd-analyze verify {instance} ({file}): {}\n{stdout}{stderr}",
            output.status
        );
    }

    // The check can fail: a unit with an unknown key or a bad value draws a
    // warning, which the loop above would have reported.
    let broken = unit_text("credstream-broker.service")
        .replace("/usr/local/bin/", &format!("{}/", bin_dir.display()))
        .replace("ProtectSystem=strict", "ProtectSystem=very-strict");
    std::fs::write(dir.path().join("credstream-broker.service"), broken).unwrap();
    let output = verify(&analyze, dir.path(), "credstream-broker.service");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ProtectSystem") || stderr.contains("protect system"),
        "a bad value is reported: {stderr}"
    );
}

fn verify(analyze: &Path, dir: &Path, unit: &str) -> std::process::Output {
    Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.join(unit))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze")
}

#[test]
fn units_are_hardened_and_take_secrets_only_through_load_credential() {
    for (file, _) in UNITS {
        let text = unit_text(file);
        let present = lines(&text);
        for line in HARDENING {
            assert!(present.contains(line), "{file} lacks {line}");
        }
        assert!(
            !values(&text, "LimitNOFILE").is_empty(),
            "{file} sets LimitNOFILE"
        );
        // Secrets: each is a LoadCredential= whose file the command reads
        // from the credentials directory (%d); none is in Environment=. The
        // workload has none: it runs as another user than the agent so that
        // it cannot read the agent's.
        let credentials = values(&text, "LoadCredential");
        assert_eq!(
            credentials.is_empty(),
            *file == WORKLOAD_UNIT,
            "{file}: only the workload loads no credential"
        );
        let exec = values(&text, "ExecStart").join(" ");
        for credential in &credentials {
            let (id, source) = credential.split_once(':').expect("ID:PATH");
            assert!(source.starts_with("/etc/credstream/"), "{file}: {source}");
            assert!(
                exec.contains(&format!("%d/{id}")),
                "{file}: ExecStart reads credential {id} from %d"
            );
        }
        for value in values(&text, "Environment") {
            let upper = value.to_ascii_uppercase();
            assert!(
                !upper.contains("TOKEN") && !upper.contains("KEY") && !upper.contains("SECRET"),
                "{file}: a secret in Environment={value}"
            );
        }
    }
}

#[test]
fn a_taken_over_publisher_is_not_restarted() {
    // `credstream publish` exits 3 when another publisher took the cluster
    // over (client/src/cli/publish.rs, EXIT_TAKEN_OVER; its --help says so).
    let text = unit_text("credstream-publish@.service");
    assert_eq!(values(&text, "Restart"), ["on-failure"]);
    assert_eq!(values(&text, "RestartPreventExitStatus"), ["3"]);
    let help = Command::new(binary("credstream"))
        .args(["help", "publish"])
        .output()
        .expect("credstream help publish");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("RestartPreventExitStatus=3"),
        "credstream publish --help names exit status 3: {help}"
    );
}

/// The one value of `key=` in a unit, or a failure naming the unit.
fn value<'a>(file: &str, text: &'a str, key: &str) -> &'a str {
    match values(text, key).as_slice() {
        [one] => one,
        other => panic!("{file}: expected one {key}=, found {other:?}"),
    }
}

/// The value of `--flag VALUE` in a command line.
fn flag<'a>(command: &'a str, name: &str) -> Option<&'a str> {
    let mut words = command.split_whitespace();
    words.find(|w| *w == name)?;
    words.next()
}

#[test]
fn the_agent_and_its_workload_run_as_two_users_and_only_the_agent_holds_secrets() {
    // Finding 3 (issue 34): the agent unit used to run the worker itself
    // (`credstream-agent exec`), as the agent's user, which can read the
    // agent token in the credentials directory.
    let agent = unit_text(AGENT_UNIT);
    let exec = value(AGENT_UNIT, &agent, "ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        words[..2],
        ["/usr/local/bin/credstream-agent", "run"],
        "the agent unit runs the agent alone: {exec}"
    );
    assert!(!words.contains(&"--"), "no command after --: {exec}");
    // The seal key is loaded like the token, from a root-only file, and the
    // agent reads systemd's copy (0400, owned by the service's user: the
    // private-file rule accepts that, see the uid test below).
    let mut credentials = values(&agent, "LoadCredential");
    credentials.sort_unstable();
    assert_eq!(
        credentials,
        [
            "agent-token:/etc/credstream/agent-%i.token",
            "seal-key:/etc/credstream/seal-%i.key"
        ]
    );
    assert_eq!(flag(exec, "--token-file"), Some("%d/agent-token"));
    assert_eq!(flag(exec, "--seal-key-file"), Some("%d/seal-key"));
    assert_eq!(
        flag(exec, "--state-file"),
        Some("%S/credstream-agent/%i/sealed-sequences"),
        "the sealed sequences survive a restart, in the state directory"
    );
    let env_file = flag(exec, "--env-file").expect("the agent writes an env file");
    assert_eq!(env_file, "%t/credstream-agent/%i/env");
    assert_eq!(
        value(AGENT_UNIT, &agent, "RuntimeDirectory"),
        "credstream-agent/%i"
    );
    assert_eq!(value(AGENT_UNIT, &agent, "RuntimeDirectoryMode"), "0700");
    assert_eq!(value(AGENT_UNIT, &agent, "StateDirectoryMode"), "0700");
    // Ready (READY=1) only once the env file is written; it may take as
    // long as the publisher does, and boot does not wait for it.
    assert_eq!(value(AGENT_UNIT, &agent, "Type"), "notify");
    assert_eq!(value(AGENT_UNIT, &agent, "NotifyAccess"), "main");
    assert_eq!(value(AGENT_UNIT, &agent, "TimeoutStartSec"), "infinity");
    for line in [
        "DynamicUser=yes",
        "ProtectProc=invisible",
        "PrivateUsers=yes",
        "MemoryDenyWriteExecute=yes",
        "UMask=0077",
        "DefaultDependencies=no",
        "Conflicts=shutdown.target",
    ] {
        assert!(lines(&agent).contains(&line), "{AGENT_UNIT} lacks {line}");
    }
    assert!(
        values(&agent, "User").is_empty() && values(&agent, "Group").is_empty(),
        "{AGENT_UNIT}: a dynamic user of its own"
    );

    let workload = unit_text(WORKLOAD_UNIT);
    // Another unit with a dynamic user: another uid, which systemd gives no
    // access to the agent's credentials, runtime or state directories.
    for line in [
        "DynamicUser=yes",
        "ProtectProc=invisible",
        "NoNewPrivileges=yes",
        "UMask=0077",
        "DefaultDependencies=no",
        "Conflicts=shutdown.target",
    ] {
        assert!(
            lines(&workload).contains(&line),
            "{WORKLOAD_UNIT} lacks {line}"
        );
    }
    assert!(
        values(&workload, "User").is_empty() && values(&workload, "Group").is_empty(),
        "{WORKLOAD_UNIT}: a dynamic user of its own, not the agent's"
    );
    assert!(
        !workload.contains("%d") && !lines(&workload).iter().any(|l| l.contains("Credential")),
        "{WORKLOAD_UNIT} names no credential"
    );
    for key in [
        "RuntimeDirectory",
        "StateDirectory",
        "ReadWritePaths",
        "ReadOnlyPaths",
    ] {
        for path in values(&workload, key) {
            assert!(
                !path.contains("credstream-agent"),
                "{WORKLOAD_UNIT}: {key}={path} reaches into the agent's files"
            );
        }
    }
    // Started once the agent is ready, stopped with it.
    assert_eq!(
        value(WORKLOAD_UNIT, &workload, "BindsTo"),
        "credstream-agent@%i.service"
    );
    assert!(
        values(&workload, "After").contains(&"credstream-agent@%i.service"),
        "{WORKLOAD_UNIT} is ordered after the agent"
    );
    // Its environment: the agent's env file, read by systemd as root, less
    // the path of the token file this user cannot open.
    assert_eq!(
        values(&workload, "EnvironmentFile"),
        ["/etc/credstream/workload-%i.env", env_file],
        "the agent's env file comes last, so its pointers win"
    );
    assert_eq!(
        value(WORKLOAD_UNIT, &workload, "UnsetEnvironment"),
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"
    );
    assert_eq!(
        value(WORKLOAD_UNIT, &workload, "ExecStart"),
        "/usr/bin/env $CREDSTREAM_WORKLOAD"
    );
}

/// Uids for the agent's and the workload's users in the test below: below
/// systemd's dynamic range (61184-65519) and above adduser's (to 59999),
/// so no real account or running service owns them.
const AGENT_UID: u32 = 60_901;
const WORKLOAD_UID: u32 = 60_902;

/// What the probe (the workload's side, re-run as a child) is told.
const PROBE_AS: &str = "PROBE_AS";
const PROBE_AGENT_PID: &str = "PROBE_AGENT_PID";
const PROBE_SECRETS: &str = "PROBE_SECRETS";
const PROBE_DIRECTORIES: &str = "PROBE_DIRECTORIES";
const PROBE_ACCESS_KEY: &str = "PROBE_ACCESS_KEY";
const SETPRIV: &str = "/usr/bin/setpriv";
const CLUSTER: &str = "analysis";

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// `text` with the systemd specifiers it uses replaced.
fn specifiers(text: &str, map: &[(&str, &Path)]) -> String {
    let mut out = text.to_owned();
    for (specifier, path) in map {
        out = out.replace(specifier, &path.display().to_string());
    }
    out
}

fn own(path: &Path, uid: u32, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory as systemd's `RuntimeDirectory=`/`StateDirectory=`/the
/// credentials directory make it: owned by the service's user.
fn service_dir(path: &Path, uid: u32, mode: u32) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    own(path, uid, mode);
    path.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_workload_user_reaches_its_credentials_but_not_the_agent_token_or_seal_key() {
    let test = "the_workload_user_reaches_its_credentials_but_not_the_agent_token_or_seal_key";
    if in_child() {
        return probe().await;
    }
    if !is_root() {
        missing(
            test,
            "root (to run the agent and the workload as two users, as the units do)",
        );
        return;
    }
    if !Path::new(SETPRIV).exists() {
        missing(test, "setpriv (util-linux)");
        return;
    }
    let broker = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Both users may pass through, not list.
    own(dir.path(), 0, 0o711);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let run = service_dir(&dir.path().join("run"), 0, 0o755);
    let lib = service_dir(&dir.path().join("lib"), 0, 0o755);
    let credentials = dir.path().join("credentials");
    let map: [(&str, &Path); 5] = [
        ("%i", Path::new(CLUSTER)),
        ("%H", Path::new(hostname.trim())),
        ("%d", &credentials),
        ("%t", &run),
        ("%S", &lib),
    ];

    // The agent unit's directories and credentials, as systemd lays them
    // out: the credentials directory 0500 and its files 0400, owned by the
    // service's user.
    let agent_unit = unit_text(AGENT_UNIT);
    let workload_unit = unit_text(WORKLOAD_UNIT);
    service_dir(&credentials, AGENT_UID, 0o700);
    let agent_token = broker.token(Role::Agent, Some(CLUSTER));
    let seal_key = SealKey::generate(CLUSTER);
    for credential in values(&agent_unit, "LoadCredential") {
        let (id, _) = credential.split_once(':').unwrap();
        let text = match id {
            "agent-token" => agent_token.clone(),
            "seal-key" => seal_key.encode().as_str().to_owned(),
            other => panic!("{AGENT_UNIT}: unexpected credential {other}"),
        };
        let path = credentials.join(id);
        std::fs::write(&path, format!("{text}\n")).unwrap();
        own(&path, AGENT_UID, 0o400);
    }
    own(&credentials, AGENT_UID, 0o500);
    let runtime = specifiers(value(AGENT_UNIT, &agent_unit, "RuntimeDirectory"), &map);
    let runtime = service_dir(&run.join(runtime), AGENT_UID, 0o700);
    let state = specifiers(value(AGENT_UNIT, &agent_unit, "StateDirectory"), &map);
    let state = service_dir(&lib.join(state), AGENT_UID, 0o700);
    let home = specifiers(value(WORKLOAD_UNIT, &workload_unit, "StateDirectory"), &map);
    service_dir(&lib.join(home), WORKLOAD_UID, 0o700);

    // The publisher seals; the agent runs its unit's ExecStart= under its
    // uid, told where to send READY=1 as systemd tells a Type=notify
    // service.
    let minter = CountingMinter::new(CredentialKind::Aws, Duration::from_secs(3600));
    let session = PublishSession::builder(local_address(
        &broker.url(),
        &broker.token(Role::Publisher, Some(CLUSTER)),
        CLUSTER,
    ))
    .minter(minter.clone())
    .private_env([("AUTH_TOKEN_FOR_CUSTOM_DATABASE", "sealed-env")])
    .seal(seal_key.clone())
    .start()
    .unwrap();
    let notify_path = dir.path().join("notify");
    let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    own(&notify_path, AGENT_UID, 0o600);
    let exec = specifiers(value(AGENT_UNIT, &agent_unit, "ExecStart"), &map).replace(
        "/usr/local/bin/credstream-agent",
        &binary("credstream-agent").display().to_string(),
    );
    let env_file = PathBuf::from(flag(&exec, "--env-file").unwrap());
    let state_file = PathBuf::from(flag(&exec, "--state-file").unwrap());
    let mut command = clean_command(SETPRIV);
    command
        .args(as_user(AGENT_UID))
        .args(exec.split_whitespace())
        .env("CREDSTREAM_BROKER", broker.url())
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "credstream_agent=info");
    for assignment in values(&agent_unit, "Environment") {
        let (name, value) = assignment.split_once('=').unwrap();
        command.env(name, specifiers(value, &map));
    }
    let mut agent = Process::spawn("credstream-agent (as the agent's user)", command);

    // READY=1 comes once the env file the workload unit reads is written.
    let mut datagram = [0u8; 256];
    let n = tokio::time::timeout(WAIT, notify.recv(&mut datagram))
        .await
        .unwrap_or_else(|_| panic!("no READY=1 from the agent\n{}", agent.output()))
        .unwrap();
    assert_eq!(&datagram[..n], b"READY=1\n", "{}", agent.output());
    let written = std::fs::read_to_string(&env_file)
        .unwrap_or_else(|e| panic!("READY=1 before the env file: {e}\n{}", agent.output()));
    assert!(
        !agent.has_exited(),
        "the agent runs under its own uid\n{}",
        agent.output()
    );

    // The workload's environment, as the workload unit makes it: its
    // EnvironmentFile= lines (read by systemd, as root: here the test)
    // less UnsetEnvironment=, plus its Environment= lines.
    let mut env = parse_env_file(&written);
    let unset = value(WORKLOAD_UNIT, &workload_unit, "UnsetEnvironment");
    for name in unset.split_whitespace() {
        assert!(env.remove(name).is_some(), "the env file names {name}");
    }
    for assignment in values(&workload_unit, "Environment") {
        let (name, value) = assignment.split_once('=').unwrap();
        env.insert(name.to_owned(), specifiers(value, &map));
    }
    assert_eq!(env["AUTH_TOKEN_FOR_CUSTOM_DATABASE"], "sealed-env");
    let seal_line = seal_key.encode();
    for (name, value) in &env {
        assert!(
            !value.contains(agent_token.as_str()) && !value.contains(seal_line.as_str()),
            "the workload's {name} carries an agent secret"
        );
    }

    let secrets = [
        credentials.join("agent-token"),
        credentials.join("seal-key"),
        env_file.clone(),
        state_file,
    ];
    let directories = [credentials.clone(), runtime, state];
    let join = |paths: &[PathBuf]| {
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    };
    let probe_env = |who: &str| {
        let mut all: Vec<(String, String)> = env.clone().into_iter().collect();
        all.extend([
            (PROBE_AS.to_owned(), who.to_owned()),
            (PROBE_AGENT_PID.to_owned(), agent.pid().to_string()),
            (PROBE_SECRETS.to_owned(), join(&secrets)),
            (PROBE_DIRECTORIES.to_owned(), join(&directories)),
            (PROBE_ACCESS_KEY.to_owned(), "ASIAmint1".to_owned()),
        ]);
        all
    };
    // The workload's user: its credentials through the endpoint, nothing of
    // the agent's.
    run_probe_as(test, WORKLOAD_UID, &probe_env("workload")).await;
    // The control: the agent's own user (where the worker ran before)
    // reads the token and key files; only non-dumpability keeps /proc out.
    run_probe_as(test, AGENT_UID, &probe_env("agent")).await;

    agent.signal("TERM");
    assert!(agent.exit().await.success(), "{}", agent.output());
    assert!(
        !env_file.exists(),
        "the env file is removed when the agent stops"
    );
    session.shutdown().await.unwrap();
}

/// `setpriv`'s arguments to run a command as `uid` (group `uid`, no
/// supplementary groups), as a dynamic user runs.
fn as_user(uid: u32) -> [String; 4] {
    [
        format!("--reuid={uid}"),
        format!("--regid={uid}"),
        "--clear-groups".to_owned(),
        "--".to_owned(),
    ]
}

/// Runs this test's binary again as `uid`, with exactly `env`, to play the
/// workload ([`probe`]); fails with its output if the probe fails.
async fn run_probe_as(test: &str, uid: u32, env: &[(String, String)]) {
    let exe = std::env::current_exe().unwrap();
    let mut command = clean_command(SETPRIV);
    command
        .args(as_user(uid))
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .envs(env.iter().map(|(k, v)| (k, v)));
    let mut probe = Process::spawn(&format!("probe as uid {uid}"), command);
    let status = probe.exit().await;
    assert!(
        status.success() && probe.stdout().contains("1 passed"),
        "{}",
        probe.output()
    );
}

/// The workload's side, in a child running as another uid: what it can
/// reach and what it cannot.
async fn probe() {
    use std::io::ErrorKind::PermissionDenied;
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is set"));
    let same_user = var(PROBE_AS) == "agent";
    let split = |name: &str| var(name).split(':').map(PathBuf::from).collect::<Vec<_>>();

    // The pointers work: the endpoint serves the sealed credential with
    // the local authorization token the environment carries.
    assert!(
        std::env::var_os("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE").is_none(),
        "the unreadable token file's path is not handed on"
    );
    assert!(
        std::env::vars().all(|(name, _)| !name.starts_with("CREDSTREAM_") || name == CHILD_ENV),
        "no agent setting reaches the workload"
    );
    let (status, body) = aws_credentials_at(
        &var("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
        &var("AWS_CONTAINER_AUTHORIZATION_TOKEN"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["AccessKeyId"], var(PROBE_ACCESS_KEY));
    assert_eq!(var("AUTH_TOKEN_FOR_CUSTOM_DATABASE"), "sealed-env");

    // The agent's process: non-dumpable, so not even its own user reads
    // its environment, memory or descriptors.
    let pid = var(PROBE_AGENT_PID);
    for entry in ["environ", "mem"] {
        let path = format!("/proc/{pid}/{entry}");
        let error = std::fs::read(&path).expect_err(&path);
        assert_eq!(error.kind(), PermissionDenied, "{path}: {error}");
    }
    let fds = format!("/proc/{pid}/fd");
    let error = std::fs::read_dir(&fds).expect_err(&fds);
    assert_eq!(error.kind(), PermissionDenied, "{fds}: {error}");

    // The agent's files: the token and seal key in the credentials
    // directory, the env file, the state file, and the directories.
    for path in split(PROBE_SECRETS) {
        let read = std::fs::read(&path);
        if same_user && path.starts_with(&split(PROBE_DIRECTORIES)[0]) {
            // Why the workload needs a user of its own.
            assert!(read.is_ok(), "the agent's user reads {}", path.display());
        } else if !same_user {
            let error = read.expect_err(&path.display().to_string());
            assert_eq!(
                error.kind(),
                PermissionDenied,
                "{}: {error}",
                path.display()
            );
        }
    }
    for path in split(PROBE_DIRECTORIES) {
        let listed = std::fs::read_dir(&path);
        if same_user {
            assert!(listed.is_ok(), "the agent's user lists {}", path.display());
        } else {
            let error = listed.expect_err(&path.display().to_string());
            assert_eq!(
                error.kind(),
                PermissionDenied,
                "{}: {error}",
                path.display()
            );
        }
    }
}
