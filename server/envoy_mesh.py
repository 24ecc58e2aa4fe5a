"""Envoy as the mesh's front and router: envoy/envoy.yaml rendered with one cluster per
service, each with several replicas, in place of the single process's one gRPC cluster.

- Clusters `svc_<key>`: STRICT_DNS (a name that resolves to every replica of a scaled
  compose service gives as many hosts, re-resolved every 5 s), HTTP/2 as the template's
  gRPC cluster, an active grpc.health.v1 check of that service's full name, outlier
  detection, a retry budget, and the template's circuit breaker times the replicas listed.
  `agentmesh_ops` holds every operations server (/health); `agentmesh_mcp` the knowledge
  replicas' MCP servers (their hosts at MCP_PORT: /mcp, server/kb_mcp.py).
- Routes: the template's own, each sent to the cluster of the service its path names (the
  REST routes that cap bodies, matched before transcoding, to the front service's: only a
  request the transcoder leaves as it is goes there);
  reflection, grpc.health.v1 and unknown paths go to the front service's cluster (auth's,
  FRONT_SERVICE). Then a route per read method and per server stream the template does not
  route, one per service (a service served under another's key, SERVED_WITH, to that key's
  cluster), and the template's catch-all last.
- Retries only where they are safe: every route retries a call no server saw (connect
  failure, refused stream, reset before the request went out); idempotent reads also one
  that reached a replica that reset or answered UNAVAILABLE; streams (timeout 0s) only on
  connect failure and refused stream. Each retry goes to another replica while one is left.

render_config in server/envoy.py, the single process's rendering, does not change.
"""

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from server.a2a_descriptors import SERVICE as A2A_SERVICE
from server.config import Settings
from server.envoy import (
    MCP_CLUSTER,
    EnvoyFront,
    edge_limits,
    public_manager,
    reachable,
    render_front,
)
from server.upstreams import check_upstreams, split_address

# The public services by the keys of AGENTMESH_ENVOY_UPSTREAMS, in server/served.py's order.
FULL_NAMES: dict[str, str] = {
    "auth": "agentmesh.auth.v1.AuthService",
    "users": "agentmesh.auth.v1.UserService",
    "api_keys": "agentmesh.auth.v1.ApiKeyService",
    "agent": "agentmesh.agent.v1.AgentService",
    "knowledge": "agentmesh.knowledge.v1.KnowledgeBaseService",
    "feedback": "agentmesh.feedback.v1.FeedbackService",
    "analytics": "agentmesh.analytics.v1.AnalyticsService",
    "audit": "agentmesh.audit.v1.AuditService",
}
# Services of our contract served under another's key (server/served.py ServedService.also):
# a route each, to that key's cluster.
SERVED_WITH: dict[str, str] = {
    "agentmesh.teams.v1.GroupService": "users",
    "agentmesh.knowledge.v1.CollectionService": "knowledge",
}
# The agent over A2A (issue 22) is served with the agent: its routes go to the agent's.
KEYS = {**{name: key for key, name in FULL_NAMES.items()}, **SERVED_WITH, A2A_SERVICE: "agent"}
# Whose cluster takes reflection, grpc.health.v1 and paths of no service.
FRONT_SERVICE = "auth"
# Methods that only read though their REST binding is not a GET (a search takes a body).
POST_READS = frozenset({"/agentmesh.knowledge.v1.KnowledgeBaseService/SearchKnowledgeBase"})

GRPC_CLUSTER = "agentmesh_grpc"  # the template's: its settings are every service cluster's
OPS_CLUSTER = "agentmesh_ops"

# Envoy's retry_on conditions: nothing reached a server...
NOT_SENT = "connect-failure,refused-stream,reset-before-request"
# ...a stream is retried before it starts only...
STREAM = "connect-failure,refused-stream"
# ...and an idempotent read may run twice.
READ = NOT_SENT + ",reset,unavailable"
RETRIES = 2

HEALTH_CHECK: dict[str, Any] = {
    "timeout": "1s",
    "interval": "1s",
    "interval_jitter": "0.1s",
    # Clusters without traffic yet are checked as often (Envoy's default there is 60 s).
    "no_traffic_interval": "1s",
    # Two failed checks take a replica out (a draining one reports NOT_SERVING first); one
    # passed check brings it back.
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
}
OUTLIER_DETECTION: dict[str, Any] = {
    # Connect failures, resets and timeouts count apart from what the replica answers.
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 2,
    "enforcing_consecutive_local_origin_failure": 100,
    # UNAVAILABLE and DEADLINE_EXCEEDED answers (503, 504) and INTERNAL and the like (5xx).
    "consecutive_gateway_failure": 3,
    "enforcing_consecutive_gateway_failure": 100,
    "consecutive_5xx": 5,
    "interval": "5s",
    "base_ejection_time": "5s",
    "max_ejection_time": "30s",
    "max_ejection_percent": 50,
}
# Below a quarter of a service's replicas healthy, Envoy trusts its view no more and
# spreads the calls over all of them (panic mode).
PANIC_THRESHOLD = 25.0
# Retries in flight at once: a fifth of the calls, at least 10 (Envoy's default is 3).
RETRY_BUDGET: dict[str, Any] = {"budget_percent": {"value": 20.0}, "min_retry_concurrency": 10}
# The template's circuit breaker is one process's: a service's cluster gets it per replica
# listed (a name that resolves to several counts once).
SCALED_THRESHOLDS = frozenset({"max_requests", "max_pending_requests"})
PREVIOUS_HOSTS: dict[str, Any] = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3"
        ".PreviousHostsPredicate"
    },
}


@dataclass(frozen=True)
class Method:
    """A gRPC method as the router sees it."""

    path: str
    """/package.Service/Method"""
    streams: bool
    """The server streams: no route timeout, retried only before it starts."""
    reads: bool
    """Idempotent: a GET binding, an idempotency_level, or in POST_READS."""


def _method(service: str, method: descriptor_pb2.MethodDescriptorProto) -> Method:
    path = f"/{service}/{method.name}"
    # googleapis-common-protos types the extension as a plain FieldDescriptor.
    rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
    binding = rule.WhichOneof("pattern")
    marked = method.options.idempotency_level != descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN
    unary = not (method.client_streaming or method.server_streaming)
    reads = unary and (binding == "get" or marked or path in POST_READS)
    return Method(path, method.server_streaming, reads)


def service_methods(descriptor_set: Path) -> dict[str, list[Method]]:
    """The methods of every service in a descriptor set, by the service's full name."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    return {
        f"{file.package}.{service.name}": [
            _method(f"{file.package}.{service.name}", method) for method in service.method
        ]
        for file in files.file
        for service in file.service
    }


def retry_policy(retry_on: str) -> dict[str, Any]:
    return {
        "retry_on": retry_on,
        "num_retries": RETRIES,
        "retry_host_predicate": [copy.deepcopy(PREVIOUS_HOSTS)],
        # How often Envoy draws a host before it takes a replica it tried already.
        "host_selection_retry_max_attempts": 5,
    }


def _endpoints(name: str, addresses: Sequence[str]) -> dict[str, Any]:
    hosts = []
    for address in addresses:
        host, port = split_address(address)
        socket = {"address": reachable(host), "port_value": port}
        hosts.append({"endpoint": {"address": {"socket_address": socket}}})
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": hosts}]}


def _breakers(prototype: dict[str, Any], replicas: int) -> dict[str, Any]:
    """The prototype's circuit breaker (one process's) for `replicas` of them, with the
    retry budget."""
    (thresholds,) = prototype.get("circuit_breakers", {}).get("thresholds", [{}])
    scaled = {
        key: value * replicas if key in SCALED_THRESHOLDS else value
        for key, value in thresholds.items()
    }
    return {"thresholds": [{**scaled, "retry_budget": copy.deepcopy(RETRY_BUDGET)}]}


def _cluster(prototype: dict[str, Any], name: str, addresses: Sequence[str]) -> dict[str, Any]:
    # Copies of the shared settings: a dict used twice would be dumped as a YAML alias.
    cluster = copy.deepcopy(prototype)
    cluster.update(
        name=name,
        type="STRICT_DNS",
        load_assignment=_endpoints(name, addresses),
        outlier_detection=copy.deepcopy(OUTLIER_DETECTION),
        common_lb_config={"healthy_panic_threshold": {"value": PANIC_THRESHOLD}},
        circuit_breakers=_breakers(prototype, len(addresses)),
    )
    return cluster


def _service_cluster(
    prototype: dict[str, Any], key: str, addresses: Sequence[str]
) -> dict[str, Any]:
    cluster = _cluster(prototype, f"svc_{key}", addresses)
    check = {**HEALTH_CHECK, "grpc_health_check": {"service_name": FULL_NAMES[key]}}
    cluster["health_checks"] = [check]
    return cluster


def _route(
    name: str, match: dict[str, str], cluster: str, timeout: str, retry_on: str
) -> dict[str, Any]:
    return {
        "name": name,
        "match": match,
        "route": {"cluster": cluster, "timeout": timeout, "retry_policy": retry_policy(retry_on)},
    }


def _rerouted(route: dict[str, Any], streams: set[str], reads: set[str]) -> dict[str, Any]:
    """A route of the template, sent to the cluster of the service its path names."""
    action = route.get("route")
    if action is None:
        return route  # a direct response
    if action["cluster"] in (OPS_CLUSTER, MCP_CLUSTER):
        return {**route, "route": {**action, "retry_policy": retry_policy(NOT_SENT)}}
    path = route["match"].get("path") or route["match"].get("prefix", "")
    key = KEYS.get(path.strip("/").split("/")[0], FRONT_SERVICE)
    if action["timeout"] == "0s" or path in streams:
        retry_on = STREAM
    else:
        retry_on = READ if path in reads else NOT_SENT
    action = {**action, "cluster": f"svc_{key}", "retry_policy": retry_policy(retry_on)}
    return {**route, "route": action}


def _routes(template: list[dict[str, Any]], methods: dict[str, list[Method]]) -> list[Any]:
    *special, catch_all = template
    if catch_all["match"] != {"prefix": "/"}:
        raise ValueError("the template's last route must be the catch-all (prefix /)")
    unary_timeout = catch_all["route"]["timeout"]
    routed_services = [*FULL_NAMES.items(), *((key, name) for name, key in SERVED_WITH.items())]
    every = [method for _, name in routed_services for method in methods[name]]
    streams = {method.path for method in every if method.streams}
    reads = {method.path for method in every if method.reads}
    routes = [_rerouted(route, streams, reads) for route in special]
    routed = {route["match"].get("path") for route in special}
    for key, name in routed_services:
        cluster = f"svc_{key}"
        for method in methods[name]:
            if method.path in routed:
                continue
            label = f"{key}.{method.path.rsplit('/', 1)[1]}"
            if method.streams:
                routes.append(_route(label, {"path": method.path}, cluster, "0s", STREAM))
            elif method.reads:
                routes.append(_route(label, {"path": method.path}, cluster, unary_timeout, READ))
        label = key if name == FULL_NAMES[key] else f"{key}.{name.rsplit('.', 1)[1]}"
        routes.append(_route(label, {"prefix": f"/{name}/"}, cluster, unary_timeout, NOT_SENT))
    routes.append(_rerouted(catch_all, streams, reads))
    return routes


def mesh_config(
    template: Path,
    front: EnvoyFront,
    upstreams: Mapping[str, Sequence[str]],
    ops: Sequence[str],
    mcp_port: int = 8765,
) -> dict[str, Any]:
    """envoy/envoy.yaml (`template`) rendered for a mesh: `front` as the sidecar's, every
    service of FULL_NAMES at its `upstreams` (host:port of each replica, by service key),
    /health at the operations servers `ops` (host:port) and /mcp at the knowledge
    replicas' hosts on `mcp_port`."""
    check_upstreams(upstreams, list(FULL_NAMES))
    if not ops:
        raise ValueError("the mesh needs an operations server for /health")
    methods = service_methods(front.descriptor_set)
    missing = [name for name in [*FULL_NAMES.values(), *SERVED_WITH] if name not in methods]
    if missing:
        raise ValueError(f"{front.descriptor_set} lacks {', '.join(missing)}")
    config = render_front(yaml.safe_load(template.read_text()), front)
    prototypes = {cluster["name"]: cluster for cluster in config["static_resources"]["clusters"]}
    clusters = [
        _service_cluster(prototypes[GRPC_CLUSTER], key, upstreams[key]) for key in FULL_NAMES
    ]
    clusters.append(_cluster(prototypes[OPS_CLUSTER], OPS_CLUSTER, ops))
    mcp = [f"{split_address(a)[0]}:{mcp_port}" for a in upstreams["knowledge"]]
    clusters.append(_cluster(prototypes[MCP_CLUSTER], MCP_CLUSTER, mcp))
    config["static_resources"]["clusters"] = clusters
    virtual_host = public_manager(config)["route_config"]["virtual_hosts"][0]
    virtual_host["routes"] = _routes(virtual_host["routes"], methods)
    return config


def mesh_envoy_config(
    settings: Settings,
    *,
    upstreams: Mapping[str, Sequence[str]],
    ops: Sequence[str],
    listen_port: int | None = None,
    descriptor: Path | None = None,
    mcp_port: int | None = None,
) -> dict[str, Any]:
    """mesh_config with the template, listener (HTTP_HOST, HTTP_PORT unless `listen_port`),
    admin port, descriptor set, CORS origins and limits of `settings`; the knowledge
    replicas' MCP servers on MCP_PORT unless `mcp_port`."""
    front = EnvoyFront(
        listen_host=settings.http_host,
        listen_port=settings.http_port if listen_port is None else listen_port,
        admin_port=settings.envoy_admin_port,
        descriptor_set=descriptor or settings.descriptor_set,
        cors_origins=settings.cors_allowed_origins,
        limits=edge_limits(settings),
    )
    port = settings.mcp_port if mcp_port is None else mcp_port
    return mesh_config(settings.envoy_config_template, front, upstreams, ops, port)
