//! A real HAProxy in front of several brokers, routing every gRPC call on
//! its `x-credstream-cluster` header with consistent hashing: the sharding
//! DESIGN §6 describes, with the configuration README "Sharding" shows.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::broker::WAIT;
use crate::processes::{Process, clean_command, free_low_port};

/// The HAProxy configuration for `shards`, listening on `listen`.
///
/// Every request goes to the shard its cluster hashes to; a call without
/// the header (an admin call, say) goes round robin. Health checks every
/// 100 ms take a dead shard out at the first failure, which moves its
/// clusters to the others; the long timeouts keep idle streams open.
pub fn config(listen: SocketAddr, shards: &[SocketAddr]) -> String {
    let mut text = format!(
        "global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend grpc
    bind {listen} proto h2
    default_backend brokers

backend brokers
    balance hdr(x-credstream-cluster)
    hash-type consistent
"
    );
    for (i, shard) in shards.iter().enumerate() {
        text.push_str(&format!(
            "    server shard{i} {shard} proto h2 check inter 100ms fall 1 rise 1\n"
        ));
    }
    text
}

/// HAProxy running in the foreground; killed when dropped.
pub struct Haproxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The process, for its output on failure.
    pub process: Process,
}

impl Haproxy {
    /// Writes the configuration for `shards` into `dir`, starts `binary` on
    /// a free loopback port and waits until it accepts connections.
    pub async fn start(binary: &Path, dir: &Path, shards: &[SocketAddr]) -> Haproxy {
        // HAProxy cannot bind port 0 and report it.
        let addr = SocketAddr::from(([127, 0, 0, 1], free_low_port()));
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config(addr, shards)).expect("write haproxy.cfg");
        let mut command = clean_command(binary);
        command.arg("-db").arg("-f").arg(&file);
        let mut process = Process::spawn("haproxy", command);
        let accepting = tokio::time::timeout(WAIT, async {
            loop {
                if tokio::net::TcpStream::connect(addr).await.is_ok() {
                    return;
                }
                if process.has_exited() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            accepting.is_ok() && !process.has_exited(),
            "haproxy did not start on {addr}\n{}",
            process.output()
        );
        Haproxy { addr, process }
    }

    /// `http://ADDR`, the URL clients and agents are given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hashes_on_the_cluster_header_and_checks_every_shard() {
        let shards = [
            "127.0.0.1:7001".parse().unwrap(),
            "127.0.0.1:7002".parse().unwrap(),
        ];
        let text = config("127.0.0.1:7000".parse().unwrap(), &shards);
        assert!(text.contains("bind 127.0.0.1:7000 proto h2"));
        assert!(text.contains("balance hdr(x-credstream-cluster)"));
        assert!(text.contains("hash-type consistent"));
        assert!(text.contains("server shard0 127.0.0.1:7001 proto h2 check"));
        assert!(text.contains("server shard1 127.0.0.1:7002 proto h2 check"));
    }
}
