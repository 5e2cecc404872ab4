//! `scripts/test.sh` sets `CREDSTREAM_TEST_REQUIRE_TOOLS=1`, under which a
//! test whose tool is missing fails instead of printing `skipped:` and
//! passing, so that CI cannot stay green without, say, its HAProxy tests.

use std::process::Command;

use credstream_tests::child::{CHILD_ENV, in_child};
use credstream_tests::tools::{self, REQUIRE_TOOLS};

const TEST: &str = "a_missing_tool_skips_only_where_tools_are_not_required";

#[test]
fn a_missing_tool_skips_only_where_tools_are_not_required() {
    if in_child() {
        assert!(tools::python(TEST).is_none(), "the child has no venv");
        return;
    }
    let run = |require: bool| {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env_clear()
            .env(CHILD_ENV, "1");
        if require {
            command.env(REQUIRE_TOOLS, "1");
        }
        let output = command.output().expect("re-run the test binary");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.success(), text)
    };
    let (passed, text) = run(false);
    assert!(
        passed && text.contains(&format!("skipped: {TEST}")),
        "{text}"
    );
    let (passed, text) = run(true);
    assert!(
        !passed,
        "a missing tool passed under {REQUIRE_TOOLS}=1:\n{text}"
    );
    assert!(text.contains("says every tool must be present"), "{text}");
}
