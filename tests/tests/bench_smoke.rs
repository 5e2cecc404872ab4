//! The benchmark cannot rot: `credstream-bench` runs at N=10 against the
//! credstream broker alone (no etcd, NATS or Redis needed) and must produce
//! a JSON report with every field the README's table comes from; and again
//! with `--tls` against the broker and the tonic floor, both reconnect
//! storms included. No timing is asserted: only that each measurement
//! happened and every agent got what it should.

use std::process::Command;

use credstream_tests::bins;

/// A base port from this process id, below the ephemeral range
/// (docs/facts.md, fact 18), so that concurrent test runs do not collide;
/// each test of this file adds its own `offset` (a run uses at most 24
/// ports from its base).
fn base_port(offset: u32) -> u32 {
    20_000 + (std::process::id() % 250) * 24 + offset
}

#[test]
fn bench_at_ten_agents_reports_every_field() {
    let bench = bins::binary("credstream-bench");
    let broker = bins::binary("credstream-broker");
    let floor = bins::binary("credstream-bench-floor");
    let agent = bins::binary("credstream-agent");
    let work = tempfile::tempdir().expect("tempdir");
    let json_path = work.path().join("report.json");
    let base_port = base_port(0);
    let output = Command::new(&bench)
        .args(["--agents", "10", "--publishes", "3", "--warmup", "1"])
        .args([
            "--peers",
            "credstream",
            "--gap",
            "20ms",
            "--round-timeout",
            "20s",
        ])
        .args(["--http-connections", "2", "--http-duration", "500ms"])
        .arg("--base-port")
        .arg(base_port.to_string())
        .arg("--broker-bin")
        .arg(&broker)
        .arg("--floor-bin")
        .arg(&floor)
        .arg("--agent-bin")
        .arg(&agent)
        .arg("--work-dir")
        .arg(work.path())
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run credstream-bench");
    assert!(
        output.status.success(),
        "credstream-bench failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("JSON written")).expect("JSON");

    for field in ["date", "machine", "versions", "config", "fanout", "targets"] {
        assert!(report.get(field).is_some(), "no {field} in {report:#}");
    }
    let fanout = report["fanout"].as_array().expect("fanout array");
    assert_eq!(fanout.len(), 1, "{report:#}");
    let credstream = &fanout[0];
    assert_eq!(credstream["peer"], "credstream");
    assert_eq!(credstream["agents"], 10);
    assert!(credstream["error"].is_null(), "{credstream:#}");
    assert_eq!(credstream["lost"], 0, "every agent got every publish");
    for field in ["p50", "p99", "max"] {
        assert!(
            credstream["latency_ms"][field].is_number(),
            "no latency {field}: {credstream:#}"
        );
    }
    for field in [
        "server_rss_before_bytes",
        "server_rss_after_bytes",
        "server_bytes_per_agent",
        "server_cpu_ms_per_update",
        "server_system_ms_per_update",
        "server_fanout_cpu_ms_per_update",
        "agents_cpu_ms_per_update",
        "connect_seconds",
    ] {
        assert!(credstream[field].is_number(), "no {field}: {credstream:#}");
    }
    // The fan-out windows lie inside the measured rounds, read from the
    // same monotonic counter.
    assert!(
        credstream["server_fanout_cpu_ms_per_update"].as_f64()
            <= credstream["server_cpu_ms_per_update"].as_f64(),
        "fan-out CPU beyond the rounds' CPU: {credstream:#}"
    );
    // Ten hints, one mint: that is a correctness property, not a timing.
    assert_eq!(report["hints"]["agents"], 10, "{report:#}");
    assert_eq!(report["hints"]["refresh_requests"], 1, "{report:#}");
    let http = &report["agent_http"];
    assert!(
        http["requests_per_second"].is_number() && http["idle_rss_bytes"].is_number(),
        "agent endpoint not measured: {}",
        report["agent_http_error"]
    );
    assert!(!report["targets"].as_array().expect("targets").is_empty());
}

#[test]
fn tls_bench_at_ten_agents_runs_both_storms() {
    let work = tempfile::tempdir().expect("tempdir");
    let json_path = work.path().join("report.json");
    let output = Command::new(bins::binary("credstream-bench"))
        .args([
            "--tls",
            "--agents",
            "10",
            "--publishes",
            "3",
            "--warmup",
            "1",
        ])
        .args(["--peers", "credstream,floor", "--gap", "20ms"])
        .args(["--round-timeout", "20s", "--storm-timeout", "60s"])
        .arg("--no-agent-http")
        .arg("--base-port")
        .arg(base_port(6_000).to_string())
        .arg("--broker-bin")
        .arg(bins::binary("credstream-broker"))
        .arg("--floor-bin")
        .arg(bins::binary("credstream-bench-floor"))
        .arg("--work-dir")
        .arg(work.path())
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run credstream-bench");
    assert!(
        output.status.success(),
        "credstream-bench --tls failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("over TLS"),
        "the table does not say TLS: {table}"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("JSON written")).expect("JSON");
    assert_eq!(report["tls"], true, "{report:#}");
    assert_eq!(report["config"]["transport"], "tls", "{report:#}");

    let fanout = report["fanout"].as_array().expect("fanout array");
    let peers: Vec<&str> = fanout.iter().filter_map(|r| r["peer"].as_str()).collect();
    assert_eq!(peers, ["credstream", "tonic-floor"], "{report:#}");
    for row in fanout {
        assert!(row["error"].is_null(), "{row:#}");
        assert_eq!(row["agents"], 10, "{row:#}");
        assert_eq!(row["lost"], 0, "every TLS agent got every publish: {row:#}");
        assert!(row["latency_ms"]["max"].is_number(), "{row:#}");
        assert!(row["server_bytes_per_agent"].is_number(), "{row:#}");
    }

    // Both storms ran with the same N, and every agent came back to the
    // new broker and got the re-published credential.
    let storms = report["storms"].as_array().expect("storms array");
    let transports: Vec<&str> = storms
        .iter()
        .filter_map(|s| s["transport"].as_str())
        .collect();
    assert_eq!(transports, ["plaintext", "TLS"], "{report:#}");
    for storm in storms {
        assert!(storm["error"].is_null(), "{storm:#}");
        assert_eq!(storm["agents"], 10, "{storm:#}");
        assert_eq!(storm["not_converged"], 0, "{storm:#}");
        assert!(storm["converged_seconds"].is_number(), "{storm:#}");
        assert!(
            storm["streams_opened"].as_u64().expect("streams_opened") >= 10,
            "every agent opened a stream on the new broker: {storm:#}"
        );
        for field in [
            "handshakes_per_second",
            "broker_cpu_seconds",
            "steady_rss_bytes",
            "peak_rss_bytes",
        ] {
            assert!(storm[field].is_number(), "no {field}: {storm:#}");
        }
    }
    let targets = report["targets"].as_array().expect("targets");
    assert!(
        targets.iter().any(|t| t["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("TLS reconnect storm"))),
        "{report:#}"
    );
}

#[test]
fn seal_bench_at_ten_agents_opens_every_sealed_update() {
    let work = tempfile::tempdir().expect("tempdir");
    let json_path = work.path().join("report.json");
    let output = Command::new(bins::binary("credstream-bench"))
        .args(["--seal", "--seal-rounds", "1", "--open-iterations", "200"])
        .args(["--agents", "10", "--publishes", "3", "--warmup", "1"])
        .args(["--gap", "20ms", "--round-timeout", "20s"])
        .arg("--base-port")
        .arg(base_port(3_000).to_string())
        .arg("--broker-bin")
        .arg(bins::binary("credstream-broker"))
        .arg("--work-dir")
        .arg(work.path())
        .arg("--json")
        .arg(&json_path)
        .output()
        .expect("run credstream-bench");
    assert!(
        output.status.success(),
        "credstream-bench --seal failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("JSON written")).expect("JSON");
    let seal = &report["seal"];
    // One round: off, relay (sealed, not opened), on; every agent got every
    // version and, with sealing on, opened it through its own gate.
    let modes: Vec<&str> = seal["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .filter_map(|s| s["mode"].as_str())
        .collect();
    assert_eq!(modes, ["off", "relay", "on"], "{report:#}");
    for step in seal["steps"].as_array().expect("steps") {
        assert!(step["fanout"]["error"].is_null(), "{step:#}");
        assert_eq!(step["fanout"]["lost"], 0, "{step:#}");
        assert_eq!(step["not_opened"], 0, "{step:#}");
        assert!(step["fanout"]["latency_ms"]["max"].is_number(), "{step:#}");
    }
    assert!(seal["ratio_max"].is_number(), "{report:#}");
    assert!(seal["open"]["open_us"].is_number(), "{report:#}");
    assert!(
        seal["open"]["sealed_bytes"].as_u64() > seal["open"]["clear_bytes"].as_u64(),
        "{report:#}"
    );
}
