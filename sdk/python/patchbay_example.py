#!/usr/bin/env python3
"""A patchbay client in Python: the full cycle a tool runs against patchbayd.

Lists the agents, attaches a `count` tracer to a running process, reads its counts,
attaches a `trace` tracer and streams a few of its events, then detaches both and waits
until their trampolines may be freed. Prints what it saw as one JSON object on stdout.

    python3 sdk/python/patchbay_example.py --pid PID [--function GLOB] [--socket PATH]

Needs `pip install grpcio grpcio-tools grpcio-status`. The stubs are generated from
`proto/` with grpcio-tools into a temporary directory at start (pass `--stubs DIR` to
use or keep a directory); they are never committed. The socket defaults to the server's
own rule: $PATCHBAY_SOCKET, else $XDG_RUNTIME_DIR/patchbay/patchbayd.sock, else
/tmp/patchbay-$UID/patchbayd.sock.

Errors: every patchbay error status carries a `google.rpc.ErrorInfo` (domain
"patchbay.dev") whose `reason` (NO_AGENT, UNKNOWN_TRACER, ...) a tool can match on; see
`reason_of` below and docs/api.md.
"""

import argparse
import importlib
import json
import os
import sys
import tempfile
import time

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto", "proto")
PROTO_FILES = ["patchbay/v1/types.proto", "patchbay/v1/control.proto"]
PROTOCOL_VERSION = "1"
DOMAIN = "patchbay.dev"


def default_socket():
    if os.environ.get("PATCHBAY_SOCKET"):
        return os.environ["PATCHBAY_SOCKET"]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "patchbay", "patchbayd.sock")
    return "/tmp/patchbay-%d/patchbayd.sock" % os.getuid()


def generate_stubs(out_dir):
    """Compiles the .proto files into `out_dir` with grpcio-tools and imports them."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", "-I" + PROTO_ROOT, "-I" + well_known, "--python_out=" + out_dir,
            "--grpc_python_out=" + out_dir] + PROTO_FILES
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed on %s" % PROTO_FILES)
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("patchbay.v1.control_pb2")
    types = importlib.import_module("patchbay.v1.types_pb2")
    grpc_mod = importlib.import_module("patchbay.v1.control_pb2_grpc")
    return pb, types, grpc_mod


def reason_of(err):
    """The (code name, ErrorInfo reason, metadata) of a failed call."""
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(err)
    reason, metadata = None, {}
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                reason, metadata = info.reason, dict(info.metadata)
    return err.code().name, reason, metadata


def run(args, pb, types, grpc_mod):
    import grpc

    # grpc's C core sends the socket path as the HTTP/2 :authority, which the server's
    # HTTP/2 stack refuses as malformed (RST_STREAM): name a plain authority instead.
    channel = grpc.insecure_channel("unix:" + args.socket,
                                    options=[("grpc.default_authority", "localhost")])
    control = grpc_mod.ControlStub(channel)
    md = [("x-patchbay-protocol", PROTOCOL_VERSION)]
    out = {}

    agents = control.ListAgents(pb.ListAgentsRequest(), metadata=md, timeout=10).agents
    out["agents"] = [{"pid": a.pid, "exe": a.exe, "connected": a.connected} for a in agents]
    if not any(a.pid == args.pid and a.connected for a in agents):
        raise SystemExit("no connected agent in pid %d: %s" % (args.pid, out["agents"]))

    # An error a tool can act on without parsing English.
    try:
        control.Counts(pb.CountsRequest(tracer_id=2**63), metadata=md, timeout=10)
        raise SystemExit("Counts of an unknown tracer succeeded")
    except grpc.RpcError as err:
        code, reason, metadata = reason_of(err)
        out["error_example"] = {"code": code, "reason": reason, "metadata": metadata}

    def attach(kind, **callback):
        spec = pb.TracerSpec(target=pb.Target(pid=args.pid), pattern=args.function,
                             callback=types.CallbackSpec(kind=kind, **callback),
                             name="python example")
        r = control.Attach(pb.AttachRequest(spec=spec, timeout_ms=int(args.timeout * 1000)),
                           metadata=md, timeout=args.timeout + 10)
        patched = sum(x.sites_patched for x in r.results)
        errors = [x.error for x in r.results if x.error]
        if patched == 0 or errors:
            raise SystemExit("attach patched %d sites: %s" % (patched, errors))
        return r.tracer.tracer_id, patched

    count_id, patched = attach(types.CALLBACK_KIND_COUNT)
    out["count_tracer"] = {"id": count_id, "sites": patched}
    deadline = time.monotonic() + args.timeout
    while True:
        counts = control.Counts(pb.CountsRequest(tracer_id=count_id), metadata=md, timeout=10)
        if counts.total > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out["count_tracer"]["total"] = counts.total
    out["count_tracer"]["counts"] = {c.function: c.count for c in counts.counts}

    trace_id, _ = attach(types.CALLBACK_KIND_TRACE, arg_count=2)
    events = []
    stream = control.WatchEvents(pb.WatchEventsRequest(tracer_id=trace_id), metadata=md,
                                 timeout=args.timeout)
    try:
        for batch in stream:
            for e in batch.events:
                events.append({"function": e.function, "tid": e.tid, "args": list(e.args),
                               "timestamp_ns": e.timestamp_ns})
            if len(events) >= args.events:
                break
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        stream.cancel()
    out["trace_tracer"] = {"id": trace_id, "events": events[: args.events]}

    out["detached"] = []
    for tracer_id in (count_id, trace_id):
        r = control.Detach(pb.DetachRequest(tracer_id=tracer_id, wait=True,
                                            timeout_ms=int(args.timeout * 1000)),
                           metadata=md, timeout=args.timeout + 10)
        out["detached"].append({"id": tracer_id, "retired": len(r.retired),
                                "complete": r.complete})
    left = control.ListTracers(pb.ListTracersRequest(), metadata=md, timeout=10).tracers
    # A detached tracer stays listed as DETACHING until its agents confirm the frees.
    out["tracers_left"] = {str(t.tracer_id): pb.TracerState.Name(t.state) for t in left
                           if t.tracer_id in (count_id, trace_id)}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid", type=int, required=True, help="process running the agent")
    p.add_argument("--function", default="work", help="glob of functions to trace")
    p.add_argument("--socket", default=default_socket(), help="patchbayd's Unix socket")
    p.add_argument("--events", type=int, default=5, help="events to stream")
    p.add_argument("--timeout", type=float, default=20.0,
                   help="seconds to wait for an attach, counts, events and a detach")
    p.add_argument("--stubs", help="directory for the generated stubs (default: temporary)")
    args = p.parse_args()
    if args.stubs:
        os.makedirs(args.stubs, exist_ok=True)
        out = run(args, *generate_stubs(args.stubs))
    else:
        with tempfile.TemporaryDirectory(prefix="patchbay-stubs-") as d:
            out = run(args, *generate_stubs(d))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
