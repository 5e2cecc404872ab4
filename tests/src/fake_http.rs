//! A tiny HTTP/1.1 server on `127.0.0.1:0` standing in for an endpoint
//! the code under test calls (an OAuth2 token endpoint, say): it records
//! every request and answers through a closure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request a [`FakeHttp`] server received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Method and path (`POST /token`).
    pub request_line: String,
    /// The body, as text.
    pub body: String,
}

impl Received {
    /// One complete HTTP/1.1 request at the start of `bytes` (its body by
    /// `Content-Length`) and how many bytes it took, or `None` if it has
    /// not all arrived yet.
    pub fn parse(bytes: &[u8]) -> Option<(Received, usize)> {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&bytes[..end]).to_string();
        let length = head
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let total = end + 4 + length;
        if bytes.len() < total {
            return None;
        }
        let request_line = head.lines().next().unwrap_or("").to_owned();
        let request_line = request_line
            .rsplit_once(' ')
            .map(|(rest, _)| rest.to_owned())
            .unwrap_or(request_line);
        let body = String::from_utf8_lossy(&bytes[end + 4..total]).to_string();
        Some((Received { request_line, body }, total))
    }
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
    let received = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        raw.extend_from_slice(&chunk[..n]);
        if let Some((received, _)) = Received::parse(&raw) {
            break received;
        }
    };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_split_by_content_length() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\nAction=AssumeRolePOST / HTTP/1.1\r\ncontent-length: 3\r\n\r\na=b";
        let (first, used) = Received::parse(two).unwrap();
        assert_eq!(first.request_line, "POST /");
        assert_eq!(first.body, "Action=AssumeRole");
        let (second, rest) = Received::parse(&two[used..]).unwrap();
        assert_eq!(second.body, "a=b");
        assert_eq!(used + rest, two.len());
        assert!(Received::parse(&two[..used - 1]).is_none());
    }
}
