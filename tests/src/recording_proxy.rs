//! A recording HTTP/1.1 proxy on `127.0.0.1:0` in front of a real server
//! (moto): every byte is forwarded unchanged both ways, and each request
//! the client sends is recorded (request line and body), so a test can
//! count the identity-provider calls the code under test made — e.g. STS
//! `AssumeRole` calls, which moto's own records do not count one by one.
//! Keep-alive connections carrying several requests are parsed request by
//! request (by `Content-Length`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::fake_http::{Received, form};

/// A running recording proxy; stops accepting when dropped.
pub struct RecordingProxy {
    /// `http://127.0.0.1:PORT`: point the client at this instead of the
    /// upstream.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingProxy {
    /// Starts a proxy forwarding to `upstream` (`http://HOST:PORT`).
    pub async fn start(upstream: &str) -> RecordingProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream is http://IP:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let log = log.clone();
                tokio::spawn(async move {
                    let _ = relay(client, upstream, log).await;
                });
            }
        });
        RecordingProxy {
            url,
            received,
            task,
        }
    }

    /// Every complete request forwarded so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// How many forwarded requests were AWS query-protocol calls of
    /// `action` (`Action=<action>` in a form body, e.g. `AssumeRole`).
    pub fn aws_calls(&self, action: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| form(&r.body).get("Action").map(String::as_str) == Some(action))
            .count()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let requests = async move {
        let mut pending = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let n = client_read.read(&mut chunk).await?;
            if n == 0 {
                return server_write.shutdown().await;
            }
            server_write.write_all(&chunk[..n]).await?;
            pending.extend_from_slice(&chunk[..n]);
            while let Some((received, used)) = parse_request(&pending) {
                log.lock().unwrap().push(received);
                pending.drain(..used);
            }
        }
    };
    let responses = async move {
        tokio::io::copy(&mut server_read, &mut client_write).await?;
        client_write.shutdown().await
    };
    let (a, b) = tokio::join!(requests, responses);
    a.and(b)
}

/// One complete request at the start of `bytes` and how many bytes it
/// took, or `None` if it has not all arrived yet.
fn parse_request(bytes: &[u8]) -> Option<(Received, usize)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_split_by_content_length() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\nAction=AssumeRolePOST / HTTP/1.1\r\ncontent-length: 3\r\n\r\na=b";
        let (first, used) = parse_request(two).unwrap();
        assert_eq!(first.request_line, "POST /");
        assert_eq!(first.body, "Action=AssumeRole");
        let (second, rest) = parse_request(&two[used..]).unwrap();
        assert_eq!(second.body, "a=b");
        assert_eq!(used + rest, two.len());
        assert!(parse_request(&two[..used - 1]).is_none());
    }
}
