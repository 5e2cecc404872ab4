//! The systemd units in `deploy/systemd/`: `systemd-analyze verify` (Debian's
//! `systemd` package, found through `CREDSTREAM_TEST_SYSTEMD_ANALYZE`, which
//! `scripts/test.sh` sets) accepts each of them without a single warning,
//! and each keeps the hardening and credential handling the README promises.
//!
//! `verify` also checks that every `ExecStart=` program exists and is
//! executable, so the units are verified with `/usr/local/bin/` (where the
//! README installs the binaries) replaced by the directory of the binaries
//! this workspace just built; nothing else in them is changed.

use std::path::{Path, PathBuf};
use std::process::Command;

use credstream_tests::bins::binary;
use credstream_tests::tools::{missing, repo_root};

/// The units, and the instance each template is verified as.
const UNITS: &[(&str, &str)] = &[
    ("credstream-broker.service", "credstream-broker.service"),
    (
        "credstream-agent@.service",
        "credstream-agent@analysis.service",
    ),
    (
        "credstream-publish@.service",
        "credstream-publish@analysis.service",
    ),
];

/// What every unit must say (key=value lines, exactly).
const HARDENING: &[&str] = &[
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "PrivateDevices=yes",
    "DynamicUser=yes",
    "CapabilityBoundingSet=",
    "RestrictSUIDSGID=yes",
    "SystemCallFilter=@system-service",
    "UMask=0077",
];

fn systemd_analyze(test: &str) -> Option<PathBuf> {
    const VAR: &str = "CREDSTREAM_TEST_SYSTEMD_ANALYZE";
    match std::env::var_os(VAR).map(PathBuf::from) {
        Some(path) if path.exists() => Some(path),
        _ => {
            missing(
                test,
                &format!(
                    "systemd-analyze (Debian's systemd package; set {VAR}, scripts/test.sh provides it)"
                ),
            );
            None
        }
    }
}

fn unit_text(name: &str) -> String {
    let path = repo_root().join("deploy/systemd").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect()
}

/// The value of every `key=` line.
fn values<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    lines(text)
        .into_iter()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
#[cfg_attr(
    not(tool_systemd_analyze),
    ignore = "needs systemd-analyze: set CREDSTREAM_TEST_SYSTEMD_ANALYZE (scripts/test.sh does)"
)]
fn systemd_analyze_verify_accepts_every_unit_without_a_warning() {
    let test = "systemd_analyze_verify_accepts_every_unit_without_a_warning";
    let Some(analyze) = systemd_analyze(test) else {
        return;
    };
    // Built (or rebuilt) now, so verify finds the real executables.
    let bin_dir = binary("credstream-broker")
        .parent()
        .expect("target dir")
        .to_path_buf();
    for name in ["credstream", "credstream-agent"] {
        binary(name);
    }
    let dir = tempfile::tempdir().unwrap();
    for (file, _) in UNITS {
        let text = unit_text(file);
        assert!(
            text.contains("ExecStart=/usr/local/bin/credstream"),
            "{file} runs the binary from /usr/local/bin"
        );
        let local = text.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
        std::fs::write(dir.path().join(file), local).unwrap();
    }
    for (file, instance) in UNITS {
        let output = verify(&analyze, dir.path(), instance);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && stderr.trim().is_empty() && stdout.trim().is_empty(),
            "systemd-analyze verify {instance} ({file}): {}\n{stdout}{stderr}",
            output.status
        );
    }

    // The check can fail: a unit with an unknown key or a bad value draws a
    // warning, which the loop above would have reported.
    let broken = unit_text("credstream-broker.service")
        .replace("/usr/local/bin/", &format!("{}/", bin_dir.display()))
        .replace("ProtectSystem=strict", "ProtectSystem=very-strict");
    std::fs::write(dir.path().join("credstream-broker.service"), broken).unwrap();
    let output = verify(&analyze, dir.path(), "credstream-broker.service");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ProtectSystem") || stderr.contains("protect system"),
        "a bad value is reported: {stderr}"
    );
}

fn verify(analyze: &Path, dir: &Path, unit: &str) -> std::process::Output {
    Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.join(unit))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("run systemd-analyze")
}

#[test]
fn units_are_hardened_and_take_secrets_only_through_load_credential() {
    for (file, _) in UNITS {
        let text = unit_text(file);
        let present = lines(&text);
        for line in HARDENING {
            assert!(present.contains(line), "{file} lacks {line}");
        }
        assert!(
            !values(&text, "LimitNOFILE").is_empty(),
            "{file} sets LimitNOFILE"
        );
        // Secrets: each is a LoadCredential= whose file the command reads
        // from the credentials directory (%d); none is in Environment=.
        let credentials = values(&text, "LoadCredential");
        assert!(!credentials.is_empty(), "{file} loads a credential");
        let exec = values(&text, "ExecStart").join(" ");
        for credential in &credentials {
            let (id, source) = credential.split_once(':').expect("ID:PATH");
            assert!(source.starts_with("/etc/credstream/"), "{file}: {source}");
            assert!(
                exec.contains(&format!("%d/{id}")),
                "{file}: ExecStart reads credential {id} from %d"
            );
        }
        for value in values(&text, "Environment") {
            let upper = value.to_ascii_uppercase();
            assert!(
                !upper.contains("TOKEN") && !upper.contains("KEY") && !upper.contains("SECRET"),
                "{file}: a secret in Environment={value}"
            );
        }
    }
}

#[test]
fn a_taken_over_publisher_is_not_restarted() {
    // `credstream publish` exits 3 when another publisher took the cluster
    // over (client/src/cli/publish.rs, EXIT_TAKEN_OVER; its --help says so).
    let text = unit_text("credstream-publish@.service");
    assert_eq!(values(&text, "Restart"), ["on-failure"]);
    assert_eq!(values(&text, "RestartPreventExitStatus"), ["3"]);
    let help = Command::new(binary("credstream"))
        .args(["help", "publish"])
        .output()
        .expect("credstream help publish");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("RestartPreventExitStatus=3"),
        "credstream publish --help names exit status 3: {help}"
    );
}
