"""Client channels to agentmesh's own servers: the client half of the transport contract.

- Keepalive: a ping every KEEPALIVE_TIME_SECONDS, on idle channels too and for as long as
  a call sends nothing (an idle Health.Watch, an agent run waiting on its LLM), answered
  within KEEPALIVE_TIMEOUT_SECONDS: a server that froze or vanished fails the calls on
  its connection with UNAVAILABLE in about 30 s instead of leaving them hanging. Servers
  accept pings down to their MIN_CLIENT_PING_INTERVAL_SECONDS (5 s by default).
- A service config (gRFC A6): the idempotent reads are retried on UNAVAILABLE, at most
  MAX_ATTEMPTS times with backoff, under retryThrottling (retries stop while more than
  half the recent calls fail); nothing else is ever retried (uploads, agent runs, logins,
  token refreshes: a second attempt could do the work twice). Every method has a default
  deadline (`timeout`), which a caller's shorter one overrides.

Reads are the unary methods with a GET binding or an idempotency_level, and those in
READS_WITHOUT_GET: the rule Envoy's mesh routes retry by (server/envoy_mesh.py).

`python -m server.channels` prints the service config as JSON for clients in other
languages (gRPC's `grpc.service_config` channel argument, or their own equivalent).
"""

import json
from collections.abc import Iterator
from typing import Any

import grpc
from agentmesh.agent.v1 import agent_service_pb2
from agentmesh.analytics.v1 import analytics_service_pb2
from agentmesh.audit.v1 import audit_service_pb2
from agentmesh.auth.v1 import api_key_service_pb2, auth_service_pb2, user_service_pb2
from agentmesh.feedback.v1 import feedback_service_pb2
from agentmesh.indexing.v1 import indexing_service_pb2
from agentmesh.knowledge.v1 import collection_service_pb2, knowledge_service_pb2
from agentmesh.teams.v1 import group_service_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf.descriptor import FileDescriptor, MethodDescriptor
from google.protobuf.descriptor_pb2 import MethodOptions

FILES: tuple[FileDescriptor, ...] = (
    api_key_service_pb2.DESCRIPTOR,
    auth_service_pb2.DESCRIPTOR,
    user_service_pb2.DESCRIPTOR,
    group_service_pb2.DESCRIPTOR,
    collection_service_pb2.DESCRIPTOR,
    agent_service_pb2.DESCRIPTOR,
    knowledge_service_pb2.DESCRIPTOR,
    feedback_service_pb2.DESCRIPTOR,
    analytics_service_pb2.DESCRIPTOR,
    audit_service_pb2.DESCRIPTOR,
    indexing_service_pb2.DESCRIPTOR,
)
# Methods that only read though their REST binding is not a GET (a search takes a body).
READS_WITHOUT_GET = frozenset({"/agentmesh.knowledge.v1.KnowledgeBaseService/SearchKnowledgeBase"})

KEEPALIVE_TIME_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0

MAX_ATTEMPTS = 4  # gRFC A6 caps it at 5
RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": MAX_ATTEMPTS,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# Each failed call takes a token, each success gives back 0.1; at half of maxTokens or
# below, nothing is retried: an outage is not multiplied by the retries.
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}

# Default deadlines, in seconds: reads; any other method; and the long ones.
READ_TIMEOUT = 30
DEFAULT_TIMEOUT = 60
LONG_TIMEOUTS: dict[str, int] = {
    # A little over the server's default limit on one agent run (180 s).
    "/agentmesh.agent.v1.AgentService/Query": 200,
    "/agentmesh.agent.v1.AgentService/StreamQuery": 200,
    "/agentmesh.agent.v1.AgentService/AttachRun": 200,
    # 20 MiB on a slow uplink.
    "/agentmesh.knowledge.v1.KnowledgeBaseService/UploadDocument": 300,
}


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def methods() -> Iterator[MethodDescriptor]:
    """Every method of every agentmesh service."""
    for file in FILES:
        for service in file.services_by_name.values():
            yield from service.methods


def is_read(method: MethodDescriptor) -> bool:
    """Idempotent and unary: safe to send again after UNAVAILABLE."""
    if method.client_streaming or method.server_streaming:
        return False
    options = method.GetOptions()
    # googleapis-common-protos types the extension as a plain FieldDescriptor.
    rule: http_pb2.HttpRule = options.Extensions[annotations_pb2.http]  # type: ignore[index]
    marked = options.idempotency_level != MethodOptions.IDEMPOTENCY_UNKNOWN
    return rule.WhichOneof("pattern") == "get" or marked or path_of(method) in READS_WITHOUT_GET


def _names(paths: list[str]) -> list[dict[str, str]]:
    return [dict(zip(("service", "method"), p.lstrip("/").split("/"), strict=True)) for p in paths]


def _seconds(value: int) -> str:
    return f"{value}s"


def service_config() -> dict[str, Any]:
    """The service config every agentmesh client channel uses (gRFC A6 and A2 fields)."""
    reads = sorted(path_of(m) for m in methods() if is_read(m))
    configs: list[dict[str, Any]] = [
        {
            # Service-wide: the methods that no entry below names.
            "name": [{"service": s.full_name} for f in FILES for s in f.services_by_name.values()],
            "timeout": _seconds(DEFAULT_TIMEOUT),
        },
        {"name": _names(reads), "timeout": _seconds(READ_TIMEOUT), "retryPolicy": RETRY_POLICY},
    ]
    for timeout in sorted(set(LONG_TIMEOUTS.values())):
        paths = sorted(p for p, t in LONG_TIMEOUTS.items() if t == timeout)
        configs.append({"name": _names(paths), "timeout": _seconds(timeout)})
    return {"methodConfig": configs, "retryThrottling": RETRY_THROTTLING}


def channel_options(
    *,
    keepalive_time: float = KEEPALIVE_TIME_SECONDS,
    keepalive_timeout: float = KEEPALIVE_TIMEOUT_SECONDS,
) -> list[tuple[str, Any]]:
    """grpc channel arguments: keepalive and the service config."""
    return [
        ("grpc.keepalive_time_ms", round(keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout * 1000)),
        # grpc 1.85 times its pings out after this one (60 s by default), keepalive's too.
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout * 1000)),
        # Ping on idle channels too, and without limit while a call sends no data: an idle
        # stream is exactly what must notice a frozen server.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config())),
        # The config above is the one to use, not one a DNS TXT record could carry.
        ("grpc.service_config_disable_resolution", 1),
    ]


def connect(target: str, **options: float) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to an agentmesh server (or Envoy in front of one)."""
    return grpc.aio.insecure_channel(target, options=channel_options(**options))


def connect_sync(target: str, **options: float) -> grpc.Channel:
    """The same, as a blocking channel."""
    return grpc.insecure_channel(target, options=channel_options(**options))


if __name__ == "__main__":
    print(json.dumps(service_config(), indent=2))
