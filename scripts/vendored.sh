#!/usr/bin/env bash
# The crates vendored under third_party/ (listed in third_party/vendored.txt)
# are their crates.io release plus exactly their credstream.patch.
#
#   scripts/vendored.sh check           each copy is its release + patch, nothing
#                                       else, and no newer patch release exists
#                                       (CI runs this through scripts/test.sh)
#   scripts/vendored.sh update NAME     re-vendor NAME at its newest release of
#                                       the same minor version, apply its patch,
#                                       rewrite its line in vendored.txt
#   scripts/vendored.sh test-upstream   run h2's own unit tests on the patched
#                                       code (rustls': see test_upstream)
#   scripts/vendored.sh unpatched [ARGS] cargo ARGS (default: build --workspace)
#                                       against the crates.io releases, without
#                                       the patches, in target/unpatched: to take
#                                       a security release the day it is out
#
# What a vendored copy may differ in from its release, and nothing else:
#   - files it leaves out: benches/, examples/, Cargo.lock, Cargo.toml.orig,
#     CHANGELOG.md, CONTRIBUTING.md;
#   - Cargo.toml without its [[example]], [[bench]] and [dev-dependencies]
#     sections (compared as TOML);
#   - the source changes of credstream.patch;
#   - this project's files: credstream.patch, CREDSTREAM_PATCHES.md, .cargo-ok.
#
# Needs curl (or the crate in cargo's cache), patch, python3 >= 3.11.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIST="$ROOT/third_party/vendored.txt"
PY="${PYTHON:-python3}"

die() { printf 'vendored: %s\n' "$*" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# index_url NAME: the crate's file in crates.io's sparse index.
index_url() {
  local name="$1" n="${#1}"
  case "$n" in
    1) echo "https://index.crates.io/1/$name" ;;
    2) echo "https://index.crates.io/2/$name" ;;
    3) echo "https://index.crates.io/3/${name:0:1}/$name" ;;
    *) echo "https://index.crates.io/${name:0:2}/${name:2:2}/$name" ;;
  esac
}

# newest_patch NAME VERSION: "version sha256" of the newest release that is
# not yanked, not a pre-release, and has VERSION's major.minor.
newest_patch() {
  local name="$1" version="$2"
  curl -fsSL --retry 3 "$(index_url "$name")" | "$PY" -c '
import json, sys
want = sys.argv[1].split(".")[:2]
best = None
for line in sys.stdin:
    r = json.loads(line)
    v = r["vers"]
    if r["yanked"] or "-" in v or "+" in v or v.split(".")[:2] != want:
        continue
    key = tuple(int(p) for p in v.split("."))
    if best is None or key > best[0]:
        best = (key, v, r["cksum"])
print(best[1], best[2])
' "$version" || die "cannot read $name's releases from crates.io's index"
}

# fetch_release NAME VERSION SHA256: unpacks the verified release into
# $WORK/NAME-VERSION, less the files a vendored copy leaves out.
fetch_release() {
  local name="$1" version="$2" sha256="$3"
  local crate="$WORK/$name-$version.crate" cached
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
  rm -rf "$WORK/$name-$version"/{benches,examples,Cargo.lock,Cargo.toml.orig,CHANGELOG.md,CONTRIBUTING.md}
}

# apply_patch DIR PATCH
apply_patch() {
  (cd "$1" && patch -p1 --quiet --no-backup-if-mismatch < "$2") \
    || die "$2 does not apply to $(basename "$1")"
}

entries() { grep -v '^\s*#' "$LIST" | grep -v '^\s*$'; }

entry() {
  entries | awk -v n="$1" '$1 == n { print $2, $3; found = 1 } END { exit !found }' \
    || die "$1 is not listed in third_party/vendored.txt"
}

check_one() {
  local name="$1" version="$2" sha256="$3"
  local vendored="$ROOT/third_party/$name" upstream="$WORK/$name-$version"
  grep -q "^version = \"$version\"$" "$vendored/Cargo.toml" \
    || die "third_party/$name/Cargo.toml is not version $version (third_party/vendored.txt)"
  fetch_release "$name" "$version" "$sha256"
  apply_patch "$upstream" "$vendored/credstream.patch"

  "$PY" - "$upstream/Cargo.toml" "$vendored/Cargo.toml" <<'PY' \
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
  echo "vendored: third_party/$name is $name $version + credstream.patch, nothing else"

  local newest
  newest="$(newest_patch "$name" "$version")"
  if [[ "${newest%% *}" != "$version" ]]; then
    die "third_party/$name is $name $version but ${newest%% *} is released: run 'scripts/vendored.sh update $name' (third_party/$name/CREDSTREAM_PATCHES.md)"
  fi
  echo "vendored: $name $version is its newest patch release"
}

# strip_manifest FILE: drops [[example]], [[bench]] and [dev-dependencies*]
# tables from a normalised Cargo.toml, keeping every other line as it is.
strip_manifest() {
  "$PY" - "$1" <<'PY'
import re, sys
path = sys.argv[1]
out, skipping = [], False
for line in open(path).read().splitlines(keepends=True):
    header = re.match(r"^\s*\[\[?([^\]]+)\]\]?\s*$", line)
    if header:
        name = header.group(1).strip()
        skipping = name in ("example", "bench") or name == "dev-dependencies" or name.startswith("dev-dependencies.")
    if not skipping:
        out.append(line)
open(path, "w").write("".join(out))
PY
}

update_one() {
  local name="$1" old_version newest version sha256
  old_version="$(entry "$name" | cut -d' ' -f1)"
  newest="$(newest_patch "$name" "$old_version")"
  version="${newest%% *}"; sha256="${newest##* }"
  local vendored="$ROOT/third_party/$name" upstream="$WORK/$name-$version"
  fetch_release "$name" "$version" "$sha256"
  apply_patch "$upstream" "$vendored/credstream.patch"
  strip_manifest "$upstream/Cargo.toml"
  for keep in credstream.patch CREDSTREAM_PATCHES.md .cargo-ok; do
    [[ -e "$vendored/$keep" ]] && cp "$vendored/$keep" "$upstream/$keep"
  done
  rm -rf "$vendored"
  cp -r "$upstream" "$vendored"
  "$PY" - "$LIST" "$name" "$version" "$sha256" <<'PY'
import re, sys
path, name, version, sha = sys.argv[1:]
lines = open(path).read().splitlines(keepends=True)
for i, line in enumerate(lines):
    fields = line.split()
    if fields and fields[0] == name:
        lines[i] = f"{name:<8} {version:<8} {sha}\n"
open(path, "w").write("".join(lines))
PY
  echo "vendored: third_party/$name is now $name $version + credstream.patch (was $old_version);"
  echo "          update CREDSTREAM_PATCHES.md, run cargo update -p $name, scripts/test.sh and the bench"
}

# test_upstream: h2's own unit tests, on a fresh copy of the release with the
# patch applied and its dev-dependencies (the vendored copy drops them).
# Its HPACK fixture tests are skipped: they read fixtures/, which h2 leaves
# out of its crates.io package. rustls' own tests cannot run this way: its
# package leaves out the test data (testdata/, test-ca/) that even its
# deframer unit tests include at compile time, and its tests of the patched
# read path live in its repository, which CI cannot reach;
# broker/tests/tls_records.rs and tls_idle_memory.rs test that path here.
test_upstream() {
  local version sha256
  read -r version sha256 < <(entry h2)
  fetch_release h2 "$version" "$sha256"
  apply_patch "$WORK/h2-$version" "$ROOT/third_party/h2/credstream.patch"
  (cd "$WORK/h2-$version" && CARGO_TARGET_DIR="$ROOT/target/vendored-tests" \
    cargo test --lib -- --skip hpack::test::fixture)
}

case "${1:-check}" in
  check)
    while read -r name version sha256; do check_one "$name" "$version" "$sha256"; done < <(entries) ;;
  update)
    [[ $# -eq 2 ]] || die "usage: scripts/vendored.sh update NAME"
    update_one "$2" ;;
  test-upstream)
    test_upstream ;;
  unpatched)
    # A copy of the workspace without [patch.crates-io], built against the
    # crates.io releases in target/unpatched: the checkout is not touched.
    shift
    [[ $# -gt 0 ]] || set -- build --workspace
    copy="$WORK/workspace"
    mkdir -p "$copy"
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard --deduplicate \
      | grep -zv '^third_party/' \
      | (cd "$ROOT" && xargs -0 cp --parents -t "$copy")
    "$PY" - "$copy/Cargo.toml" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text, n = re.subn(r"\n\[patch\.crates-io\]\n(?:[^\n\[]+\n?)*", "\n", text)
assert n == 1, "no [patch.crates-io] table in Cargo.toml"
open(path, "w").write(text)
PY
    (cd "$copy" && CARGO_TARGET_DIR="$ROOT/target/unpatched" cargo "$@") ;;
  *)
    die "usage: scripts/vendored.sh [check | update NAME | test-upstream | unpatched [CARGO ARGS]]" ;;
esac
