#!/usr/bin/env bash
# The one test command (README quick start; .ci/run calls exactly this).
# Sets up a fresh Debian 12 machine, then runs the gates in order:
# rustfmt, clippy (warnings are errors), and every test of the workspace
# against real SoftHSM2 tokens, real RocksDB directories and real gRPC on
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== tests"
if command -v cargo-nextest >/dev/null; then
  # nextest runs each test in its own process: SoftHSM2 state never leaks
  # between tests, and a hung test is reported instead of stalling CI.
  cargo nextest run --workspace --all-features --locked --no-fail-fast
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
