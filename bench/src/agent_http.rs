//! The agent's AWS container credential endpoint under keep-alive load,
//! and the agent's idle memory.
//!
//! The agent runs as `credstream-agent run` against a broker that holds a
//! credential; its stdout names the listen address and the token file. The
//! load is a minimal HTTP/1.1 client (one request in flight per
//! connection, keep-alive, responses checked for status 200 and read to
//! their Content-Length) so that as little CPU as possible goes to the load
//! side of the two shared cores.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::procstat::ProcStats;

/// What to measure.
#[derive(Clone, Debug)]
pub struct AgentHttpConfig {
    /// The `credstream-agent` binary.
    pub agent_bin: PathBuf,
    /// The broker URL.
    pub broker_url: String,
    /// The cluster.
    pub cluster: String,
    /// An agent token for it.
    pub token: String,
    /// Where the agent listens.
    pub listen: SocketAddr,
    /// Keep-alive connections of the load.
    pub connections: usize,
    /// How long to load it (after a warm-up of a fifth of this).
    pub duration: Duration,
    /// Where the agent's log goes.
    pub log: PathBuf,
}

/// The measurement.
#[derive(Clone, Debug, Serialize)]
pub struct AgentHttpResult {
    /// Successful `GET /aws/credentials` per second.
    pub requests_per_second: f64,
    /// Requests that were not answered 200.
    pub errors: u64,
    /// The agent's RSS once it is ready and idle, in bytes.
    pub idle_rss_bytes: u64,
    /// The agent's RSS right after the load, in bytes.
    pub loaded_rss_bytes: u64,
    /// Keep-alive connections used.
    pub connections: usize,
    /// Measured seconds.
    pub seconds: f64,
}

/// Starts the agent, waits until it serves a credential, measures its idle
/// RSS, loads the endpoint, and stops it by PID.
pub async fn measure(config: &AgentHttpConfig) -> Result<AgentHttpResult> {
    let log = std::fs::File::create(&config.log)?;
    let mut child = tokio::process::Command::new(&config.agent_bin)
        .args([
            "run",
            "--broker",
            &config.broker_url,
            "--cluster",
            &config.cluster,
        ])
        .args(["--agent-id", "bench-http-agent", "--no-gce-metadata"])
        .args(["--listen", &config.listen.to_string()])
        .env("CREDSTREAM_TOKEN", &config.token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", config.agent_bin.display()))?;
    let pid = child.id().context("agent pid")?;
    let result = async {
        let stdout = child.stdout.take().context("agent stdout")?;
        let (addr, token_file) = read_banner(stdout).await?;
        let token = std::fs::read_to_string(&token_file)
            .with_context(|| format!("cannot read {}", token_file.display()))?
            .trim()
            .to_owned();
        wait_ready(addr, &token).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_rss_bytes = ProcStats::read(pid)?.rss_bytes;
        let (requests_per_second, errors, seconds) = load(addr, &token, config).await?;
        let loaded_rss_bytes = ProcStats::read(pid)?.rss_bytes;
        Ok(AgentHttpResult {
            requests_per_second,
            errors,
            idle_rss_bytes,
            loaded_rss_bytes,
            connections: config.connections,
            seconds,
        })
    }
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    result
}

async fn read_banner(stdout: tokio::process::ChildStdout) -> Result<(SocketAddr, PathBuf)> {
    let mut lines = BufReader::new(stdout).lines();
    let mut addr = None;
    let mut token_file = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while addr.is_none() || token_file.is_none() {
        let line = tokio::time::timeout_at(deadline, lines.next_line())
            .await
            .context("the agent printed no listen address and token file in time")??
            .context("the agent exited before printing its listen address")?;
        if let Some(rest) = line.strip_prefix("listening on ") {
            addr = Some(rest.trim().parse()?);
        } else if let Some(rest) =
            line.strip_prefix("export AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=")
        {
            token_file = Some(PathBuf::from(rest.trim().trim_matches('\'')));
        }
    }
    Ok((addr.expect("set"), token_file.expect("set")))
}

async fn wait_ready(addr: SocketAddr, token: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut conn) = Connection::open(addr, token).await
            && conn.get().await.unwrap_or(false)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent did not serve a credential within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn load(addr: SocketAddr, token: &str, config: &AgentHttpConfig) -> Result<(f64, u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..config.connections {
        let mut conn = Connection::open(addr, token).await?;
        let (stop, counting, ok, errors) =
            (stop.clone(), counting.clone(), ok.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match conn.get().await {
                    Ok(true) if counting.load(Ordering::Relaxed) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(true) => {}
                    Ok(false) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            }
        }));
    }
    tokio::time::sleep(config.duration / 5).await;
    counting.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(config.duration).await;
    counting.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let done = ok.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        let _ = worker.await;
    }
    Ok((
        done as f64 / seconds,
        errors.load(Ordering::Relaxed),
        seconds,
    ))
}

/// One keep-alive HTTP/1.1 connection issuing `GET /aws/credentials`.
struct Connection {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr, token: &str) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            request: format!(
                "GET /aws/credentials HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {token}\r\n\r\n"
            )
            .into_bytes(),
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// One request; true if it was answered 200.
    async fn get(&mut self) -> Result<bool> {
        self.stream.write_all(&self.request).await?;
        self.buf.clear();
        let head_end = loop {
            if let Some(at) = find(&self.buf, b"\r\n\r\n") {
                break at + 4;
            }
            self.read_more().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end]).context("response head")?;
        let ok = head.starts_with("HTTP/1.1 200");
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
            .context("no Content-Length")?;
        while self.buf.len() < head_end + length {
            self.read_more().await?;
        }
        Ok(ok)
    }

    async fn read_more(&mut self) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the agent closed the connection");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The default agent binary: next to this executable.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_default()
        .join(name)
}
