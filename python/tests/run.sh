#!/usr/bin/env bash
# Runs the Python package's tests (python/tests/) from the installed wheel:
# a fresh venv in target/python-tests/venv gets the wheel and
# python/tests/requirements.txt, and pytest runs there, outside the source
# tree. Real peers: moto from the project's .venv (CREDSTREAM_TEST_PYTHON),
# the debug credstream-broker (CREDSTREAM_TEST_BROKER), dask processes.
#
#   python/tests/run.sh [WHEEL] [pytest args...]
#
# WHEEL defaults to the one scripts/wheel.sh left in target/wheels/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
die() { printf 'python tests: error: %s\n' "$*" >&2; exit 1; }

WHEEL="${1:-}"
[[ $# -gt 0 ]] && shift
if [[ -z "$WHEEL" ]]; then
  WHEEL="$(ls "$ROOT"/target/wheels/credstream-*.whl 2>/dev/null | head -1 || true)"
fi
[[ -f "$WHEEL" ]] || die "no wheel (build it with scripts/wheel.sh)"
# Absolute: pytest runs from python/tests.
WHEEL="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"
export CREDSTREAM_TEST_WHEEL="$WHEEL"
export CREDSTREAM_TEST_PYTHON="${CREDSTREAM_TEST_PYTHON:-$ROOT/.venv/bin/python}"
export CREDSTREAM_TEST_BROKER="${CREDSTREAM_TEST_BROKER:-$ROOT/target/debug/credstream-broker}"
[[ -x "$CREDSTREAM_TEST_PYTHON" ]] || die "$CREDSTREAM_TEST_PYTHON is missing; run scripts/provision.sh"
"$CREDSTREAM_TEST_PYTHON" -c 'import moto.server' 2>/dev/null || die "moto is not installed in $CREDSTREAM_TEST_PYTHON"
[[ -x "$CREDSTREAM_TEST_BROKER" ]] || die "$CREDSTREAM_TEST_BROKER is missing; run cargo build --bins"
command -v python3 >/dev/null || die "python3 is not on PATH"

VENV="$ROOT/target/python-tests/venv"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "$WHEEL" \
  -r "$ROOT/python/tests/requirements.txt"

cd "$ROOT/python/tests"
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -v -rA "$@"
