//! `credstream-bench-floor`: the minimal tonic fan-out the benchmark
//! compares the broker with. Usage: `credstream-bench-floor 127.0.0.1:PORT`.

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
    credstream_bench::floor::serve(listener)
        .await
        .context("serve")
}
