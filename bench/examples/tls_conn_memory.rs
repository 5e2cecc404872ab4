//! How many heap bytes one idle, established TLS server connection holds
//! in rustls with the broker's own configuration
//! (`credstream_broker::tls::acceptor`): N client/server pairs complete
//! their handshakes in memory and exchange one credential-sized record and
//! one ack; each client is dropped at once (its memory is reused by the
//! next), each server kept, and the process's RSS growth per server
//! connection printed: what rustls itself keeps per idle connection.
//!
//! `cargo run --release -p credstream-bench --example tls_conn_memory`

use std::io::{Read, Write};

use anyhow::Result;
use credstream_bench::procstat::ProcStats;
use credstream_bench::tls::TlsMaterial;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConnection, ServerConnection};

const PAIRS: usize = 1000;

fn transfer(from: &mut dyn FnMut(&mut Vec<u8>) -> bool, to: &mut dyn FnMut(&[u8])) -> bool {
    let mut buf = Vec::new();
    let wrote = from(&mut buf);
    if !buf.is_empty() {
        to(&buf);
    }
    wrote
}

fn main() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("tls-conn-memory-{}", std::process::id()));
    let material = TlsMaterial::generate(&dir)?;
    let server_config = material.broker_server_config()?;
    let client_config = material.client_config()?;
    let credential = vec![7u8; 1540];

    let before = ProcStats::read(std::process::id())?.rss_bytes;
    let mut pairs = Vec::with_capacity(PAIRS);
    for _ in 0..PAIRS {
        let mut server = ServerConnection::new(server_config.clone())?;
        let mut client = ClientConnection::new(
            client_config.clone(),
            ServerName::try_from("127.0.0.1")?.to_owned(),
        )?;
        for _ in 0..10 {
            let c2s = transfer(
                &mut |buf| client.write_tls(buf).map(|n| n > 0).unwrap_or(false),
                &mut |bytes| {
                    let _ = server.read_tls(&mut &bytes[..]);
                    let _ = server.process_new_packets();
                },
            );
            let s2c = transfer(
                &mut |buf| server.write_tls(buf).map(|n| n > 0).unwrap_or(false),
                &mut |bytes| {
                    let _ = client.read_tls(&mut &bytes[..]);
                    let _ = client.process_new_packets();
                },
            );
            if !c2s && !s2c && !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        // One credential to the agent, one small ack back, all read.
        server.writer().write_all(&credential)?;
        let mut wire = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut wire)?;
        }
        client.read_tls(&mut &wire[..])?;
        client.process_new_packets()?;
        let mut got = vec![0u8; credential.len()];
        client.reader().read_exact(&mut got)?;
        client.writer().write_all(&[0u8; 40])?;
        let mut wire = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut wire)?;
        }
        server.read_tls(&mut &wire[..])?;
        server.process_new_packets()?;
        let mut ack = [0u8; 40];
        server.reader().read_exact(&mut ack)?;
        drop(client);
        pairs.push(Box::new(server));
    }
    let after = ProcStats::read(std::process::id())?.rss_bytes;
    let negotiated = pairs[0]
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    println!(
        "{PAIRS} idle TLS server connections ({negotiated}): {} bytes of RSS each ({} of them the ServerConnection itself)",
        after.saturating_sub(before) / PAIRS as u64,
        std::mem::size_of::<ServerConnection>(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
