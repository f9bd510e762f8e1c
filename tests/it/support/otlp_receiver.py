#!/usr/bin/env python3
"""An OTLP/HTTP trace receiver for the tests: decodes each POST /v1/traces body with the
opentelemetry-proto package (protobuf) and prints one JSON line per span.

`otlp_receiver.py check` exits 0 when opentelemetry-proto imports; `otlp_receiver.py serve`
listens on 127.0.0.1 (a free port), prints `PORT <n>`, then the spans as they arrive. A request
that is not protobuf, or does not decode, is answered 400 and printed as {"error": ...}.
"""

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def check():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2  # noqa: F401


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        ctype = self.headers.get("content-type", "")
        if self.path != "/v1/traces" or ctype != "application/x-protobuf":
            emit({"error": f"{self.path} {ctype}"})
            return self.answer(400)
        req = trace_service_pb2.ExportTraceServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception as e:  # a body that is not the message
            emit({"error": str(e)})
            return self.answer(400)
        for rs in req.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    emit(
                        {
                            "trace_id": s.trace_id.hex(),
                            "span_id": s.span_id.hex(),
                            "parent_span_id": s.parent_span_id.hex(),
                            "name": s.name,
                            "kind": s.kind,
                            "start": s.start_time_unix_nano,
                            "end": s.end_time_unix_nano,
                            "status": s.status.code,
                            "flags": s.flags,
                            "attributes": attrs(s.attributes),
                            "resource": resource,
                            "scope": ss.scope.name,
                        }
                    )
        self.answer(200, trace_service_pb2.ExportTraceServiceResponse().SerializeToString())


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    emit_line = f"PORT {server.server_address[1]}\n"
    sys.stdout.write(emit_line)
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    {"check": check, "serve": serve}[sys.argv[1]]()
