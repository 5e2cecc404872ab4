#!/usr/bin/env bash
# The fan-out benchmark (issue 7): credstream vs etcd watch, NATS, Redis
# pub/sub and a minimal tonic fan-out, at N = 100, 1,000 and 10,000 agents.
#
#   scripts/bench.sh                      # everything, about 10 minutes
#   scripts/bench.sh --tls                # the same over TLS on every system,
#                                         # then the reconnect storms (plaintext
#                                         # and TLS) at the largest N (issue 18)
#   scripts/bench.sh --seal               # sealing off against on (issue 16):
#                                         # credstream alone at N=10,000, about
#                                         # 7 minutes (--seal-modes off,on: 4)
#   scripts/bench.sh --storm-only --storm 2000
#                                         # only the reconnect storms (plaintext,
#                                         # then TLS) at N=2,000: no fan-out, no
#                                         # other system; report-storm.json
#   scripts/bench.sh --agents 100,1000    # any credstream-bench flag
#
# With --seal the run is only the sealing comparison (no other system, no
# storms, no agent endpoint, nothing to install): at the largest --agents,
# each fan-out a fresh broker and N fresh agents, --seal-rounds (3) rounds
# of one fan-out per mode, the order rotating each round (off,relay,on |
# relay,on,off | on,off,relay) so that a drift of the shared machine weighs
# on every mode; medians per mode and the on/off ratios. Modes: off (clear);
# relay (the publisher seals each version once with credstream-proto's seal
# module, agents do not open: the sealed bytes alone); on (sealed, and every
# agent opens each update through its own credstream-agent Gate, the
# agent's verification path). One open and one seal are also timed in a
# tight loop. Output also in target/bench/report-seal.json.
#
# Installs the peers from Debian (etcd-server, nats-server, redis-server),
# builds the release binaries
# once, raises the open-file limit (hard cap 20,000 here: docs/facts.md, fact 17) and runs
# credstream-bench, which starts every server as its own process on
# 127.0.0.1 only, on ports below 32768, and stops each by its PID. This
# script stops the bench itself by PID if interrupted. Output: one table,
# then the JSON (also written to target/bench/report.json, or
# target/bench/report-tls.json with --tls).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

section() { printf '\n==> %s\n' "$*" >&2; }

SEAL=0
STORM_ONLY=0
for arg in "$@"; do
  if [[ "$arg" == "--seal" ]]; then SEAL=1; fi
  if [[ "$arg" == "--storm-only" ]]; then STORM_ONLY=1; fi
done
# The sealing comparison and the storms alone run credstream alone: no
# peers to install.
ALONE=$((SEAL || STORM_ONLY))

missing=()
((ALONE)) || command -v etcd >/dev/null || missing+=(etcd-server)
((ALONE)) || command -v nats-server >/dev/null || missing+=(nats-server)
((ALONE)) || command -v redis-server >/dev/null || missing+=(redis-server)
if ((${#missing[@]})); then
  section "apt-get install ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
# Debian may start the packaged services on install; the bench runs its own
# instances on other ports and leaves system services alone.

section "cargo build --release (broker, agent, bench)"
cargo build --release -p credstream-broker -p credstream-agent -p credstream-bench >&2

# 10,000 agents on one load process need ~10,000 descriptors there and as
# many in the server; children inherit the raised soft limit.
ulimit -n "$(ulimit -Hn)"
section "open files: $(ulimit -n)"

mkdir -p target/bench
REPORT=target/bench/report.json
for arg in "$@"; do
  if [[ "$arg" == "--tls" ]]; then REPORT=target/bench/report-tls.json; fi
done
if ((SEAL)); then REPORT=target/bench/report-seal.json; fi
if ((STORM_ONLY)); then REPORT=target/bench/report-storm.json; fi
BENCH_PID=""
cleanup() {
  if [[ -n "$BENCH_PID" ]] && kill -0 "$BENCH_PID" 2>/dev/null; then
    kill -TERM "$BENCH_PID" 2>/dev/null || true
    sleep 2
    kill -KILL "$BENCH_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT INT TERM

section "credstream-bench $*"
target/release/credstream-bench \
  --json "$REPORT" \
  --work-dir "$ROOT/target/bench/work" \
  "$@" &
BENCH_PID=$!
wait "$BENCH_PID"
BENCH_PID=""
