#!/usr/bin/env bash
# `kms re-encrypt` throughput against a dev server on this machine: starts
# `kms serve --dev` on a free loopback port (its own temp data dir), makes
# ${KMS_BENCH_BLOBS:-100000} input lines (${KMS_BENCH_DISTINCT:-200}
# distinct blobs made with `kms encrypt`, repeated: the server decrypts and
# encrypts every line whatever its bytes), rotates the key, and times
#   kms re-encrypt --in IN --out OUT --batch-size ${KMS_BENCH_BATCH:-500} --json
# printing the blobs per second. Every output line is then checked to name
# version 2 (by the JSON summary: moved = lines, failed = 0).
# Uses the binaries already built in ${CARGO_TARGET_DIR:-target}/${KMS_BENCH_PROFILE:-debug}.
# Temp dirs go under ${KMS_BENCH_DIR:-/var/tmp} (a real disk: fsyncs count).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${CARGO_TARGET_DIR:-target}/${KMS_BENCH_PROFILE:-debug}"
blobs="${KMS_BENCH_BLOBS:-100000}"
distinct="${KMS_BENCH_DISTINCT:-200}"
batch="${KMS_BENCH_BATCH:-500}"
work=$(mktemp -d "${KMS_BENCH_DIR:-/var/tmp}/kms-bench-reencrypt.XXXXXX")
server_pid=""
cleanup() {
  trap - EXIT INT TERM
  # Only the server this script started, by pid.
  [ -n "$server_pid" ] && { kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

KMS_LOG=warn "$BIN/kms" serve --dev --listen 127.0.0.1:0 --data-dir "$work/data" \
  </dev/null >"$work/server.out" 2>"$work/server.err" &
server_pid=$!
for _ in $(seq 1 600); do
  grep -q '^kms listening on ' "$work/server.out" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.err" >&2; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^kms listening on \([^ ]*\).*/\1/p' "$work/server.out" | head -1)
[ -n "$addr" ] || { echo "$0: the server did not start" >&2; exit 1; }
export KMS_ENDPOINT="http://$addr"
kms() { KMS_LOG=warn "$BIN/kms" "$@"; }

key=$(kms --json key create --description bench-reencrypt | sed -n 's/.*"key_id": *"\([^"]*\)".*/\1/p' | head -1)
[ -n "$key" ] || { echo "$0: no key created" >&2; exit 1; }
for i in $(seq 1 "$distinct"); do
  printf 'plaintext %d' "$i" | kms encrypt --key "$key" --base64
done >"$work/distinct.txt"
# Repeat the distinct blobs up to $blobs lines.
awk -v n="$blobs" '{ line[NR] = $0 } END { for (i = 0; i < n; i++) print line[i % NR + 1] }' \
  "$work/distinct.txt" >"$work/in.txt"
kms key rotate "$key" >/dev/null

start=$(date +%s.%N)
kms --json re-encrypt --in "$work/in.txt" --out "$work/out.txt" --batch-size "$batch" >"$work/summary.json"
end=$(date +%s.%N)
lines=$(wc -l <"$work/out.txt")
python3 - "$work/summary.json" "$start" "$end" "$lines" "$batch" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
start, end, lines, batch = float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
assert summary["moved"] == summary["lines"] == lines and summary["failed"] == 0, summary
seconds = end - start
print(f"re-encrypted {lines} blobs in {seconds:.1f} s, batch size {batch}: {lines / seconds:.0f} blobs/s")
PY
