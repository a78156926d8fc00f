#!/usr/bin/env bash
# The README's benchmark command: installs what is missing, builds kms and
# kms-bench in release, and runs `kms-bench run` (a fresh `kms serve --dev`
# child on 127.0.0.1, audit synced; about 4 minutes). Prints the table and
# writes the JSON to bench/results/<date>.json unless KMS_BENCH_JSON says
# otherwise. Extra arguments go to `kms-bench run` (e.g. --quick, --filter
# Encrypt, --compare bench/results/<earlier>.json); `kms-bench run --help`
# lists them.
#
# The release build has its own target directory: the first one compiles
# RocksDB's C++ again (15-25 minutes on 2 cores), later ones are quick.
# KMS_BENCH_PROFILE=dev uses the test build instead (same command as
# scripts/test.sh, so its cache is shared; slower code, same tool).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

profile="${KMS_BENCH_PROFILE:-release}"
if [ "$profile" = release ]; then
  target="${KMS_BENCH_TARGET_DIR:-${CARGO_TARGET_DIR:-target}/bench-release}"
  CARGO_TARGET_DIR="$target" cargo build --release --workspace --bins --all-features --locked
  bin="$target/release"
else
  target="${CARGO_TARGET_DIR:-target}"
  cargo build --workspace --all-targets --all-features --locked
  bin="$target/debug"
fi

json="${KMS_BENCH_JSON:-bench/results/$(date -u +%F).json}"
mkdir -p "$(dirname "$json")"
# The data directories go on a real disk (/var/tmp): on tmpfs an fsync is
# free and the synced-audit figures would mean nothing.
exec "$bin/kms-bench" run --dir "${KMS_BENCH_DIR:-/var/tmp}" --json "$json" "$@"
