#!/usr/bin/env bash
# The README's run command: installs what is missing, builds kms and runs it on
# its embedded default (SoftHSM2 token + RocksDB under ./.kms-data, 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --locked -p kms -- serve --dev --data-dir "${KMS_DATA_DIR:-./.kms-data}" "$@"
