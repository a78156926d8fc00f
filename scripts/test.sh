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
# Clippy (check mode) compiles RocksDB's build script with a different set of
# host dependencies than `cargo build`/`cargo test`, so on a fresh machine it
# would compile RocksDB's C++ a second time (12 minutes on 2 cores) only to
# throw the library away: check mode never links. ROCKSDB_LIB_DIR tells
# librocksdb-sys's build script that a library exists (here: an empty
# directory), so it generates the bindings and skips the C++ build. The build
# that links (run-dev.sh, the tests below) never sees this variable.
no_link_dir="${CARGO_TARGET_DIR:-target}/clippy-no-rocksdb-link"
mkdir -p "$no_link_dir"
ROCKSDB_LIB_DIR="$no_link_dir" ROCKSDB_STATIC=1 \
  cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

echo "== tests"
if command -v cargo-nextest >/dev/null; then
  # nextest runs each test in its own process: SoftHSM2 state never leaks
  # between tests, and a hung test is reported instead of stalling CI.
  cargo nextest run --workspace --all-features --locked --no-fail-fast
else
  cargo test --workspace --all-features --locked --no-fail-fast
fi
