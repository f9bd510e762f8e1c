#!/usr/bin/env python3
"""A real gRPC server and client (grpcio, the C-core stack) for tests/it/protocols.rs.

No protoc: generic handlers with identity (bytes) serializers. Service `legate.test.Echo`:
  Unary         echoes `echo:<request>`; initial metadata x-initial, trailing x-trailer and
                x-bin-bin (binary)
  Fail          aborts INVALID_ARGUMENT with a non-ASCII message and trailing x-why
  ServerStream  streams `first`, waits until Release is called, then `msg-1`..`msg-<n>`
  Release       lets the waiting ServerStream go on
  ClientStream  answers `<count>:<messages joined by ,>`
  Bidi          answers every message `echo:<message>` as it arrives
  Slow          answers after 5 s unless cancelled first (counted)
  Stats         answers `cancelled=<n>`

  grpc_peer.py serve           prints `PORT <n>`, serves until stdin closes
  grpc_peer.py client TARGET   runs every scenario against TARGET, prints one JSON object
  grpc_peer.py check           exits 0 when grpcio imports
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "legate.test.Echo"
OPTIONS = [("grpc.enable_http_proxy", 0)]

release = threading.Event()
cancelled = []
lock = threading.Lock()


def unary(req, ctx):
    ctx.send_initial_metadata((("x-initial", "i"),))
    ctx.set_trailing_metadata((("x-trailer", "t-value"), ("x-bin-bin", b"\x00\x01\xff")))
    return b"echo:" + req


def fail(req, ctx):
    ctx.set_trailing_metadata((("x-why", "because"),))
    ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request: caf\u00e9 50%")


def server_stream(req, ctx):
    yield b"first"
    if not release.wait(10):
        ctx.abort(grpc.StatusCode.ABORTED, "never released")
    release.clear()
    for i in range(1, int(req) + 1):
        yield b"msg-%d" % i


def do_release(req, ctx):
    release.set()
    return b"ok"


def client_stream(it, ctx):
    msgs = [m.decode() for m in it]
    return ("%d:%s" % (len(msgs), ",".join(msgs))).encode()


def bidi(it, ctx):
    for m in it:
        yield b"echo:" + m


def slow(req, ctx):
    done = threading.Event()

    def on_done():
        if not done.is_set():
            with lock:
                cancelled.append(1)

    ctx.add_callback(on_done)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and ctx.is_active():
        time.sleep(0.02)
    done.set()
    return b"slow"


def stats(req, ctx):
    with lock:
        return b"cancelled=%d" % len(cancelled)


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "Release": grpc.unary_unary_rpc_method_handler(do_release),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Stats": grpc.unary_unary_rpc_method_handler(stats),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("PORT %d" % port, flush=True)
    sys.stdin.read()
    server.stop(0)


def md(pairs):
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in (pairs or ())}


def outcome(f):
    """Run f; the status code name and details of an RpcError, or f's result."""
    try:
        return f()
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details(),
                "trailing": md(e.trailing_metadata())}


def client(target):
    ch = grpc.insecure_channel(target, options=OPTIONS)
    grpc.channel_ready_future(ch).result(timeout=10)
    u = lambda m: ch.unary_unary("/%s/%s" % (SERVICE, m))
    out = {}

    def run_unary():
        resp, call = u("Unary").with_call(b"hello", timeout=10)
        return {"code": call.code().name, "resp": resp.decode(),
                "initial": md(call.initial_metadata()), "trailing": md(call.trailing_metadata())}
    out["unary"] = outcome(run_unary)
    out["fail"] = outcome(lambda: u("Fail")(b"x", timeout=10))

    def run_server_stream():
        call = ch.unary_stream("/%s/ServerStream" % SERVICE)(b"3", timeout=10)
        got = [next(call).decode()]
        # Only a streamed (not buffered) response lets `first` arrive before Release.
        u("Release")(b"", timeout=10)
        got += [m.decode() for m in call]
        return {"code": call.code().name, "msgs": got}
    out["server_stream"] = outcome(run_server_stream)

    def run_client_stream():
        resp = ch.stream_unary("/%s/ClientStream" % SERVICE)(
            iter([b"a", b"b", b"c", b"d"]), timeout=10)
        return {"resp": resp.decode()}
    out["client_stream"] = outcome(run_client_stream)

    def run_bidi():
        # Lockstep: the next message is sent only after the previous answer arrived, which
        # deadlocks (and hits the deadline) if either direction is buffered.
        q = []
        cv = threading.Condition()

        def gen():
            for i in range(5):
                with cv:
                    cv.wait_for(lambda: len(q) == i, timeout=10)
                yield b"m%d" % i
        call = ch.stream_stream("/%s/Bidi" % SERVICE)(gen(), timeout=10)
        for r in call:
            with cv:
                q.append(r.decode())
                cv.notify()
        return {"code": call.code().name, "msgs": q}
    out["bidi"] = outcome(run_bidi)

    start = time.monotonic()
    out["client_deadline"] = outcome(lambda: u("Slow")(b"", timeout=0.3))
    out["client_deadline"]["elapsed_ms"] = int((time.monotonic() - start) * 1000)
    # The gateway passes the client's cancellation (RST_STREAM) upstream.
    for _ in range(100):
        out["stats"] = outcome(lambda: u("Stats")(b"", timeout=10).decode())
        if out["stats"] != "cancelled=0":
            break
        time.sleep(0.05)

    out["route_timeout"] = outcome(lambda: ch.unary_unary("/legate.test.Timeout/Slow")(b"", timeout=10))
    out["unavailable"] = outcome(lambda: ch.unary_unary("/legate.test.Dead/Unary")(b"", timeout=10))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "serve":
        serve()
    elif mode == "client":
        client(sys.argv[2])
    elif mode == "check":
        pass
    else:
        sys.exit(__doc__)
