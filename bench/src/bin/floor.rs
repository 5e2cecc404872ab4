//! `credstream-bench-floor`: the minimal tonic fan-out the benchmark
//! compares the broker with. Usage:
//! `credstream-bench-floor 127.0.0.1:PORT [CERT.pem KEY.pem]` (TLS with both).

use anyhow::{Context, Result};

#[tokio::main]
async fn main() -> Result<()> {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50061".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let tls = match (std::env::args().nth(2), std::env::args().nth(3)) {
        (Some(cert), Some(key)) => Some(credstream_broker::tls::acceptor(
            &credstream_broker::server::TlsFiles {
                cert: cert.into(),
                key: key.into(),
                client_ca: None,
            },
        )?),
        _ => None,
    };
    credstream_bench::floor::serve(listener, tls)
        .await
        .context("serve")
}
