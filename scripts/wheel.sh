#!/usr/bin/env bash
# Builds the `credstream` Python wheel into target/wheels/: the importable
# package (python/credstream, with the PyO3 module built from python/src)
# and the `credstream` and `credstream-agent` release binaries, which pip
# installs onto PATH (the environment's bin/).
#
# manylinux: everything is linked against glibc 2.17 with zig (the
# `ziglang` and `cargo-zigbuild` packages from PyPI, in .venv): the binaries
# with cargo-zigbuild, the extension module with `maturin --zig`, so the
# wheel is tagged manylinux_2_17 (manylinux2014) and installs on any
# x86_64 Linux with glibc >= 2.17. The tag is printed at the end.
#
# Needs scripts/provision.sh's .venv (maturin, ziglang, cargo-zigbuild);
# a missing tool is an error, never a skip. Runnable from any directory.
# Prints the wheel's path as its last line.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
die() { printf 'wheel: error: %s\n' "$*" >&2; exit 1; }
for tool in maturin cargo-zigbuild python; do
  [[ -x "$VENV/bin/$tool" ]] || die "$VENV/bin/$tool is missing; run scripts/provision.sh"
done
"$VENV/bin/python" -m ziglang version >/dev/null 2>&1 || die "the ziglang package is missing from .venv; run scripts/provision.sh"
# cargo-zigbuild and maturin find zig as `python -m ziglang` with the
# python first on PATH.
export PATH="$VENV/bin:$PATH"

ARCH="$(uname -m)"
TRIPLE="$ARCH-unknown-linux-gnu"
GLIBC="2.17"
DATA="$ROOT/python/wheel-data/scripts"
OUT="$ROOT/target/wheels"

# Both binaries and the module are stripped, so the release profile's line
# tables (kept for the bench's profiles) would only take disk.
export CARGO_PROFILE_RELEASE_DEBUG=false

printf 'wheel: building credstream and credstream-agent for %s (glibc %s)\n' "$TRIPLE" "$GLIBC"
cargo zigbuild --release --locked --target "$TRIPLE.$GLIBC" \
  -p credstream-client --bin credstream -p credstream-agent --bin credstream-agent

rm -rf "$ROOT/python/wheel-data"
mkdir -p "$DATA"
for bin in credstream credstream-agent; do
  install -m 0755 "$ROOT/target/$TRIPLE/release/$bin" "$DATA/$bin"
  # The release profile keeps line tables for the bench's profiles; the
  # wheel does not need them.
  strip "$DATA/$bin"
done

mkdir -p "$OUT"
rm -f "$OUT"/credstream-*.whl
printf 'wheel: building the wheel with maturin --zig\n'
maturin build --release --locked --strip --zig --target "$TRIPLE" \
  --compatibility "manylinux_2_17" \
  --manifest-path "$ROOT/python/Cargo.toml" --out "$OUT"

WHEEL="$(ls "$OUT"/credstream-*.whl)"
[[ "$(wc -l <<<"$WHEEL")" -eq 1 ]] || die "expected one wheel in $OUT, found: $WHEEL"
# Check the contents: the module, the native module's stub and both commands
# (the Python modules carry their own annotations; py.typed marks them).
"$VENV/bin/python" - "$WHEEL" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["credstream/__init__.py", "credstream/dask.py", "credstream/py.typed",
        "credstream/_credstream.pyi"]
need += [n for n in names if n.endswith(".data/scripts/credstream")][:1] or ["<name>.data/scripts/credstream"]
need += [n for n in names if n.endswith(".data/scripts/credstream-agent")][:1] or ["<name>.data/scripts/credstream-agent"]
missing = [n for n in need if n not in names]
if not any(n.startswith("credstream/_credstream") and n.endswith(".so") for n in names):
    missing.append("credstream/_credstream*.so")
if missing:
    sys.exit(f"wheel: error: the wheel lacks {missing}")
PY
printf 'wheel: tag %s\n' "$(basename "$WHEEL" .whl | cut -d- -f3-)"
echo "$WHEEL"
