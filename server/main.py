"""The second layer of the composition root: the transport over one built Domain.

`server/domain.py` builds the domain from Settings without grpc; this module adds the
gRPC server (interceptors, the servicers of the chosen services, health, reflection), the
operations HTTP server and the process lifecycle. A process kind is a choice of entries
of `SERVICES` (`server/served.py`) over the same pieces.
"""

import asyncio
import functools
import gc
import logging
import signal
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from server.a2a_card import agent_card_json
from server.a2a_descriptors import SERVICE as A2A_SERVICE
from server.admission import CALLS, RUNS, Admission
from server.authentication import Authentication
from server.config import Settings
from server.domain import Domain, build_domain
from server.envoy import envoy_sidecar
from server.health import ServiceHealth
from server.interceptors import CallPipeline, Stages
from server.kb_mcp import KnowledgeMcpServer, knowledge_mcp
from server.logs import configure_logging
from server.ops_http import OpsServer
from server.peers import connect_peers
from server.rate_limits import RateLimitGate, RateLimits
from server.reflection import enable_reflection
from server.request_checks import ReceiveLimits
from server.request_log import RequestLog
from server.rpc_metrics import RpcMetrics
from server.runtime_metrics import (
    CountersCollector,
    HitCounts,
    PoolCollector,
    Probe,
    RuntimeMonitor,
)
from server.served import INDEXING, SERVICE_NAMES, SERVICES
from services.db import ping, pool_stats

__all__ = ["SERVICE_NAMES", "Application", "build_application", "serve"]

log = logging.getLogger("agentmesh")

# Room for the rest of an UploadDocumentRequest beside the largest accepted file.
UPLOAD_ENVELOPE_BYTES = 1024 * 1024
# grpc.aio's own bound on RPCs in flight, over the admission budgets: a backstop for floods
# (it counts the exempt probes and the calls being refused too, and its refusal carries no
# details), far enough above the budgets that they answer first.
BACKSTOP_FACTOR = 4
BACKSTOP_MIN = 1024


def receive_limits(settings: Settings) -> ReceiveLimits:
    """Per-method request limits: a question of MAX_QUERY_CHARS (4 bytes a character at
    most in UTF-8) always fits; uploads and passage batches take the server's whole cap."""
    question = 4 * settings.max_query_chars + 1024
    return ReceiveLimits(
        default=max(settings.max_request_bytes, question),
        large=settings.max_upload_bytes + UPLOAD_ENVELOPE_BYTES,
    )


def server_options(settings: Settings) -> list[tuple[str, int]]:
    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    return [
        # Fail loudly when the port is taken instead of silently sharing it.
        ("grpc.so_reuseport", 0),
        # Uploads up to the size cap must reach the service, which answers anything over
        # the cap with its own RESOURCE_EXHAUSTED and details; every other method has its
        # own, smaller limit (receive_limits, checked in server/request_checks.py).
        ("grpc.max_receive_message_length", receive_limits(settings).large),
        # Ping connections that went quiet, and close those that do not answer: a client
        # that vanished (host down, cable cut) leaves no call hanging and no slot held.
        ("grpc.keepalive_time_ms", ms(settings.keepalive_time_seconds)),
        ("grpc.keepalive_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        # grpc 1.85 times its pings out after this one (60 s by default), keepalive's too.
        ("grpc.http2.ping_timeout_ms", ms(settings.keepalive_timeout_seconds)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Clients' keepalive pings are welcome down to this interval, on idle connections
        # too (grpc's defaults are 5 minutes, and 2 hours without calls); each faster ping is
        # a strike, and the third gets GOAWAY too_many_pings. (This is the string of
        # GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS: "recv" is not in it.)
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            ms(settings.min_client_ping_interval_seconds),
        ),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def admission(settings: Settings, registry: CollectorRegistry) -> Admission:
    limits = {CALLS: settings.max_concurrent_rpcs, RUNS: settings.max_concurrent_runs}
    return Admission(limits, settings.overload_retry_after_seconds, registry)


def rate_limits(settings: Settings) -> RateLimits:
    return RateLimits(
        window_seconds=settings.rate_limit_window_seconds,
        per_user=settings.rate_limit_per_user,
        per_ip=settings.rate_limit_per_ip,
        credentials_per_ip=settings.rate_limit_credentials_per_ip,
        credentials_per_account=settings.rate_limit_credentials_per_account,
        credentials_fail_open=settings.rate_limit_credentials_fail_open,
        trusted_proxies=tuple(settings.trusted_proxies),
    )


def authentication(domain: Domain) -> Authentication:
    """Who makes a call, from its bearer credential: one path for gRPC and MCP."""
    return Authentication(
        domain.tokens, domain.auth_states, domain.service_token, domain.api_keys.credentials
    )


def interceptors(
    settings: Settings, domain: Domain, registry: CollectorRegistry
) -> list[grpc.aio.ServerInterceptor]:
    """The server's one interceptor, the call pipeline; its stages and their order are
    documented in server/interceptors.py."""
    rpc_log = logging.getLogger("agentmesh.rpc")
    limits = (
        RateLimitGate(domain.limiter, rate_limits(settings), domain.events)
        if settings.rate_limit_enabled
        else None
    )
    stages = Stages(
        metrics=RpcMetrics(registry),
        admission=admission(settings, registry),
        log=RequestLog(rpc_log, domain.events),
        receive_limits=receive_limits(settings),
        auth=authentication(domain),
        limits=limits,
        errors=rpc_log,
    )
    return [CallPipeline(stages)]


def build_monitor(
    domain: Domain, registry: CollectorRegistry, probe_qdrant: bool, health: ServiceHealth
) -> RuntimeMonitor:
    """Infrastructure metrics; dependencies are probed only where they are configured (the
    embedded Qdrant and the in-process stores cannot be down on their own)."""
    registry.register(PoolCollector(functools.partial(pool_stats, domain.engine)))
    caches: dict[str, HitCounts] = {"stats": domain.stats.cache}
    if domain.embedder is not None:
        caches["query_embeddings"] = domain.embedder
        if (shared := domain.embedder.shared_cache) is not None:
            caches["query_embeddings_shared"] = shared
    registry.register(CountersCollector(caches, domain.events, domain.limiter, domain.audit))
    probes: dict[str, Probe] = {"database": functools.partial(ping, domain.engine)}
    if domain.redis is not None:
        probes["redis"] = domain.redis.ping
    knowledge = domain.knowledge_service
    if probe_qdrant and knowledge is not None:
        probes["qdrant"] = knowledge.ping_store
    queue = knowledge.queue_stats if knowledge else None
    return RuntimeMonitor(registry, probes, queue, on_probed=health.follow)


@dataclass
class Application:
    """The gRPC server, its health and the operations HTTP server, over one Domain."""

    settings: Settings
    domain: Domain
    server: grpc.aio.Server
    health: ServiceHealth
    ops: OpsServer
    grpc_port: int
    monitor: RuntimeMonitor
    mcp: KnowledgeMcpServer | None = None  # with the knowledge base (server/kb_mcp.py)

    @property
    def mcp_port(self) -> int | None:
        """The MCP server's port once started; None where the knowledge base is not served."""
        return self.mcp.port if self.mcp is not None else None

    async def start(self) -> None:
        await self.domain.start()
        await self.server.start()
        await self.ops.start()
        if self.mcp is not None:
            await self.mcp.start()
        await self.monitor.start()
        await self.health.start_serving()

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, wait the configured delay, then drain in-flight RPCs."""
        await self.health.shutdown()
        await asyncio.sleep(self.settings.shutdown_delay_seconds)
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        if self.mcp is not None:
            await self.mcp.stop()
        await self.monitor.stop()
        await self.ops.stop()
        await self.domain.close()


def build_application(settings: Settings) -> Application:
    """A gRPC server for the services in SERVICES over a Domain built here; a service
    another process serves is reached through its peer (server/peers.py)."""
    # No `_created` series beside every counter and histogram: a third of the series, and
    # nothing the dashboards use (prometheus_client's switch is process-wide).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    domain = build_domain(settings, registry, connect_peers(settings))
    budgets = settings.max_concurrent_rpcs + settings.max_concurrent_runs
    backstop = max(BACKSTOP_MIN, BACKSTOP_FACTOR * budgets)
    server = grpc.aio.server(
        interceptors=interceptors(settings, domain, registry),
        options=server_options(settings),
        maximum_concurrent_rpcs=backstop,
    )
    services = [service for service in SERVICES if service.key in settings.services]
    for service in services:
        service.add(domain, server)
    names = [name for service in services for name in service.names]
    internal = []
    if domain.knowledge_service is not None:  # the index owner: workers write through it
        INDEXING.add(domain, server)
        internal.append(INDEXING.name)
    health = ServiceHealth(
        names, {name: service.needs for service in services for name in service.names}
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    # Every public service is described, served here or not: behind Envoy, grpcurl lists
    # what the mesh serves whichever process its reflection call reaches.
    enable_reflection([*SERVICE_NAMES, A2A_SERVICE, *internal, health_name], server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    ops = OpsServer(
        health,
        registry,
        settings.metrics_host,
        settings.metrics_port,
        agent_card=agent_card_json(settings),
    )
    monitor = build_monitor(
        domain, registry, probe_qdrant=settings.qdrant_url is not None, health=health
    )
    mcp = None
    if domain.knowledge_service is not None:
        mcp_app = knowledge_mcp(domain.knowledge_service, authentication(domain))
        grace = settings.shutdown_grace_seconds
        mcp = KnowledgeMcpServer(mcp_app, settings.grpc_host, settings.mcp_port, grace)
    return Application(settings, domain, server, health, ops, port, monitor, mcp)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT (or until the Envoy sidecar dies), then shut down gracefully."""
    configure_logging(settings.log_level, settings.log_format)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = build_application(settings)
    await app.start()
    # Everything loaded so far (models, libraries) lives as long as the process: move it out
    # of the collector's sight, so full collections stay short while serving and the exit
    # does not spend seconds scanning it.
    gc.collect()
    gc.freeze()
    sidecar = (
        envoy_sidecar(
            settings, grpc_port=app.grpc_port, ops_port=app.ops.port, mcp_port=app.mcp_port
        )
        if settings.envoy_enabled
        else None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if app.domain.agent_service is not None:
        # The prompts and the MCP servers file (Domain.reload).
        loop.add_signal_handler(signal.SIGHUP, app.domain.reload)
    try:
        if sidecar is not None:
            await sidecar.start()
        log.info(
            "agentmesh serving",
            extra={
                "grpc": f"{settings.grpc_host}:{app.grpc_port}",
                "http": f"{settings.http_host}:{sidecar.port}" if sidecar else None,
                "ops": f"{settings.metrics_host}:{app.ops.port}",
                "mcp": f"{settings.grpc_host}:{app.mcp_port}" if app.mcp_port else None,
                "database": settings.resolved_database_url.split("@")[-1],
            },
        )
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if sidecar is not None:
            waiters.append(asyncio.create_task(sidecar.wait()))
        _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if not stop.is_set():
            log.error("envoy sidecar exited; shutting down")
    finally:
        log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
        await app.stop()
        if sidecar is not None:
            await sidecar.stop()
        log.info("stopped")
