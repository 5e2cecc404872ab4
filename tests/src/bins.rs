//! Paths of the workspace's binaries for tests that run real processes.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

fn target_dir() -> PathBuf {
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf()
}

/// The path of a workspace binary (`credstream-broker`, `credstream`,
/// `credstream-agent`). The first call in a test process runs
/// `cargo build --bins` (quick when nothing changed), so a test never runs a
/// binary older than the code it tests.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = target_dir().join(name);
    {
        BUILT.get_or_init(|| {
            let profile_release = target_dir().ends_with("release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--bins", "--workspace"])
                .current_dir(crate::tools::repo_root());
            if profile_release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build");
            assert!(status.success(), "cargo build --bins failed");
        });
    }
    assert!(path.exists(), "{} was not built", path.display());
    path
}
