"""RED metrics for every RPC, under the names of go-grpc-prometheus and py-grpc-prometheus
(which does not work with grpc.aio servers), so stock gRPC dashboards fit."""

import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from server.interceptors import Context, StreamCall, UnaryCall, WrappingInterceptor, code_name

LABELS = ["grpc_service", "grpc_method", "grpc_type"]
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180)


def _labels(method: str, grpc_type: str) -> tuple[str, str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name, grpc_type


class RpcMetricsInterceptor(WrappingInterceptor):
    """Counts started and handled RPCs (by status code), their duration and the messages
    they exchange. Placed first, so refusals by the other interceptors are counted too."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            [*LABELS, "grpc_code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end, in seconds.",
            LABELS,
            buckets=BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "grpc_server_msg_received", "Messages received from clients.", LABELS, registry=registry
        )
        self.sent = Counter(
            "grpc_server_msg_sent", "Messages sent to clients.", LABELS, registry=registry
        )

    def _begin(self, labels: tuple[str, str, str]) -> float:
        self.started.labels(*labels).inc()
        self.received.labels(*labels).inc()
        return time.perf_counter()

    def _end(
        self, labels: tuple[str, str, str], context: Context, started: float, failed: Any
    ) -> None:
        self.handled.labels(*labels, code_name(context, failed)).inc()
        self.seconds.labels(*labels).observe(time.perf_counter() - started)

    async def unary(self, call: UnaryCall, context: Context, method: str) -> Any:
        labels = _labels(method, "unary")
        started, failed = self._begin(labels), None
        try:
            response = await call()
        except BaseException as error:
            failed = error
            raise
        finally:
            self._end(labels, context, started, failed)
        self.sent.labels(*labels).inc()
        return response

    async def stream(self, call: StreamCall, context: Context, method: str) -> AsyncIterator[Any]:
        labels = _labels(method, "server_stream")
        started, failed = self._begin(labels), None
        sent = self.sent.labels(*labels)
        try:
            async for item in call():
                sent.inc()
                yield item
        except BaseException as error:
            failed = error
            raise
        finally:
            self._end(labels, context, started, failed)
