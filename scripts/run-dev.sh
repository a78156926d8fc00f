#!/usr/bin/env bash
# The README's run command: installs what is missing, builds kms and runs it on
# its embedded default (SoftHSM2 token + RocksDB under ./.kms-data, 127.0.0.1:7443).
#
# It builds exactly what scripts/test.sh builds (whole workspace, all targets,
# all features): Cargo would otherwise resolve a different feature set and
# compile RocksDB's C++ (10-15 minutes) a second time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --all-targets --all-features --locked
target="${CARGO_TARGET_DIR:-target}"
kms_cli="$(cd "$target/debug" && pwd)/kms"
echo "run-dev: the CLI is $kms_cli (plaintext gRPC on loopback, principal \"dev\"); in another terminal:" >&2
echo "run-dev:   $kms_cli key create --alias alias/demo && echo -n hi | $kms_cli encrypt --key alias/demo --out hi.bin" >&2
exec "$target/debug/kms" serve --dev --data-dir "${KMS_DATA_DIR:-./.kms-data}" "$@"
