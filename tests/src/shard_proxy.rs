//! A real L7 proxy in front of several brokers, routing every gRPC call on
//! its `x-credstream-cluster` header with consistent hashing: the sharding
//! docs/design.md §6 describes, with the configurations README "Sharding" shows.
//! Both proxies docs/design.md §6 names: HAProxy and nginx.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::broker::WAIT;
use crate::processes::{Process, clean_command, free_low_port};

/// Which proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyKind {
    /// HAProxy: `balance hdr(x-credstream-cluster)`, active health checks.
    Haproxy,
    /// nginx: `hash $http_x_credstream_cluster consistent`, passive checks.
    Nginx,
}

/// The HAProxy configuration for `shards`, listening on `listen`.
///
/// Every request goes to the shard its cluster hashes to; a call without
/// the header (an admin call, say) goes round robin. Health checks every
/// 100 ms take a dead shard out at the first failure, which moves its
/// clusters to the others; the long timeouts keep idle streams open.
pub fn haproxy_config(listen: SocketAddr, shards: &[SocketAddr]) -> String {
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

/// The nginx configuration for `shards`, listening on `listen`, keeping
/// its pid and temporary files in `dir`.
///
/// nginx has no active health checks in its free edition: a shard that
/// refuses a connection is marked failed for `fail_timeout`, and the call
/// goes to the next shard on the hash ring at once (`grpc_next_upstream`
/// defaults to `error timeout`). The timeouts are raised because an agent's
/// stream is mostly idle in both directions.
pub fn nginx_config(listen: SocketAddr, shards: &[SocketAddr], dir: &Path) -> String {
    let dir = dir.display();
    let servers: String = shards
        .iter()
        .map(|shard| format!("        server {shard} max_fails=1 fail_timeout=10s;\n"))
        .collect();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream brokers {{
        hash $http_x_credstream_cluster consistent;
{servers}    }}
    server {{
        listen {listen} http2;
        client_body_timeout 1h;
        location / {{
            grpc_pass grpc://brokers;
            grpc_read_timeout 1h;
            grpc_send_timeout 1h;
        }}
    }}
}}
"
    )
}

/// A proxy running in the foreground; killed when dropped.
pub struct ShardProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// The process, for its output on failure.
    pub process: Process,
}

impl ShardProxy {
    /// Writes the configuration of `kind` for `shards` into `dir`, starts
    /// `binary` on a free loopback port and waits until it accepts
    /// connections.
    pub async fn start(
        kind: ProxyKind,
        binary: &Path,
        dir: &Path,
        shards: &[SocketAddr],
    ) -> ShardProxy {
        // Neither proxy can bind port 0 and report it.
        let addr = SocketAddr::from(([127, 0, 0, 1], free_low_port()));
        let mut command = clean_command(binary);
        let name = match kind {
            ProxyKind::Haproxy => {
                let file = dir.join("haproxy.cfg");
                std::fs::write(&file, haproxy_config(addr, shards)).expect("write haproxy.cfg");
                command.arg("-db").arg("-f").arg(&file);
                "haproxy"
            }
            ProxyKind::Nginx => {
                let file = dir.join("nginx.conf");
                std::fs::write(&file, nginx_config(addr, shards, dir)).expect("write nginx.conf");
                command
                    .arg("-e")
                    .arg("stderr")
                    .arg("-p")
                    .arg(dir)
                    .arg("-c")
                    .arg(&file);
                "nginx"
            }
        };
        let mut process = Process::spawn(name, command);
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
            "{name} did not start on {addr}\n{}",
            process.output()
        );
        ShardProxy { addr, process }
    }

    /// `http://ADDR`, the URL clients and agents are given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards() -> [SocketAddr; 2] {
        [
            "127.0.0.1:7001".parse().unwrap(),
            "127.0.0.1:7002".parse().unwrap(),
        ]
    }

    #[test]
    fn haproxy_hashes_on_the_cluster_header_and_checks_every_shard() {
        let text = haproxy_config("127.0.0.1:7000".parse().unwrap(), &shards());
        assert!(text.contains("bind 127.0.0.1:7000 proto h2"));
        assert!(text.contains("balance hdr(x-credstream-cluster)"));
        assert!(text.contains("hash-type consistent"));
        assert!(text.contains("server shard0 127.0.0.1:7001 proto h2 check"));
        assert!(text.contains("server shard1 127.0.0.1:7002 proto h2 check"));
    }

    #[test]
    fn nginx_hashes_on_the_cluster_header_over_every_shard() {
        let text = nginx_config(
            "127.0.0.1:7000".parse().unwrap(),
            &shards(),
            Path::new("/tmp/x"),
        );
        assert!(text.contains("listen 127.0.0.1:7000 http2;"));
        assert!(text.contains("hash $http_x_credstream_cluster consistent;"));
        assert!(text.contains("server 127.0.0.1:7001 max_fails=1"));
        assert!(text.contains("server 127.0.0.1:7002 max_fails=1"));
        assert!(text.contains("grpc_pass grpc://brokers;"));
        assert!(text.contains("pid /tmp/x/nginx.pid;"));
    }
}
