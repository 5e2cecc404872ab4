//! External peers provided by `scripts/test.sh` through environment
//! variables. `cargo test --workspace` alone runs without them: each test
//! that needs one calls the accessor, and on `None` prints a line starting
//! with `skipped:` and returns.

use std::path::PathBuf;

fn from_env(var: &str, what: &str, test: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            eprintln!("skipped: {test}: needs {what} (set {var}; scripts/test.sh provides it)");
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

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
