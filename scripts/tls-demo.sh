#!/usr/bin/env bash
# Prepares the README's TLS/mTLS walkthrough in DIR (default ./kms-tls-demo):
#   - a SoftHSM2 token "kms-demo" with a random PIN (DIR/hsm.pin, 0600);
#   - a demo CA, a server certificate for localhost/127.0.0.1, and client
#     certificates whose URI SANs are SPIFFE ids: admin, billing, reports;
#   - DIR/kms.toml: TLS with required client certificates, admin as the only
#     administrator, default deny for every key.
# Then: SOFTHSM2_CONF=DIR/softhsm2.conf kms serve --config DIR/kms.toml
# Demo material only: a real deployment uses its own CA and HSM.
set -euo pipefail

dir=${1:-./kms-tls-demo}
listen=${2:-127.0.0.1:7443}
module=${KMS_SOFTHSM2_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
# The kms binary (KMS=target/debug/kms if it is not on PATH).
kms=${KMS:-kms}
trust_domain=example.org

mkdir -p "$dir/tokens" "$dir/pki" "$dir/db"
dir=$(cd "$dir" && pwd)
umask 077

# --- the HSM token ---------------------------------------------------------
cat >"$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
CONF
export SOFTHSM2_CONF="$dir/softhsm2.conf"
if [ ! -f "$dir/hsm.pin" ]; then
  # PINs go to 0600 files and reach the token through `kms hsm init-token`,
  # never through a command line (visible in ps).
  head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 24 >"$dir/hsm.pin"
  head -c 24 /dev/urandom | base64 | tr -d '/+=' | head -c 24 >"$dir/so.pin"
  "$kms" hsm init-token --module "$module" --label kms-demo \
    --pin-file "$dir/hsm.pin" --so-pin-file "$dir/so.pin"
fi

# --- the demo PKI ------------------------------------------------------------
pki="$dir/pki"
if [ ! -f "$pki/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
    -subj "/CN=kms demo CA" -keyout "$pki/ca.key" -out "$pki/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

issue() { # name, subjectAltName, extendedKeyUsage
  local name=$1 san=$2 eku=$3
  [ -f "$pki/$name.pem" ] && return
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=$name" -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.pem" -CAkey "$pki/ca.key" \
    -CAcreateserial -days 30 -out "$pki/$name.pem" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$san" "$eku") \
    2>/dev/null
  rm -f "$pki/$name.csr"
}
issue server "DNS:localhost,IP:127.0.0.1" serverAuth
issue admin "URI:spiffe://$trust_domain/ops/admin" clientAuth
issue billing "URI:spiffe://$trust_domain/ns/prod/sa/billing" clientAuth
issue reports "URI:spiffe://$trust_domain/ns/prod/sa/reports" clientAuth

# --- the configuration --------------------------------------------------------
cat >"$dir/kms.toml" <<TOML
[server]
listen = "$listen"

[server.tls]
cert_file = "$pki/server.pem"
key_file = "$pki/server.key"
client_ca_file = "$pki/ca.pem"
client_cert = "required"

[auth]
admins = ["spiffe://$trust_domain/ops/admin"]

[hsm]
module = "$module"
token_label = "kms-demo"
pin_file = "$dir/hsm.pin"
sync_token_dir = "$dir/tokens"

[storage]
data_dir = "$dir/db"
TOML

echo "prepared $dir: SOFTHSM2_CONF=$dir/softhsm2.conf kms serve --config $dir/kms.toml" >&2
