#!/usr/bin/env bash
# Installs what building and testing kms needs on Debian 12, if missing:
# SoftHSM2 (the HSM in every test and in dev mode), openCryptoki (a second
# PKCS#11 implementation for kms-hsm's tests), clang/libclang (RocksDB's
# bindings), OpenSC's pkcs11-tool (operator convenience), openssl (the TLS
# walkthrough's demo certificates), etcd and etcdctl (the cluster tests start
# their own etcd members on random loopback ports), protoc (the etcd client's
# build), and the Python gRPC
# packages one test uses as an independent gRPC client, and Python cryptography
# for the envelope format's independent check. Idempotent and quiet
# when everything is present.
set -euo pipefail

need_apt=()
[ -f /usr/lib/softhsm/libsofthsm2.so ] || need_apt+=(softhsm2)
command -v softhsm2-util >/dev/null || need_apt+=(softhsm2)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v clang >/dev/null || need_apt+=(clang)
command -v pkcs11-tool >/dev/null || need_apt+=(opensc)
# openCryptoki: the second PKCS#11 implementation kms-hsm is tested against
# (scripts/opencryptoki-token.sh starts its pkcsslotd and prepares the token).
[ -x /usr/sbin/pkcsslotd ] || need_apt+=(opencryptoki)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# h2load: kms-bench's C load generator (server CPU per call without our client).
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
# etcd 3.4 for the cluster tests and scripts/cluster-demo.sh. The Debian package
# may start an etcd service on 2379/2380: nothing here uses or depends on it.
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
# protoc: etcd-client (the Rust crate of the etcd catalogue backend) needs it at build time.
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
# ... and protobuf's well-known types (google/protobuf/descriptor.proto,
# struct.proto), which etcd's protos import and protoc finds under /usr/include.
[ -e /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# Python packages for the reflection test and the Kubernetes plugin tests (gRPC
# clients that are not ours; grpcio-tools generates the Kubernetes KMS v2 stubs
# from proto/k8s.io/kms/apis/v2/api.proto at test time).
if ! python3 -c 'import grpc, grpc_reflection, grpc_tools' >/dev/null 2>&1; then
  echo "setup: installing grpcio, grpcio-reflection, grpcio-tools (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check grpcio grpcio-reflection grpcio-tools protobuf \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages grpcio grpcio-reflection grpcio-tools protobuf
fi

# The AWS KMS API tests (tests/e2e/aws_api.rs, tests/scripts/aws_kms_clients.py):
# the real AWS clients (boto3, the AWS Encryption SDK, the AWS CLI) and moto,
# the in-process reference for response shapes.
if ! python3 -c 'import boto3, aws_encryption_sdk, moto.server, flask, flask_cors' >/dev/null 2>&1 \
    || ! command -v aws >/dev/null 2>&1; then
  echo "setup: installing boto3, aws-encryption-sdk, awscli, moto[server] (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check boto3 aws-encryption-sdk awscli 'moto[server]' \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages boto3 aws-encryption-sdk awscli 'moto[server]'
fi

# The envelope format's independent check (tests/scripts/envelope_check.py):
# AES-GCM and HKDF from a library that is not ours.
if ! python3 -c 'import cryptography.hazmat.primitives.ciphers.aead' >/dev/null 2>&1; then
  echo "setup: installing cryptography (pip)" >&2
  python3 -m pip install --quiet --disable-pip-version-check cryptography \
    || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages cryptography
fi
