"""A stand-in for an OpenTelemetry collector: an OTLP/gRPC TraceService that prints each span
it receives as one JSON line (trace, span and parent ids, name, start and end in nanoseconds,
status, attributes, the resource's attributes).
The first line is the port it listens on.

Usage: otlp_collector.py
"""

import json
import sys
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        for resource_spans in request.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    print(json.dumps({
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "status": {"code": span.status.code, "message": span.status.message},
                        "attributes": {a.key: value(a.value) for a in span.attributes},
                        "resource": resource,
                    }), flush=True)
        return trace_service_pb2.ExportTraceServiceResponse()


server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
# Until the test closes our stdin.
sys.stdin.read()
server.stop(0)
