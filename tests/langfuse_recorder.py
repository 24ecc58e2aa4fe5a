"""A local HTTP endpoint standing in for Langfuse: it records the OTLP exports the SDK sends
(POST /api/public/otel/v1/traces), decoded with opentelemetry-proto."""

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

OTLP_PATH = "/api/public/otel/v1/traces"


@dataclass
class Export:
    headers: dict[str, str]
    request: ExportTraceServiceRequest


@dataclass
class Recorder:
    """A local HTTP server standing in for Langfuse: records every OTLP export."""

    status: int = 200
    exports: list[Export] = field(default_factory=list)
    other_requests: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[Span]:
        return [
            span
            for export in self.exports
            for resource_spans in export.request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]


@contextmanager
def serving(*, status: int = 200) -> Iterator[Recorder]:
    recorder = Recorder(status=status)
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == OTLP_PATH:
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                export = Export(
                    {k.lower(): v for k, v in self.headers.items()},
                    ExportTraceServiceRequest.FromString(body),
                )
                with lock:
                    recorder.exports.append(export)
                self._answer(recorder.status, ExportTraceServiceResponse().SerializeToString())
            else:
                recorder.other_requests.append(f"POST {self.path}")
                self._answer(200, b"{}")

        def do_GET(self) -> None:
            recorder.other_requests.append(f"GET {self.path}")
            self._answer(200, b"{}")

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    recorder.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def otlp_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [otlp_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def span_attributes(span: Span) -> dict[str, Any]:
    return {kv.key: otlp_value(kv.value) for kv in span.attributes}
