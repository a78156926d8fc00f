#!/usr/bin/env bash
# The etcd part of restoring a kms cluster backup (`kms backup create
# --cluster` wrote DIR/etcd/snapshot.db): etcd's own `etcdctl snapshot
# restore` into one FRESH data directory per member of a NEW etcd cluster.
#
#   scripts/etcd-snapshot-restore.sh SNAPSHOT OUT_DIR CLUSTER_TOKEN NAME=PEER_URL...
#
# e.g. scripts/etcd-snapshot-restore.sh /backups/b1/etcd/snapshot.db /var/lib/etcd-new \
#        kms-restored-1 n1=http://10.0.0.1:2380 n2=http://10.0.0.2:2380 n3=http://10.0.0.3:2380
#
# Writes OUT_DIR/NAME.etcd for every member (each must not exist yet) and
# prints, per member, the etcd flags to start it with. etcdctl checks the
# snapshot's own SHA-256 (refusing a damaged file); check the kms manifest
# first anyway (`kms backup restore --cluster` does, before it changes
# anything). Start every member with its printed flags (and your usual
# client URLs and TLS flags), then run `kms backup restore --cluster`
# with every kms node stopped, then start the nodes.
#
# Each member directory is what that member alone may use: copy
# OUT_DIR/NAME.etcd to member NAME's host. A new cluster token keeps the
# restored members from ever joining the old ones. Uses `etcdctl` from PATH
# (Debian etcd-client 3.4; KMS_ETCDCTL overrides).
set -euo pipefail

usage() {
    echo "usage: $0 SNAPSHOT OUT_DIR CLUSTER_TOKEN NAME=PEER_URL..." >&2
    exit 2
}
[ $# -ge 4 ] || usage
SNAPSHOT=$1
OUT=$2
TOKEN=$3
shift 3
ETCDCTL=${KMS_ETCDCTL:-etcdctl}

[ -f "$SNAPSHOT" ] || { echo "$SNAPSHOT: no such file" >&2; exit 1; }
INITIAL=""
for member in "$@"; do
    case "$member" in
        *=*) ;;
        *) usage ;;
    esac
    INITIAL="${INITIAL:+$INITIAL,}$member"
done
mkdir -p "$OUT"
for member in "$@"; do
    NAME=${member%%=*}
    PEER=${member#*=}
    DATA="$OUT/$NAME.etcd"
    if [ -e "$DATA" ]; then
        echo "$DATA exists: restore into fresh data directories only" >&2
        exit 1
    fi
    ETCDCTL_API=3 "$ETCDCTL" snapshot restore "$SNAPSHOT" \
        --name "$NAME" \
        --data-dir "$DATA" \
        --initial-cluster "$INITIAL" \
        --initial-cluster-token "$TOKEN" \
        --initial-advertise-peer-urls "$PEER" >&2
    echo "$NAME: etcd --name $NAME --data-dir $DATA --initial-advertise-peer-urls $PEER --listen-peer-urls $PEER --initial-cluster $INITIAL --initial-cluster-token $TOKEN"
done
