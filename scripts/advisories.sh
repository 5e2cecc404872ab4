#!/usr/bin/env bash
# Audits the workspace's dependencies against the RustSec advisory database
# (cargo-audit, offline, against the copy in third_party/advisory-db/).
#
#   scripts/advisories.sh                  audit (CI runs this through scripts/test.sh)
#   scripts/advisories.sh refresh DIR      replace the copy with the database in DIR
#                                          (a clone of rustsec/advisory-db)
#
# Cargo.lock does not give a path dependency's version a source, so cargo-audit
# would skip the crates vendored under third_party/ (h2, rustls): the audit
# reads a copy of Cargo.lock in which they are marked as the crates.io releases
# they are (third_party/vendored.txt). Advisories listed in
# third_party/advisories-ignored.txt, each with its reason, do not fail it; one
# listed there that no longer matches anything does, so the list stays true.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DB="$ROOT/third_party/advisory-db"
IGNORED="$ROOT/third_party/advisories-ignored.txt"
PY="${PYTHON:-python3}"
CARGO_AUDIT_VERSION="0.22.2"

die() { printf 'advisories: %s\n' "$*" >&2; exit 1; }

if [[ "${1:-}" == "refresh" ]]; then
  [[ $# -eq 2 && -d "$2/crates" ]] || die "usage: scripts/advisories.sh refresh DIR (a clone of rustsec/advisory-db)"
  rev="$(git -C "$2" log -1 --format='%H %cs')"
  rm -rf "$DB/crates"
  cp -r "$2/crates" "$DB/crates"
  cp "$2/LICENSE.txt" "$DB/LICENSE.txt"
  "$PY" - "$DB/SNAPSHOT.md" "${rev% *}" "${rev#* }" <<'PY'
import re, sys
path, commit, day = sys.argv[1:]
text = open(path).read()
text = re.sub(r"at commit `[0-9a-f]{40}` \(\d{4}-\d{2}-\d{2}\)", f"at commit `{commit}` ({day})", text)
open(path, "w").write(text)
PY
  echo "advisories: third_party/advisory-db is now rustsec/advisory-db at ${rev}"
  exit 0
fi

command -v cargo-audit >/dev/null 2>&1 \
  || die "cargo-audit is not installed: cargo install cargo-audit --version $CARGO_AUDIT_VERSION --locked --no-default-features (scripts/provision.sh does)"

snapshot="$(grep -o 'at commit `[0-9a-f]*` ([0-9-]*)' "$DB/SNAPSHOT.md")"
day="${snapshot##*(}"; day="${day%)}"
age=$(( ( $(date +%s) - $(date -d "$day" +%s) ) / 86400 ))
echo "advisories: RustSec database $snapshot, $age days old (refresh: third_party/advisory-db/SNAPSHOT.md)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$ROOT/Cargo.lock" "$ROOT/third_party/vendored.txt" "$WORK/Cargo.lock" <<'PY'
import sys
lock, vendored, out = sys.argv[1:]
text = open(lock).read()
for line in open(vendored):
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        continue
    name, version, sha256 = fields
    entry = f'[[package]]\nname = "{name}"\nversion = "{version}"\n'
    if entry not in text:
        sys.exit(f"advisories: Cargo.lock has no path entry for {name} {version} (third_party/vendored.txt)")
    text = text.replace(entry, entry + 'source = "registry+https://github.com/rust-lang/crates.io-index"\n'
                        f'checksum = "{sha256}"\n')
open(out, "w").write(text)
PY

ignore_args=()
ignored_ids=()
while read -r id _; do
  [[ -z "$id" || "$id" == \#* ]] && continue
  ignore_args+=(--ignore "$id")
  ignored_ids+=("$id")
done <"$IGNORED"

# Every ignored advisory must still match something: audit once without the
# ignores, as JSON, and compare.
cargo-audit audit --db "$DB" --no-fetch --stale --file "$WORK/Cargo.lock" --json >"$WORK/all.json" 2>/dev/null || true
for id in "${ignored_ids[@]}"; do
  grep -q "\"$id\"" "$WORK/all.json" \
    || die "$id is ignored in third_party/advisories-ignored.txt but matches no dependency any more: remove its line"
done

cargo-audit audit --db "$DB" --no-fetch --stale --file "$WORK/Cargo.lock" \
  --deny unmaintained --deny unsound --deny yanked "${ignore_args[@]}"
echo "advisories: no known advisory affects the dependencies (ignored, with reasons: ${ignored_ids[*]:-none})"
