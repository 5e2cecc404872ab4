// Shared by tests/build.rs and agent/build.rs (`include!`): one `cfg` per
// external tool that integration tests drive, so that a test needing a tool
// is marked `#[cfg_attr(not(tool_python), ignore = "...")]` and plain
// `cargo test` reports it as ignored with its reason instead of passing it.
//
// A tool's cfg is set when its variable names an existing path, and always
// under CREDSTREAM_TEST_REQUIRE_TOOLS=1 (scripts/test.sh, so CI): there a
// missing tool is not ignored but fails the test (tests/src/tools.rs).

/// (cfg suffix, the variable that names the tool).
const TOOLS: &[(&str, &str)] = &[
    ("python", "CREDSTREAM_TEST_PYTHON"),
    ("grpcurl", "CREDSTREAM_TEST_GRPCURL"),
    ("buf", "CREDSTREAM_TEST_BUF"),
    ("node_modules", "CREDSTREAM_TEST_NODE_MODULES"),
    ("haproxy", "CREDSTREAM_TEST_HAPROXY"),
    ("nginx", "CREDSTREAM_TEST_NGINX"),
    ("systemd_analyze", "CREDSTREAM_TEST_SYSTEMD_ANALYZE"),
    ("libfaketime", "CREDSTREAM_TEST_LIBFAKETIME"),
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CREDSTREAM_TEST_REQUIRE_TOOLS");
    let required = std::env::var("CREDSTREAM_TEST_REQUIRE_TOOLS").as_deref() == Ok("1");
    for (tool, var) in TOOLS {
        println!("cargo::rerun-if-env-changed={var}");
        println!("cargo::rustc-check-cfg=cfg(tool_{tool})");
        let present =
            std::env::var_os(var).is_some_and(|path| std::path::Path::new(&path).exists());
        if present || required {
            println!("cargo::rustc-cfg=tool_{tool}");
        }
    }
    // Not a variable: network namespaces (`ip netns`) need root and
    // iproute2, so `tool_netns` is set when the build runs as root with
    // `ip` on PATH (tests/tests/join.rs), and always under the variable.
    println!("cargo::rustc-check-cfg=cfg(tool_netns)");
    if required || (effective_uid() == Some(0) && on_path("ip")) {
        println!("cargo::rustc-cfg=tool_netns");
    }
}

/// This process's effective user id, from /proc (Linux).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `program` is in a directory of PATH.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
