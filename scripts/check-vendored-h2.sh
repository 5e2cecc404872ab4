#!/usr/bin/env bash
# Checks that third_party/h2 is the crates.io release of h2 0.4.20 plus
# exactly third_party/h2/credstream.patch, so that drift or a missed
# security release cannot hide in the vendored source. Called by
# scripts/test.sh; needs curl (or the crate in cargo's cache), patch, python3.
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
VENDORED="$ROOT/third_party/h2"
VERSION="0.4.20"
# From the crates.io index (https://index.crates.io/2/h2, "cksum" of 0.4.20).
SHA256="7d29020232d6aa3fb1daca64c1127cf662cf97f254ae16c18c05b8ab635fc118"

die() { printf 'check-vendored-h2: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
CRATE="$WORK/h2-$VERSION.crate"
cached="$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/h2-"$VERSION".crate 2>/dev/null | head -1 || true)"
if [[ -n "$cached" ]]; then
  cp "$cached" "$CRATE"
else
  curl -fsSL --retry 3 -o "$CRATE" "https://static.crates.io/crates/h2/h2-$VERSION.crate" \
    || die "cannot download h2 $VERSION from static.crates.io"
fi
echo "$SHA256  $CRATE" | sha256sum -c --quiet - || die "h2-$VERSION.crate does not have the checksum crates.io publishes"

tar xzf "$CRATE" -C "$WORK"
UPSTREAM="$WORK/h2-$VERSION"
rm -rf "$UPSTREAM"/{benches,examples,Cargo.lock,Cargo.toml.orig,CHANGELOG.md,CONTRIBUTING.md}
(cd "$UPSTREAM" && patch -p1 --quiet --no-backup-if-mismatch < "$VENDORED/credstream.patch") \
  || die "credstream.patch does not apply to the h2 $VERSION release"

"${PYTHON:-python3}" - "$UPSTREAM/Cargo.toml" "$VENDORED/Cargo.toml" <<'PY' || die "third_party/h2/Cargo.toml differs from the release beyond the dropped example, bench and dev-dependency sections"
import sys, tomllib
upstream, vendored = (tomllib.load(open(p, "rb")) for p in sys.argv[1:])
for key in ("example", "bench", "dev-dependencies"):
    upstream.pop(key, None)
sys.exit(0 if upstream == vendored else 1)
PY

if ! diff -r -q \
    -x Cargo.toml -x credstream.patch -x CREDSTREAM_PATCHES.md -x .cargo-ok \
    "$UPSTREAM" "$VENDORED"; then
  die "third_party/h2 differs from h2 $VERSION + credstream.patch (see the files above)"
fi
echo "check-vendored-h2: third_party/h2 is h2 $VERSION + credstream.patch, nothing else"
