//! The benchmark cannot rot: `credstream-bench` runs at N=10 against the
//! credstream broker alone (no etcd, NATS or Redis needed) and must produce
//! a JSON report with every field the README's table comes from. No timing
//! is asserted: only that each measurement happened.

use std::process::Command;

use credstream_tests::bins;

#[test]
fn bench_at_ten_agents_reports_every_field() {
    let bench = bins::binary("credstream-bench");
    let broker = bins::binary("credstream-broker");
    let floor = bins::binary("credstream-bench-floor");
    let agent = bins::binary("credstream-agent");
    let work = tempfile::tempdir().expect("tempdir");
    let json_path = work.path().join("report.json");
    // A base port from this process id, below the ephemeral range (docs/facts.md, fact 18),
    // so that concurrent test runs do not collide.
    let base_port = 20_000 + (std::process::id() % 1_000) * 8;
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
        "agents_cpu_ms_per_update",
        "connect_seconds",
    ] {
        assert!(credstream[field].is_number(), "no {field}: {credstream:#}");
    }
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
