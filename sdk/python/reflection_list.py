#!/usr/bin/env python3
"""Lists patchbayd's services through gRPC server reflection, as `grpcurl list` does,
and the methods of each patchbay service resolved from the served descriptors.

    python3 sdk/python/reflection_list.py [--socket PATH]

Prints one line per service, then `SERVICE/METHOD` lines. Needs
`pip install grpcio grpcio-reflection`; no stubs and no .proto files.
"""

import argparse
import os

import grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool


def default_socket():
    if os.environ.get("PATCHBAY_SOCKET"):
        return os.environ["PATCHBAY_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "patchbay", "patchbayd.sock")
    return "/tmp/patchbay-%d/patchbayd.sock" % os.getuid()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=default_socket(), help="patchbayd's Unix socket")
    args = p.parse_args()
    # grpc's C core sends the socket path as the HTTP/2 :authority, which the server's
    # HTTP/2 stack refuses as malformed (RST_STREAM): name a plain authority instead.
    channel = grpc.insecure_channel("unix:" + args.socket,
                                    options=[("grpc.default_authority", "localhost")])
    db = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(db.get_services())
    for name in services:
        print(name)
    pool = DescriptorPool(db)
    for name in services:
        if name.startswith("patchbay."):
            for m in pool.FindServiceByName(name).methods:
                print("%s/%s" % (name, m.name))


if __name__ == "__main__":
    main()
