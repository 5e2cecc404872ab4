//! Real processes for end-to-end tests: spawned with an environment of
//! their own, their output collected line by line so a test can wait for a
//! line (with a timeout, never a sleep), signalled by PID, and killed when
//! dropped. A test that panics prints the output of every process it still
//! holds.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use credstream_proto::connect::CallCredentials;
use credstream_proto::v1::admin_service_client::AdminServiceClient;
use credstream_proto::v1::{ClusterStatus, GetClusterRequest};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::watch;
use tonic::Status;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How long a process may take to print an awaited line or to exit before
/// the test fails. Generous: Python imports and moto start on 2 busy cores.
pub const PROCESS_WAIT: Duration = Duration::from_secs(90);

/// A command for `program` with an empty environment except `PATH`, so
/// nothing of the test runner's environment (credentials, `CREDSTREAM_*`)
/// leaks into the process; add what it needs with `.env(..)`.
pub fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    command.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    command
}

/// A loopback port below 32768 that was free a moment ago, for a server
/// that cannot bind port 0 and report it (moto, HAProxy). Above 32768 is
/// the ephemeral range, where a client's port may take it in between
/// (docs/facts.md, fact 18).
pub fn free_low_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running process and everything it printed so far.
pub struct Process {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: watch::Receiver<Vec<String>>,
    stderr: watch::Receiver<Vec<String>>,
    exit: Option<ExitStatus>,
}

fn collect(
    stream: Option<impl AsyncRead + Unpin + Send + 'static>,
) -> watch::Receiver<Vec<String>> {
    let (tx, rx) = watch::channel(Vec::new());
    if let Some(stream) = stream {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tx.send_modify(|all| all.push(line));
            }
        });
    }
    rx
}

impl Process {
    /// Spawns `command` (stdin, stdout and stderr piped); `name` labels its
    /// output in failure messages.
    pub fn spawn(name: &str, mut command: Command) -> Process {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
        let stdin = child.stdin.take();
        let stdout = collect(child.stdout.take());
        let stderr = collect(child.stderr.take());
        Process {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
            stderr,
            exit: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is still running")
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.borrow().join("\n")
    }

    /// Everything printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.borrow().join("\n")
    }

    /// Both streams, labelled, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            self.stdout(),
            self.name,
            self.stderr()
        )
    }

    /// Waits for the `nth` (1-based) stdout line that satisfies `accept`
    /// and returns it. Fails with the process output if the stream closes
    /// first or the wait exceeds [`PROCESS_WAIT`].
    pub async fn nth_line(&mut self, nth: usize, accept: impl Fn(&str) -> bool) -> String {
        let stdout = self.stdout.clone();
        self.nth_line_of(stdout, nth, accept).await
    }

    /// Like [`Process::line`], on stderr.
    pub async fn stderr_line(&mut self, accept: impl Fn(&str) -> bool) -> String {
        let stderr = self.stderr.clone();
        self.nth_line_of(stderr, 1, accept).await
    }

    /// True once the process has exited.
    pub fn has_exited(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit.is_some()
    }

    /// Waits for the first stderr line that satisfies `accept`; `None` if
    /// stderr closes (the process ended) without one.
    pub async fn stderr_line_or_end(&mut self, accept: impl Fn(&str) -> bool) -> Option<String> {
        let stderr = self.stderr.clone();
        match tokio::time::timeout(PROCESS_WAIT, self.find_line(stderr, 1, accept)).await {
            Ok(found) => found.ok(),
            Err(_) => panic!(
                "{} printed neither the awaited line nor ended within {PROCESS_WAIT:?}\n{}",
                self.name,
                self.output()
            ),
        }
    }

    async fn nth_line_of(
        &mut self,
        lines: watch::Receiver<Vec<String>>,
        nth: usize,
        accept: impl Fn(&str) -> bool,
    ) -> String {
        match tokio::time::timeout(PROCESS_WAIT, self.find_line(lines, nth, accept)).await {
            Ok(Ok(line)) => line,
            Ok(Err(why)) => panic!(
                "{} did not print the awaited line ({why}; exit {:?})\n{}",
                self.name,
                self.exit,
                self.output()
            ),
            Err(_) => panic!(
                "{} did not print the awaited line within {PROCESS_WAIT:?}\n{}",
                self.name,
                self.output()
            ),
        }
    }

    async fn find_line(
        &mut self,
        mut lines: watch::Receiver<Vec<String>>,
        nth: usize,
        accept: impl Fn(&str) -> bool,
    ) -> Result<String, &'static str> {
        let found = |lines: &Vec<String>| lines.iter().filter(|l| accept(l)).nth(nth - 1).cloned();
        loop {
            if let Some(line) = found(&lines.borrow_and_update()) {
                return Ok(line);
            }
            tokio::select! {
                changed = lines.changed() => if changed.is_err() {
                    // The writer is gone: the stream closed, one last look.
                    return found(&lines.borrow()).ok_or("the stream closed");
                },
                status = self.child.wait(), if self.exit.is_none() => {
                    self.exit = status.ok();
                }
            }
        }
    }

    /// Waits for the first stdout line that satisfies `accept`.
    pub async fn line(&mut self, accept: impl Fn(&str) -> bool) -> String {
        self.nth_line(1, accept).await
    }

    /// Writes one line to the process's stdin.
    pub async fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to stdin");
        stdin.flush().await.expect("flush stdin");
    }

    /// Closes stdin (EOF for the process).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Sends a signal (`"TERM"`, `"INT"`, …) to the process by its PID.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// Waits for the process to exit and returns its status, after its
    /// output has been read to the end.
    pub async fn exit(&mut self) -> ExitStatus {
        let wait = async {
            let status = match self.exit {
                Some(status) => status,
                None => self.child.wait().await.expect("wait for the process"),
            };
            let _ = self.stdout.clone().wait_for(|_| false).await;
            let _ = self.stderr.clone().wait_for(|_| false).await;
            status
        };
        match tokio::time::timeout(PROCESS_WAIT, wait).await {
            Ok(status) => {
                self.exit = Some(status);
                status
            }
            Err(_) => panic!(
                "{} did not exit within {PROCESS_WAIT:?}\n{}",
                self.name,
                self.output()
            ),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.output());
        }
        // kill_on_drop sends SIGKILL to this PID; reap it if it is quick.
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

/// `credstream-broker --listen 127.0.0.1:0 --dev` as a process, with the
/// tokens it printed for cluster `dev`.
pub struct BrokerProcess {
    /// The process.
    pub process: Process,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// A publisher token for cluster `dev`.
    pub publisher_token: String,
    /// An agent token for cluster `dev`.
    pub agent_token: String,
    /// An admin token.
    pub admin_token: String,
}

impl BrokerProcess {
    /// Starts the development broker and reads its banner.
    pub async fn start_dev() -> BrokerProcess {
        Self::start_dev_with(&[]).await
    }

    /// Starts the development broker with extra flags.
    pub async fn start_dev_with(args: &[&str]) -> BrokerProcess {
        Self::start_dev_under(&[], args).await
    }

    /// Starts the development broker with extra flags, under a wrapper
    /// command such as `prlimit --nofile=128:256 --`.
    pub async fn start_dev_under(wrapper: &[&str], args: &[&str]) -> BrokerProcess {
        let broker = crate::bins::binary("credstream-broker");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = clean_command(program);
                command.args(rest).arg(broker);
                command
            }
            None => clean_command(broker),
        };
        command
            .args(["--listen", "127.0.0.1:0", "--dev"])
            .args(args)
            .env("RUST_LOG", "info");
        let mut process = Process::spawn("credstream-broker", command);
        let listening = process.line(|l| l.starts_with("listening on ")).await;
        let value = |line: String| line.split_once('=').expect("NAME=value").1.to_owned();
        let publisher_token = value(
            process
                .line(|l| l.starts_with("CREDSTREAM_PUBLISHER_TOKEN="))
                .await,
        );
        let agent_token = value(
            process
                .line(|l| l.starts_with("CREDSTREAM_AGENT_TOKEN="))
                .await,
        );
        let admin_token = value(
            process
                .line(|l| l.starts_with("CREDSTREAM_ADMIN_TOKEN="))
                .await,
        );
        BrokerProcess {
            url: format!("http://{}", listening.trim_start_matches("listening on ")),
            process,
            publisher_token,
            agent_token,
            admin_token,
        }
    }

    /// An admin client with the admin token.
    pub fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, CallCredentials>> {
        let channel = Channel::from_shared(self.url.clone())
            .expect("url")
            .connect_lazy();
        let credentials = CallCredentials::bearer(&self.admin_token).expect("ascii token");
        AdminServiceClient::with_interceptor(channel, credentials)
    }

    /// `GetCluster` with the admin token.
    pub async fn status(&self, cluster: &str) -> Result<ClusterStatus, Status> {
        let response = self
            .admin()
            .get_cluster(GetClusterRequest {
                cluster_id: cluster.into(),
            })
            .await?;
        Ok(response.into_inner().cluster.expect("cluster"))
    }
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a test file");
    path
}

/// [`write_file`] at mode 0600, as a seal key file must be for the agent
/// to read it.
pub fn write_private_file(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = write_file(dir, name, text);
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod a test file");
    path
}
