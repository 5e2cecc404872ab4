//! Helpers shared by the client's integration tests: a real moto server, a
//! tiny HTTP server for fake token endpoints, and running a test body in a
//! child process with an environment of its own.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The project venv's Python, or `None` after printing the skip line.
pub fn python(test: &str) -> Option<PathBuf> {
    match std::env::var_os("CREDSTREAM_TEST_PYTHON").map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            eprintln!(
                "skipped: {test}: needs the project's Python venv (set CREDSTREAM_TEST_PYTHON)"
            );
            None
        }
    }
}

/// A loopback port below 32768 that was free a moment ago (above is the
/// ephemeral range, where a just-closed client port may still be taken).
fn free_low_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..32_000);
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A moto server process, stopped (by its PID) when dropped.
pub struct Moto {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    addr: SocketAddr,
}

impl Moto {
    /// Starts `python -m moto.server` on a free loopback port and waits
    /// until it answers. `env` is added to the server's environment (e.g.
    /// `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub async fn start(python: &PathBuf, env: &[(&str, &str)]) -> Moto {
        for _attempt in 0..5 {
            let port = free_low_port();
            let mut child = Command::new(python)
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto");
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: probably lost the port; try another
                }
                if let Ok((200, _)) = http_get(addr, "/moto-api/").await {
                    return Moto {
                        child,
                        url: format!("http://{addr}"),
                        addr,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("moto did not answer on {addr} within 60s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        panic!("moto did not start after 5 attempts");
    }

    /// moto's record of every model it holds (`/moto-api/data.json`).
    pub async fn data(&self) -> serde_json::Value {
        let (status, body) = http_get(self.addr, "/moto-api/data.json")
            .await
            .expect("moto data");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("moto data is JSON")
    }

    /// The STS models of one kind (`Token` for GetSessionToken calls,
    /// `AssumedRole` for AssumeRole calls).
    pub async fn sts_records(&self, model: &str) -> Vec<serde_json::Value> {
        self.data().await["sts"][model]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 GET (no dependencies): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// One request a [`FakeHttp`] server received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Method and path (`POST /token`).
    pub request_line: String,
    /// The body, as text.
    pub body: String,
}

/// What a [`FakeHttp`] server answers: status, content type and body, given
/// the request's number (1-based) and the request.
pub type Responder = Arc<dyn Fn(usize, &Received) -> (u16, &'static str, String) + Send + Sync>;

/// A tiny HTTP server on `127.0.0.1:0` that records every request and
/// answers through a [`Responder`]; stops when dropped.
pub struct FakeHttp {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeHttp {
    /// Starts the server.
    pub async fn start(respond: Responder) -> FakeHttp {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                let respond = respond.clone();
                tokio::spawn(async move {
                    let _ = serve_one(stream, log, respond).await;
                });
            }
        });
        FakeHttp {
            url,
            received,
            task,
        }
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_one(
    mut stream: TcpStream,
    log: Arc<Mutex<Vec<Received>>>,
    respond: Responder,
) -> std::io::Result<()> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head, body) = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        raw.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&raw).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_owned();
            let length = head
                .lines()
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]).to_string();
                break (head, body);
            }
        }
    };
    let request_line = head.lines().next().unwrap_or("").to_owned();
    let request_line = request_line
        .rsplit_once(' ')
        .map(|(rest, _)| rest.to_owned())
        .unwrap_or(request_line);
    let received = Received { request_line, body };
    let number = {
        let mut log = log.lock().unwrap();
        log.push(received.clone());
        log.len()
    };
    let (status, content_type, reply) = respond(number, &received);
    let response = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Decodes `application/x-www-form-urlencoded` text.
pub fn form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

/// The variable that tells a re-executed test binary to run the child side.
pub const CHILD_ENV: &str = "CREDSTREAM_CLIENT_TEST_CHILD";

/// True in the child started by [`run_child`].
pub fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` again in a child process with exactly `env` (plus
/// an empty `HOME`, no instance metadata lookups and no AWS config files), so
/// a test can exercise the real default credential chain without changing
/// the environment of the parallel tests in this process. Panics with the
/// child's output if it fails.
pub fn run_child(name: &str, env: &[(&str, String)]) {
    let home = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env(CHILD_ENV, "1")
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.path().join("no-credentials"),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child {name} failed:\n{stdout}\n{stderr}"
    );
}
