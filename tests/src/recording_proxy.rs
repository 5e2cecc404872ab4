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
            while let Some((received, used)) = Received::parse(&pending) {
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
