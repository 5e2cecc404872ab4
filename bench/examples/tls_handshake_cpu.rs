//! CPU per full TLS handshake, server side and client side, with the
//! broker's own configuration (`credstream_broker::tls::acceptor`) and the
//! bench's P-256 certificates: N client/server pairs complete their
//! handshakes in memory (no sockets, no runtime), and the thread CPU time
//! spent in each side's rustls calls is summed. This is the cryptographic
//! floor of a reconnect storm over TLS (README "Over TLS"): what every
//! broker restart costs per agent whatever the accept path does, a broker
//! restart leaving nothing to resume.
//!
//! `cargo run --release -p credstream-bench --example tls_handshake_cpu`

use std::time::Duration;

use anyhow::{Result, ensure};
use credstream_bench::tls::TlsMaterial;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConnection, ServerConnection};

const PAIRS: usize = 2000;

fn thread_cpu() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Runs `f`, adding its thread CPU time to `total`.
fn timed<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let start = thread_cpu();
    let out = f();
    *total += thread_cpu() - start;
    out
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tls-handshake-cpu-{}", std::process::id()));
    let material = TlsMaterial::generate(&dir)?;
    let server_config = material.broker_server_config()?;
    let client_config = material.client_config()?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();

    let (mut server_cpu, mut client_cpu) = (Duration::ZERO, Duration::ZERO);
    let mut suite = String::new();
    for _ in 0..PAIRS {
        let mut server = timed(&mut server_cpu, || {
            ServerConnection::new(server_config.clone())
        })?;
        let mut client = timed(&mut client_cpu, || {
            ClientConnection::new(client_config.clone(), name.clone())
        })?;
        for _ in 0..10 {
            let mut c2s = Vec::new();
            timed(&mut client_cpu, || -> Result<()> {
                while client.wants_write() {
                    client.write_tls(&mut c2s)?;
                }
                Ok(())
            })?;
            if !c2s.is_empty() {
                timed(&mut server_cpu, || -> Result<()> {
                    server.read_tls(&mut &c2s[..])?;
                    server.process_new_packets()?;
                    Ok(())
                })?;
            }
            let mut s2c = Vec::new();
            timed(&mut server_cpu, || -> Result<()> {
                while server.wants_write() {
                    server.write_tls(&mut s2c)?;
                }
                Ok(())
            })?;
            if !s2c.is_empty() {
                timed(&mut client_cpu, || -> Result<()> {
                    let mut rest = &s2c[..];
                    while !rest.is_empty() {
                        client.read_tls(&mut rest)?;
                        client.process_new_packets()?;
                    }
                    Ok(())
                })?;
            }
            if c2s.is_empty() && s2c.is_empty() && !client.is_handshaking() {
                break;
            }
        }
        ensure!(
            !client.is_handshaking() && !server.is_handshaking(),
            "a handshake did not complete"
        );
        suite = server
            .negotiated_cipher_suite()
            .map(|s| format!("{:?}", s.suite()))
            .unwrap_or_default();
    }
    let per = |total: Duration| total.as_secs_f64() * 1e6 / PAIRS as f64;
    println!(
        "{PAIRS} full TLS handshakes in memory ({suite}, P-256 certificate, broker configuration): \
         server {:.0} us CPU each, client {:.0} us CPU each",
        per(server_cpu),
        per(client_cpu),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
