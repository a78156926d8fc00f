#!/usr/bin/env python3
"""Lists the services of a gRPC server through server reflection, with
grpcio-reflection: a client that is not ours. Then resolves one method's
input type, to prove the descriptors (and their imports) are complete.

Usage: reflection_probe.py HOST:PORT
Prints one service name per line, then "method-input kms.v1.Crypto.Encrypt <type>".
"""
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main() -> int:
    target = sys.argv[1]
    if not (target.startswith("127.") or target.startswith("localhost")):
        print("refusing a non-loopback target", file=sys.stderr)
        return 2
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        database = ProtoReflectionDescriptorDatabase(channel)
        for service in sorted(database.get_services()):
            print(service)
        pool = DescriptorPool(database)
        method = pool.FindMethodByName("kms.v1.Crypto.Encrypt")
        print(f"method-input kms.v1.Crypto.Encrypt {method.input_type.full_name}")
        fields = sorted(f.name for f in method.input_type.fields)
        print("fields " + ",".join(fields))
    return 0


if __name__ == "__main__":
    sys.exit(main())
