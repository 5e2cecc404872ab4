#!/usr/bin/env bash
# Checks that each crate vendored under third_party/ is its crates.io
# release plus exactly its credstream.patch, so that drift or a missed
# security release cannot hide in the vendored source. Called by
# scripts/test.sh; needs curl (or the crate in cargo's cache), patch, python3.
#
#   third_party/h2      h2 0.4.20      smaller per-connection buffers
#   third_party/rustls  rustls 0.23.46 no receive buffer while idle
#
# What may differ from the release, and nothing else:
#   - files the vendored copy leaves out: benches/, examples/, Cargo.lock,
#     Cargo.toml.orig, CHANGELOG.md, CONTRIBUTING.md;
#   - Cargo.toml without its [[example]], [[bench]] and [dev-dependencies]
#     sections (compared as TOML);
#   - the source changes of credstream.patch;
#   - this project's files: credstream.patch, CREDSTREAM_PATCHES.md, .cargo-ok.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { printf 'check-vendored: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# check NAME VERSION SHA256: the checksum is the "cksum" of that version in
# the crates.io index (https://index.crates.io/<prefix>/<name>).
check() {
  local name="$1" version="$2" sha256="$3"
  local vendored="$ROOT/third_party/$name"
  local crate="$WORK/$name-$version.crate"
  local cached
  cached="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version".crate 2>/dev/null | head -1 || true)"
  if [[ -n "$cached" ]]; then
    cp "$cached" "$crate"
  else
    curl -fsSL --retry 3 -o "$crate" "https://static.crates.io/crates/$name/$name-$version.crate" \
      || die "cannot download $name $version from static.crates.io"
  fi
  echo "$sha256  $crate" | sha256sum -c --quiet - \
    || die "$name-$version.crate does not have the checksum crates.io publishes"

  tar xzf "$crate" -C "$WORK"
  local upstream="$WORK/$name-$version"
  rm -rf "$upstream"/{benches,examples,Cargo.lock,Cargo.toml.orig,CHANGELOG.md,CONTRIBUTING.md}
  (cd "$upstream" && patch -p1 --quiet --no-backup-if-mismatch < "$vendored/credstream.patch") \
    || die "third_party/$name/credstream.patch does not apply to the $name $version release"

  "${PYTHON:-python3}" - "$upstream/Cargo.toml" "$vendored/Cargo.toml" <<'PY' \
    || die "third_party/$name/Cargo.toml differs from the release beyond the dropped example, bench and dev-dependency sections"
import sys, tomllib
upstream, vendored = (tomllib.load(open(p, "rb")) for p in sys.argv[1:])
for key in ("example", "bench", "dev-dependencies"):
    upstream.pop(key, None)
sys.exit(0 if upstream == vendored else 1)
PY

  if ! diff -r -q \
      -x Cargo.toml -x credstream.patch -x CREDSTREAM_PATCHES.md -x .cargo-ok \
      "$upstream" "$vendored"; then
    die "third_party/$name differs from $name $version + credstream.patch (see the files above)"
  fi
  echo "check-vendored: third_party/$name is $name $version + credstream.patch, nothing else"
}

check h2 0.4.20 7d29020232d6aa3fb1daca64c1127cf662cf97f254ae16c18c05b8ab635fc118
check rustls 0.23.46 48e13bd8c0e9365c43cfa5c9e8f9ad49d3c8444926c9aac819e0e4dc503c8fdf
