"""RED metrics for every RPC, under the names of go-grpc-prometheus and py-grpc-prometheus
(which does not work with grpc.aio servers), so stock gRPC dashboards fit."""

from prometheus_client import CollectorRegistry, Counter, Histogram

LABELS = ["grpc_service", "grpc_method", "grpc_type"]
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180)


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class MethodMetrics:
    """One method's children of the RPC metrics, looked up once (a `labels()` lookup takes
    a lock and hashes the labels: once per method, not once per call)."""

    def __init__(self, metrics: "RpcMetrics", labels: tuple[str, str, str]) -> None:
        self._handled = metrics.handled
        self._labels = labels
        self._started = metrics.started.labels(*labels)
        self._received = metrics.received.labels(*labels)
        self.sent = metrics.sent.labels(*labels)
        self._seconds = metrics.seconds.labels(*labels)
        self._by_code: dict[str, Counter] = {}

    def begin(self) -> None:
        self._started.inc()
        self._received.inc()

    def end(self, code: str, seconds: float) -> None:
        handled = self._by_code.get(code)
        if handled is None:
            handled = self._by_code[code] = self._handled.labels(*self._labels, code)
        handled.inc()
        self._seconds.observe(seconds)


class RpcMetrics:
    """Started and handled RPCs (by status code), their duration and the messages they
    exchange. The call pipeline counts every call, refusals included (server/interceptors.py)."""

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

    def of(self, method: str, kind: str) -> MethodMetrics:
        service, _, name = method.lstrip("/").partition("/")
        return MethodMetrics(self, (service, name, kind))
