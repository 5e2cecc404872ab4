//! Running one test's body again in a child process with an environment
//! of its own, so a test can exercise code that reads process-wide
//! environment variables (the AWS default credential chain, say) without
//! changing the environment of the tests running beside it.

use std::process::Command;

/// The variable that tells a re-executed test binary to run the child side.
pub const CHILD_ENV: &str = "CREDSTREAM_TEST_CHILD";

/// True in the child started by [`run_child`].
pub fn in_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// Runs the test `name` again in a child process with exactly `env` (plus
/// an empty `HOME`, no instance metadata lookups and no AWS config files), so
/// a test can exercise the real default credential chain without changing
/// the environment of the parallel tests in this process. Panics with the
/// child's output if it fails.
pub fn run_child(name: &str, env: &[(&str, String)]) {
    let home = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env_clear()
        .env(CHILD_ENV, "1")
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", home.path().join("no-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            home.path().join("no-credentials"),
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("re-run the test binary");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child {name} failed:\n{stdout}\n{stderr}"
    );
}
