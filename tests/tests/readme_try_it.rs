//! Issue 32: the first hour. The commands README.md's "Try it" prints, and
//! the ones `credstream-broker --dev` prints, work when pasted in order on
//! a fresh machine: each test runs them as printed, by `bash`, in a fresh
//! HOME, with moto standing in for AWS (the "laptop" has moto's IAM user's
//! keys, the "worker" none) and the workspace's binaries.
//!
//! What the tests change, and only that: "Try it"'s `cargo build --release`
//! runs a stand-in `cargo` that checks its arguments (the test harness has
//! built the binaries, which `target/release/` in the test's folder links
//! to), and its broker listens on a free port instead of 50051, which every
//! block's `127.0.0.1:50051` is replaced with (the broker's own
//! `CREDSTREAM_LISTEN`). The `--dev` banner needs no change at all.

use std::path::{Path, PathBuf};

use std::time::Duration;

use credstream_tests::aws_login::{TemporaryCredentials, temporary_credentials};
use credstream_tests::bins::binary;
use credstream_tests::doc_blocks::{self, ShBlock};
use credstream_tests::moto::{Moto, Seeded, laptop_env, seed, worker_env};
use credstream_tests::processes::{Process, clean_command, free_low_port};
use credstream_tests::tools;
use tokio::process::Command;

/// The sh blocks between `<!-- try-it: begin` and `<!-- try-it: end -->`.
fn try_it_blocks(readme: &str) -> Vec<ShBlock> {
    doc_blocks::sh_blocks(doc_blocks::section(readme, "try-it"), "try-it")
}

/// The commands the `--dev` banner prints: its lines indented by exactly
/// two spaces, in order.
fn banner_commands(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("  "))
        .filter(|rest| !rest.starts_with(' ') && !rest.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One machine that is both the laptop and a worker: moto seeded and
/// enforcing authentication, a fresh HOME, a working folder.
struct Machine {
    python: PathBuf,
    moto: Moto,
    seeded: Seeded,
    /// The laptop's login: what a shell holds after `aws sts assume-role`
    /// or an SSO login (moto accepts only credentials it issued, and not
    /// those of `GetSessionToken`).
    login: TemporaryCredentials,
    dir: tempfile::TempDir,
}

impl Machine {
    async fn new(python: &Path) -> Machine {
        let moto = Moto::start(python).await;
        let seeded = seed(python, &moto).await;
        moto.require_auth().await;
        let login = temporary_credentials(python, &moto, &seeded, Duration::from_secs(3600)).await;
        let dir = tempfile::tempdir().unwrap();
        for sub in ["home", "work", "bin"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        Machine {
            python: python.to_owned(),
            moto,
            seeded,
            login,
            dir,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn work(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// `PATH`: the test's `bin` (stand-ins), the venv's `python`, the rest.
    fn path(&self) -> std::ffi::OsString {
        let mut path = vec![
            self.dir.path().join("bin"),
            self.python.parent().unwrap().to_owned(),
        ];
        path.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        std::env::join_paths(path).unwrap()
    }

    /// The laptop's environment: the role session's credentials, STS at
    /// moto, no Google login (a metadata server that refuses at once).
    fn laptop(&self) -> Vec<(String, String)> {
        let mut env = laptop_env(&self.moto, &self.seeded, &self.home());
        let login = &self.login;
        for (name, value) in [
            ("AWS_ACCESS_KEY_ID", &login.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", &login.secret_access_key),
            ("AWS_SESSION_TOKEN", &login.session_token),
            ("AWS_CREDENTIAL_EXPIRATION", &login.expiration_text),
        ] {
            env.retain(|(n, _)| n != name);
            env.push((name.into(), value.clone()));
        }
        env.push(("GCE_METADATA_HOST".into(), "127.0.0.1:9".into()));
        env
    }

    /// A worker's environment: no AWS credentials of its own, AWS calls to
    /// moto; the same HOME (one machine).
    fn worker(&self) -> Vec<(String, String)> {
        let mut env = worker_env(&self.moto, &self.home());
        env.push(("AWS_DEFAULT_REGION".into(), "us-east-1".into()));
        env
    }

    /// `bash -c script` in the working folder with `env`, in a process
    /// group of its own (a pipeline's processes are stopped together).
    fn shell(&self, name: &str, script: &str, env: &[(String, String)]) -> Shell {
        let mut command = clean_command("bash");
        command
            .args(["-c", script])
            .current_dir(self.work())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("PATH", self.path())
            .process_group(0);
        let process = Process::spawn(name, command);
        let group = process.pid();
        Shell { process, group }
    }
}

/// A shell and its process group, killed together when dropped.
struct Shell {
    process: Process,
    group: u32,
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.group)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Runs a shell to its end and returns its stdout, failing with its output
/// unless it succeeded.
async fn run_ok(mut shell: Shell) -> String {
    let status = shell.process.exit().await;
    assert!(status.success(), "{status}\n{}", shell.process.output());
    shell.process.stdout()
}

#[test]
fn blocks_and_banner_commands_are_found() {
    let doc = "x\n<!-- try-it: begin\nwhy\n-->\n<!-- try-it: background -->\n```sh\na\nb\n```\n\n```sh\nc\n```\n<!-- try-it: end -->\n```sh\nafter\n```\n";
    assert_eq!(
        try_it_blocks(doc),
        [
            ShBlock {
                script: "a\nb".into(),
                background: true
            },
            ShBlock {
                script: "c".into(),
                background: false
            }
        ]
    );
    let banner = "TOKEN=x\n\n1. Publish:\n   more prose\n  cmd one\n\n  cmd two\n";
    assert_eq!(banner_commands(banner), ["cmd one", "cmd two"]);
}

/// README "Try it", pasted in order: the broker (terminal 1), `publish`
/// from the laptop (terminal 2), and on the "worker" the seal key and
/// `agent exec` running boto3, which reads through the agent the
/// credentials moto's STS issued to the laptop's user (terminal 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv (boto3, moto): set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn readme_try_it_runs_as_printed() {
    let Some(python) = tools::python("readme_try_it_runs_as_printed") else {
        return;
    };
    let readme = std::fs::read_to_string(tools::repo_root().join("README.md")).unwrap();
    let blocks = try_it_blocks(&readme);
    assert_eq!(blocks.len(), 3, "{blocks:#?}");
    assert!(blocks[0].background && blocks[1].background && !blocks[2].background);
    for block in &blocks[1..] {
        assert!(block.script.contains("127.0.0.1:50051"), "{}", block.script);
    }

    let machine = Machine::new(&python).await;
    // `target/release/` of the README's folder: the binaries under test.
    let release = machine.work().join("target/release");
    std::fs::create_dir_all(&release).unwrap();
    for name in ["credstream-broker", "credstream", "credstream-agent"] {
        std::os::unix::fs::symlink(binary(name), release.join(name)).unwrap();
    }
    let cargo = machine.dir.path().join("bin/cargo");
    std::fs::write(
        &cargo,
        "#!/bin/sh\n[ \"$*\" = 'build --release' ] || { echo \"unexpected: cargo $*\" >&2; exit 1; }\n",
    )
    .unwrap();
    std::fs::set_permissions(&cargo, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let port = free_low_port();
    let addr = format!("127.0.0.1:{port}");
    let script = |block: &ShBlock| block.script.replace("127.0.0.1:50051", &addr);

    // Terminal 1: the broker, its banner also in broker.out.
    let broker_env = vec![
        ("HOME".to_owned(), machine.home().display().to_string()),
        ("CREDSTREAM_LISTEN".to_owned(), addr.clone()),
    ];
    let mut terminal1 = machine.shell("terminal 1", &script(&blocks[0]), &broker_env);
    terminal1
        .process
        .line(|l| l.starts_with("CREDSTREAM_ADMIN_TOKEN="))
        .await;
    terminal1
        .process
        .line(|l| l.contains(" status --broker "))
        .await;

    // Terminal 2: publish from the laptop; it minted and delivered.
    let mut terminal2 = machine.shell("terminal 2", &script(&blocks[1]), &machine.laptop());
    let minted = terminal2
        .process
        .line(|l| l.starts_with("minted AWS"))
        .await;
    assert!(minted.contains("cluster-reader"), "{minted}");

    // Terminal 3: the worker runs boto3 through the agent.
    let out = run_ok(machine.shell("terminal 3", &script(&blocks[2]), &machine.worker())).await;
    assert!(
        out.lines()
            .any(|l| l.starts_with("arn:aws:") && l.contains("cluster-reader")),
        "boto3 printed no ARN of the laptop's role:\n{out}"
    );
    let key = std::fs::metadata(machine.work().join("dev.seal-key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o777,
        0o600
    );
    assert!(
        !terminal2.process.has_exited(),
        "{}",
        terminal2.process.output()
    );
    assert!(
        !terminal1.process.has_exited(),
        "{}",
        terminal1.process.output()
    );
}

/// `credstream-broker --dev`'s banner, pasted as printed: publish (left
/// running), the seal key, `agent exec` (which starts its command once the
/// sealed credentials arrived), and `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(tool_python),
    ignore = "needs the project's Python venv (moto): set CREDSTREAM_TEST_PYTHON (scripts/test.sh does)"
)]
async fn dev_banner_commands_run_as_printed() {
    let Some(python) = tools::python("dev_banner_commands_run_as_printed") else {
        return;
    };
    let machine = Machine::new(&python).await;
    let mut broker = Command::new(binary("credstream-broker"));
    broker
        .args(["--listen", "127.0.0.1:0", "--dev"])
        .env_clear()
        .env("HOME", machine.home());
    let mut broker = Process::spawn("credstream-broker --dev", broker);
    broker.line(|l| l.contains(" status --broker ")).await;
    let commands = banner_commands(&broker.stdout());
    let steps = [" publish ", " seal-key ", " exec ", " status "];
    assert!(
        commands.len() == steps.len()
            && commands.iter().zip(steps).all(|(c, step)| c.contains(step)),
        "the banner's commands, in order:\n{}",
        broker.stdout()
    );

    let mut publish = machine.shell("publish", &commands[0], &machine.laptop());
    let minted = publish.process.line(|l| l.starts_with("minted AWS")).await;
    assert!(minted.contains("cluster-reader"), "{minted}");

    run_ok(machine.shell("seal-key", &commands[1], &machine.worker())).await;
    let out = run_ok(machine.shell("agent exec", &commands[2], &machine.worker())).await;
    assert!(
        out.contains("ready: credentials served at http://127.0.0.1:"),
        "{out}"
    );
    let status = run_ok(machine.shell("status", &commands[3], &machine.laptop())).await;
    assert!(status.contains("cluster-reader"), "{status}");
    assert!(
        !publish.process.has_exited(),
        "{}",
        publish.process.output()
    );
}
