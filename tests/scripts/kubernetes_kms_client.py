#!/usr/bin/env python3
"""A stand-in for kube-apiserver's KMS v2 client: speaks exactly the published
Kubernetes KMS v2 plugin API (proto/k8s.io/kms/apis/v2/api.proto, package v2)
over a Unix socket, with Python stubs generated from that file at run time by
grpcio-tools (nothing generated is checked in).

Usage:
    kubernetes_kms_client.py --proto PATH/api.proto --socket PATH < calls.json

stdin holds a JSON list of calls, made in order on one channel; stdout gets a
JSON list with one result per call. Bytes travel as base64.

    {"rpc": "Status"}
    {"rpc": "Encrypt", "plaintext": B64, "uid": "..."}
    {"rpc": "Decrypt", "ciphertext": B64, "key_id": "...", "uid": "...",
     "annotations": {"name": B64, ...}}
    {"rpc": "StatusUntil", "healthz_ok": true|false, "timeout_s": N}
        polls Status once a second, as kube-apiserver does while unhealthy,
        until healthz is (or is not) "ok"; the result is the last Status
        plus "polls".

Each result has "code" (the gRPC status name, "OK" on success) and either
the response's fields (bytes as base64, "annotations" as a map of base64) or
"message" (the status details). Timeouts as kube-apiserver's default (3 s).
"""

import argparse
import base64
import json
import os
import sys
import tempfile
import time


def generate_stubs(proto_path, out_dir):
    from grpc_tools import protoc

    include = os.path.dirname(os.path.abspath(proto_path))
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.basename(proto_path),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text.encode())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    calls = json.load(sys.stdin)

    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(args.proto, out_dir)
        sys.path.insert(0, out_dir)
        import grpc
        import api_pb2
        import api_pb2_grpc

        # kube-apiserver dials with grpc.WithAuthority("localhost")
        # (k8s.io/apiserver .../envelope/kmsv2/grpc_service.go); so does this
        # stand-in. (grpcio's default for a unix: target, the socket path,
        # is not a valid HTTP/2 :authority and h2 refuses it.)
        channel = grpc.insecure_channel(
            f"unix://{args.socket}", options=[("grpc.default_authority", "localhost")]
        )
        stub = api_pb2_grpc.KeyManagementServiceStub(channel)

        def call(method, request):
            try:
                return "OK", method(request, timeout=args.timeout), None
            except grpc.RpcError as error:
                return error.code().name, None, error.details()

        def status():
            code, reply, message = call(stub.Status, api_pb2.StatusRequest())
            if reply is None:
                return {"code": code, "message": message}
            return {
                "code": code,
                "version": reply.version,
                "healthz": reply.healthz,
                "key_id": reply.key_id,
            }

        results = []
        for spec in calls:
            rpc = spec["rpc"]
            if rpc == "Status":
                results.append(status())
            elif rpc == "StatusUntil":
                deadline = time.monotonic() + spec.get("timeout_s", 30)
                polls = 0
                while True:
                    polls += 1
                    last = status()
                    ok = last.get("healthz") == "ok"
                    if ok == spec["healthz_ok"] or time.monotonic() > deadline:
                        break
                    time.sleep(1)
                last["polls"] = polls
                results.append(last)
            elif rpc == "Encrypt":
                request = api_pb2.EncryptRequest(
                    plaintext=unb64(spec["plaintext"]), uid=spec.get("uid", "")
                )
                code, reply, message = call(stub.Encrypt, request)
                if reply is None:
                    results.append({"code": code, "message": message})
                else:
                    results.append(
                        {
                            "code": code,
                            "ciphertext": b64(reply.ciphertext),
                            "key_id": reply.key_id,
                            "annotations": {
                                k: b64(v) for k, v in reply.annotations.items()
                            },
                        }
                    )
            elif rpc == "Decrypt":
                request = api_pb2.DecryptRequest(
                    ciphertext=unb64(spec["ciphertext"]),
                    uid=spec.get("uid", ""),
                    key_id=spec.get("key_id", ""),
                    annotations={
                        k: unb64(v) for k, v in spec.get("annotations", {}).items()
                    },
                )
                code, reply, message = call(stub.Decrypt, request)
                if reply is None:
                    results.append({"code": code, "message": message})
                else:
                    results.append({"code": code, "plaintext": b64(reply.plaintext)})
            else:
                raise SystemExit(f"unknown rpc {rpc!r}")
        channel.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
