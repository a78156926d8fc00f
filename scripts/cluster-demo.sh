#!/usr/bin/env bash
# A local kms cluster on loopback: 3 etcd members and 3 kms nodes, all state
# under DIR (etcd data, one SoftHSM2 token per node holding the same
# development root, each node's configuration, data directory and log).
#
#   scripts/cluster-demo.sh DIR
#
# Prints one line per node, "node N: 127.0.0.1:PORT", once every node reports
# SERVING on gRPC health, then runs until SIGTERM or Ctrl-C, when it stops
# everything it started (and nothing else). DIR must be new, empty, or a DIR
# an earlier run of this script made (its state is reused: same tokens, same
# root, same etcd data); a DIR holding anything else is refused.
#
# The same root on every token: SoftHSM2 cannot clone a trusted root, so the
# demo SO-imports one random development root value (DIR/secrets/dev-root.bin)
# on each token with `kms-test-root`, a binary of the test crate (kms-tests)
# that neither the `kms` binary nor any configuration can reach. A root whose
# value sits in a file protects nothing: this is for demonstrations only.
# Production domains clone the root with the HSM vendor's mechanism.
#
# KMS_DEMO_SKIP_BUILD=1 uses the binaries already built; KMS_DEMO_NO_NODES=1
# stops short of the kms nodes (etcd and the tokens only, printing
# "etcd: URLS"), for checking the script without a cluster-capable kms.
set -euo pipefail

usage() { echo "usage: $0 DIR" >&2; exit 2; }
[ $# -eq 1 ] || usage
DIR=$1
MARKER=".kms-cluster-demo"
NODES=3
MEMBERS=3

if [ -e "$DIR" ]; then
  [ -d "$DIR" ] || { echo "$0: $DIR exists and is not a directory" >&2; exit 1; }
  if [ ! -e "$DIR/$MARKER" ] && [ -n "$(ls -A "$DIR")" ]; then
    echo "$0: $DIR holds something else (no $MARKER); refusing to use it" >&2
    exit 1
  fi
fi
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
touch "$DIR/$MARKER"
# One demo per DIR: a second one would find the first one's nodes serving
# on the same ports and report them as its own.
exec 9>"$DIR/.lock"
if ! flock -n 9; then
  echo "$0: another cluster-demo is running on $DIR; stop it first (Ctrl-C or SIGTERM)" >&2
  exit 1
fi

cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${KMS_DEMO_SKIP_BUILD:-}" ]; then
  # The same selection as scripts/test.sh: anything else recompiles RocksDB.
  cargo build --quiet --workspace --all-targets --all-features --locked
fi
BIN="${CARGO_TARGET_DIR:-target}/debug"
KMS="$BIN/kms"
TEST_ROOT="$BIN/kms-test-root"
MODULE=${KMS_SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
for tool in "$KMS" "$TEST_ROOT"; do
  [ -x "$tool" ] || { echo "$0: $tool not built" >&2; exit 1; }
done

etcd_pids=()
kms_pids=()
# SIGTERM to each process in $@, SIGKILL to any still running after 10 s.
stop_all() {
  local pid alive
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 100); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 0.1
  done
  for pid in "$@"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}
cleanup() {
  trap - EXIT INT TERM
  # Only the processes this script started, by their ids: the kms nodes
  # first (they flush their audit logs), then etcd (a leader that loses its
  # peers takes seconds to stop, hence the SIGKILL after a grace period).
  stop_all "${kms_pids[@]}"
  stop_all "${etcd_pids[@]}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Free loopback ports, chosen once and kept in DIR so that a rerun reuses
# them (etcd members remember their peer URLs).
if [ ! -f "$DIR/ports" ]; then
  python3 - "$((2 * MEMBERS + NODES))" >"$DIR/ports" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
fi
read -r -a PORTS <"$DIR/ports"

# --- etcd -----------------------------------------------------------------
mkdir -p "$DIR/etcd"
initial=""
endpoints=()
for i in $(seq 1 $MEMBERS); do
  peer=${PORTS[$((2 * i - 1))]}
  initial+="${initial:+,}n$i=http://127.0.0.1:$peer"
  endpoints+=("http://127.0.0.1:${PORTS[$((2 * i - 2))]}")
done
[ -f "$DIR/etcd/token" ] || echo "kms-demo-$$-$(date +%s%N)" >"$DIR/etcd/token"
for i in $(seq 1 $MEMBERS); do
  client=${PORTS[$((2 * i - 2))]}
  peer=${PORTS[$((2 * i - 1))]}
  etcd --name "n$i" --data-dir "$DIR/etcd/n$i.etcd" \
    --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "$initial" --initial-cluster-state new \
    --initial-cluster-token "$(cat "$DIR/etcd/token")" \
    --logger zap --log-outputs stderr </dev/null >>"$DIR/etcd/n$i.log" 2>&1 &
  etcd_pids+=($!)
done
all_endpoints=$(IFS=,; echo "${endpoints[*]}")
for _ in $(seq 1 300); do
  if ETCDCTL_API=3 etcdctl --endpoints="$all_endpoints" --command-timeout=2s endpoint health >/dev/null 2>&1; then
    break
  fi
  sleep 0.1
done
ETCDCTL_API=3 etcdctl --endpoints="$all_endpoints" --command-timeout=2s endpoint health >/dev/null 2>&1 || {
  echo "$0: etcd did not become healthy; see $DIR/etcd/n*.log" >&2
  exit 1
}

# --- tokens with the same development root ----------------------------------
export SOFTHSM2_CONF="$DIR/softhsm/softhsm2.conf"
umask 077
mkdir -p "$DIR/softhsm/tokens" "$DIR/secrets"
[ -f "$SOFTHSM2_CONF" ] || printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
  "$DIR/softhsm/tokens" >"$SOFTHSM2_CONF"
[ -f "$DIR/secrets/user.pin" ] || od -An -tx1 -N12 /dev/urandom | tr -d ' \n' >"$DIR/secrets/user.pin"
[ -f "$DIR/secrets/so.pin" ] || od -An -tx1 -N12 /dev/urandom | tr -d ' \n' >"$DIR/secrets/so.pin"
[ -f "$DIR/secrets/dev-root.bin" ] || head -c 32 /dev/urandom >"$DIR/secrets/dev-root.bin"
for n in $(seq 1 $NODES); do
  if [ ! -f "$DIR/node-$n/.token-ready" ]; then
    mkdir -p "$DIR/node-$n/data"
    out=$(KMS_LOG=warn "$KMS" hsm init-token --module "$MODULE" --label "kms-node-$n" \
      --pin-file "$DIR/secrets/user.pin" --so-pin-file "$DIR/secrets/so.pin" 2>&1) \
      || { echo "$out" >&2; exit 1; }
    "$TEST_ROOT" --module "$MODULE" --token-label "kms-node-$n" --so-pin-file "$DIR/secrets/so.pin" \
      --pin-file "$DIR/secrets/user.pin" --value-file "$DIR/secrets/dev-root.bin" --epoch 1
    touch "$DIR/node-$n/.token-ready"
  fi
done

if [ -n "${KMS_DEMO_NO_NODES:-}" ]; then
  echo "etcd: $all_endpoints"
  wait
  exit 0
fi

# --- kms nodes ----------------------------------------------------------------
etcd_list=$(printf '"%s", ' "${endpoints[@]}")
etcd_list=${etcd_list%, }
for n in $(seq 1 $NODES); do
  port=${PORTS[$((2 * MEMBERS + n - 1))]}
  cat >"$DIR/node-$n/kms.toml" <<EOF
# Written by scripts/cluster-demo.sh: loopback only, every caller is "demo".
[server]
listen = "127.0.0.1:$port"

[auth]
admins = ["demo"]
anonymous_principal = "demo"

[[auth.default_grants]]
principal = "*"
permissions = ["encrypt", "decrypt", "generate-data-key", "describe"]

[hsm]
module = "$MODULE"
token_label = "kms-node-$n"
pin_file = "$DIR/secrets/user.pin"
wrapped_versions = true

[storage]
data_dir = "$DIR/node-$n/data"

[cluster]
node_id = "node-$n"
etcd_endpoints = [$etcd_list]
etcd_prefix = "/kms/v1/"
staleness_bound_ms = 5000
EOF
  KMS_LOG=info "$KMS" serve --config "$DIR/node-$n/kms.toml" \
    </dev/null >>"$DIR/node-$n/stdout.log" 2>>"$DIR/node-$n/kms.log" &
  kms_pids+=($!)
done

# gRPC health (grpc.health.v1.Health/Check, service ""): SERVING is field 1 = 1.
serving() {
  python3 - "$1" <<'EOF' >/dev/null 2>&1
import sys, grpc
channel = grpc.insecure_channel(sys.argv[1])
check = channel.unary_unary("/grpc.health.v1.Health/Check")
sys.exit(0 if check(b"", timeout=2) == b"\x08\x01" else 1)
EOF
}
for n in $(seq 1 $NODES); do
  port=${PORTS[$((2 * MEMBERS + n - 1))]}
  for _ in $(seq 1 600); do
    serving "127.0.0.1:$port" && break
    if ! kill -0 "${kms_pids[$((n - 1))]}" 2>/dev/null; then
      echo "$0: node $n exited; see $DIR/node-$n/kms.log" >&2
      exit 1
    fi
    sleep 0.2
  done
  serving "127.0.0.1:$port" || { echo "$0: node $n is not serving; see $DIR/node-$n/kms.log" >&2; exit 1; }
done
for n in $(seq 1 $NODES); do
  echo "node $n: 127.0.0.1:${PORTS[$((2 * MEMBERS + n - 1))]}"
done
wait
