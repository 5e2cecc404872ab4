//! External peers provided by `scripts/test.sh` through environment
//! variables. `cargo test --workspace` alone runs without them: each test
//! that needs one is marked `#[cfg_attr(not(tool_X), ignore = "...")]`, and
//! `tests/build/tools.rs` sets `tool_X` only when the variable names an
//! existing path, so a plain `cargo test` reports the test as ignored with
//! its reason. A test that runs anyway (the tool went away after the build,
//! or `--include-ignored`) calls the accessor, which on `None` prints a line
//! starting with `skipped:` and returns.
//!
//! Under [`REQUIRE_TOOLS`] (which `scripts/test.sh`, and so CI, sets) a
//! missing tool fails the test instead: a suite that skipped its HAProxy or
//! Python tests must not look green.

use std::path::PathBuf;

/// When this variable is `1`, a test whose tool is missing fails.
pub const REQUIRE_TOOLS: &str = "CREDSTREAM_TEST_REQUIRE_TOOLS";

/// Reports that `test` cannot run without `what`: a `skipped:` line, or a
/// panic under [`REQUIRE_TOOLS`].
pub fn missing(test: &str, what: &str) {
    let line = format!("skipped: {test}: needs {what}");
    if std::env::var(REQUIRE_TOOLS).as_deref() == Ok("1") {
        panic!("{line}, and {REQUIRE_TOOLS}=1 says every tool must be present");
    }
    eprintln!("{line}");
}

fn from_env(var: &str, what: &str, test: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            missing(
                test,
                &format!("{what} (set {var}; scripts/test.sh provides it)"),
            );
            None
        }
    }
}

/// The project venv's Python (grpcio-tools, boto3, moto, google-auth, …).
pub fn python(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_PYTHON", "the project's Python venv", test)
}

/// The real `grpcurl` binary.
pub fn grpcurl(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_GRPCURL", "grpcurl", test)
}

/// The real `buf` binary.
pub fn buf(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_BUF", "buf", test)
}

/// A `node_modules` folder with `@grpc/grpc-js` and `@grpc/proto-loader`.
pub fn node_modules(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_NODE_MODULES", "Node modules", test)
}

/// The real `haproxy` binary.
pub fn haproxy(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_HAPROXY", "haproxy", test)
}

/// The real `nginx` binary.
pub fn nginx(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_NGINX", "nginx", test)
}

/// libfaketime's preload library (Debian's `faketime` package), to move one
/// process's clock.
pub fn libfaketime(test: &str) -> Option<PathBuf> {
    from_env("CREDSTREAM_TEST_LIBFAKETIME", "libfaketime", test)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
