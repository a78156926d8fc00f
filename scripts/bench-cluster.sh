#!/usr/bin/env bash
# The cluster's cost on this machine: starts scripts/cluster-demo.sh (3 etcd
# members + 3 kms nodes) on a temp DIR and one single-node `kms serve --dev`
# on a free loopback port (its own temp data dir), runs
#   kms-bench cluster --endpoints N1,N2,N3 --single S "$@"
# and stops everything it started. Uses the debug binaries already built in
# ${CARGO_TARGET_DIR:-target} (build first: scripts/test.sh's selection).
# Temp dirs go under ${KMS_BENCH_DIR:-/var/tmp} (a real disk: fsyncs count).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/debug"
parent="${KMS_BENCH_DIR:-/var/tmp}"
work=$(mktemp -d "$parent/kms-bench-cluster.XXXXXX")
demo_pid=""
single_pid=""
cleanup() {
  trap - EXIT INT TERM
  # Only what this script started, by pid; the demo stops its own children.
  for pid in $single_pid $demo_pid; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in $single_pid $demo_pid; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

KMS_DEMO_SKIP_BUILD=1 bash scripts/cluster-demo.sh "$work/cluster" >"$work/demo.out" 2>"$work/demo.err" &
demo_pid=$!

mkdir -p "$work/single"
KMS_LOG=warn "$BIN/kms" serve --dev --listen 127.0.0.1:0 --data-dir "$work/single/data" \
  </dev/null >"$work/single.out" 2>"$work/single.err" &
single_pid=$!

for _ in $(seq 1 900); do
  [ "$(grep -c '^node [0-9]*: ' "$work/demo.out" 2>/dev/null || true)" -ge 3 ] && break
  kill -0 "$demo_pid" 2>/dev/null || { cat "$work/demo.err" >&2; echo "$0: cluster-demo exited" >&2; exit 1; }
  sleep 0.2
done
endpoints=$(sed -n 's/^node [0-9]*: //p' "$work/demo.out" | paste -sd, -)
[ "$(echo "$endpoints" | tr ',' '\n' | grep -c .)" -eq 3 ] || { echo "$0: cluster not up: $endpoints" >&2; exit 1; }
for _ in $(seq 1 600); do
  grep -q '^kms listening on ' "$work/single.out" && break
  kill -0 "$single_pid" 2>/dev/null || { cat "$work/single.err" >&2; exit 1; }
  sleep 0.1
done
single=$(sed -n 's/^kms listening on \([^ ]*\).*/\1/p' "$work/single.out" | head -1)
[ -n "$single" ] || { echo "$0: single node did not start" >&2; exit 1; }
echo "cluster: $endpoints  single: $single" >&2
"$BIN/kms-bench" cluster --endpoints "$endpoints" --single "$single" "$@"
