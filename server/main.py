"""The composition root: builds every component from Settings and runs the process.

Only this module knows both the transport (grpc) and the domain (services); everything
else receives what it needs through constructor arguments.
"""

import asyncio
import gc
import logging
import os
import secrets
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import yaml
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc
from agentmesh.feedback.v1 import feedback_service_pb2 as feedback_pb
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as feedback_grpc
from agentmesh.knowledge.v1 import knowledge_service_pb2 as knowledge_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as knowledge_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from redis.asyncio import BlockingConnectionPool, Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from server.config import Settings
from server.envoy import EnvoyAddresses, EnvoySidecar, render_config
from server.health import SERVING, ServiceHealth
from server.interceptors import AuthInterceptor, ErrorInterceptor, RequestLogInterceptor
from server.llm_sidecar import LocalLlmSidecar, packaged_model
from server.logs import configure_logging
from server.ops_http import OpsServer
from server.rate_limits import RateLimitInterceptor, RateLimits
from server.rpc_metrics import RpcMetricsInterceptor
from server.runtime_metrics import (
    CountersCollector,
    HitCounts,
    PoolCollector,
    Probe,
    RuntimeMonitor,
    database_probe,
)
from server.servicers.agent import AgentServicer
from server.servicers.analytics import AnalyticsServicer
from server.servicers.auth import AuthServicer
from server.servicers.feedback import FeedbackServicer
from server.servicers.knowledge import KnowledgeBaseServicer
from server.servicers.users import UserServicer
from services.agent.context import AgentDeps, AgentSettings
from services.agent.conversations import ConversationStore
from services.agent.llm import ChatModel, LlmSettings
from services.agent.prompts import PromptManager
from services.agent.service import AgentService
from services.agent.tools.api_search import ApiSearchTool, ApiToolSettings
from services.agent.tools.base import Tool
from services.agent.tools.knowledge_search import KnowledgeSearchTool
from services.agent.tools.outbound import OutboundHttp
from services.agent.tools.registry import ToolRegistry
from services.agent.tools.web_search import WebSearchSettings, WebSearchTool
from services.agent.tracing import NoopTracer, Tracer
from services.analytics.recorder import EventRecorder, RecorderSettings
from services.analytics.stats import StatsService, StatsSettings
from services.analytics.usage import UsageService
from services.auth.passwords import PasswordHasher
from services.auth.principal import Role
from services.auth.service import AuthService
from services.auth.tokens import TokenCodec, TokenSettings
from services.auth.users import UserService
from services.cache import Cache, InProcessCache, RedisCache
from services.db import create_engine, create_sessionmaker
from services.feedback.service import FeedbackService
from services.knowledge.chunking import ChunkingPolicy
from services.knowledge.embeddings import Embedder, EmbedderSettings, packaged_model_path
from services.knowledge.ingestion import IngestionPipeline, IngestionQueue
from services.knowledge.lexical import LexicalEncoder
from services.knowledge.parsing import ParseLimits
from services.knowledge.reranking import CrossEncoderReranker
from services.knowledge.service import KnowledgeService, KnowledgeSettings
from services.knowledge.vector_store import VectorStore
from services.limits import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from services.metrics import Metrics
from services.quotas.counters import Counters, InProcessCounters, RedisCounters
from services.quotas.service import Limits, QuotaService

SERVICE_NAMES = [
    auth_pb.DESCRIPTOR.services_by_name["AuthService"].full_name,
    users_pb.DESCRIPTOR.services_by_name["UserService"].full_name,
    agent_pb.DESCRIPTOR.services_by_name["AgentService"].full_name,
    knowledge_pb.DESCRIPTOR.services_by_name["KnowledgeBaseService"].full_name,
    feedback_pb.DESCRIPTOR.services_by_name["FeedbackService"].full_name,
    analytics_pb.DESCRIPTOR.services_by_name["AnalyticsService"].full_name,
]

# Room for the rest of an UploadDocumentRequest beside the largest accepted file.
UPLOAD_ENVELOPE_BYTES = 1024 * 1024
MIB = 1024 * 1024
# Threads parsing, chunking and building lexical vectors (a PDF waits on its child process).
PARSE_THREADS = 2


def server_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Fail loudly when the port is taken instead of silently sharing it.
        ("grpc.so_reuseport", 0),
        # Uploads up to the size cap must reach the service, which answers anything over
        # the cap with its own RESOURCE_EXHAUSTED and details.
        ("grpc.max_receive_message_length", settings.max_upload_bytes + UPLOAD_ENVELOPE_BYTES),
    ]


log = logging.getLogger("agentmesh")


def jwt_secret(settings: Settings) -> str:
    """JWT_SECRET, or a random key created once in DATA_DIR (so tokens survive restarts)."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path = settings.data_dir / "jwt-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


@dataclass
class Domain:
    """The domain services and the resources they hold."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    executor: ThreadPoolExecutor
    tokens: TokenCodec
    auth: AuthService
    users: UserService
    knowledge: KnowledgeService
    agent: AgentService
    feedback: FeedbackService
    events: EventRecorder
    usage: UsageService
    stats: StatsService
    outbound: OutboundHttp
    limiter: RateLimiter
    redis: Redis | None
    metrics: Metrics
    # The llama.cpp server of LLM_PROVIDER=local; the agent's client is made once it serves.
    local_llm: LocalLlmSidecar | None = None
    local_llm_settings: LlmSettings | None = None

    async def start(self) -> None:
        await self.events.start()
        await self.knowledge.start()
        if self.local_llm is not None and self.local_llm_settings is not None:
            await self.local_llm.start()
            self.agent.deps.llm = ChatModel(
                replace(
                    self.local_llm_settings,
                    base_url=self.local_llm.base_url,
                    model=self.local_llm.model,
                    api_key=None,
                ),
                self.metrics,
            )
        await self.agent.start()

    async def close(self) -> None:
        await self.agent.stop()
        if self.local_llm is not None:
            await self.local_llm.stop()
        await self.outbound.close()
        await self.knowledge.stop()
        await self.events.stop()  # after everything that records events
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()
        self.executor.shutdown(wait=False, cancel_futures=True)


def build_knowledge(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    events: EventRecorder,
    metrics: Metrics,
) -> KnowledgeService:
    """The knowledge base: embedding model (loaded here), Qdrant, ingestion workers."""
    embedder = Embedder.load(
        EmbedderSettings(
            model=settings.embedding_model or packaged_model_path(),
            batch_size=settings.embedding_batch_size,
            threads=settings.embedding_threads,
            query_cache_size=settings.query_cache_size,
        )
    )
    store = VectorStore.connect(
        url=settings.qdrant_url,
        api_key=settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None,
        path=settings.data_dir / "qdrant",
        collection=settings.qdrant_collection,
    )
    lexical = LexicalEncoder()
    executor = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="ingest")
    limits = ParseLimits(
        pdf_timeout_seconds=settings.pdf_timeout_seconds,
        pdf_memory_bytes=settings.pdf_memory_mb * MIB,
    )
    pipeline = IngestionPipeline(
        sessions,
        store,
        embedder,
        lexical,
        ChunkingPolicy(
            embedder.max_tokens, settings.chunk_overlap_tokens, settings.max_chunks_per_document
        ),
        limits,
        executor,
        metrics,
    )
    queue = IngestionQueue(
        pipeline, workers=settings.ingest_workers, capacity=settings.ingest_queue_size
    )
    reranker = (
        CrossEncoderReranker.load(settings.reranker_model, embedder)
        if settings.reranker_model
        else None
    )
    knowledge_settings = KnowledgeSettings(
        max_upload_bytes=settings.max_upload_bytes,
        dense_weight=settings.hybrid_dense_weight,
        candidates=settings.search_candidates,
        parse_limits=limits,
    )
    return KnowledgeService(
        sessions,
        store,
        embedder,
        lexical,
        queue,
        executor,
        knowledge_settings,
        events,
        metrics,
        reranker,
    )


def build_tools(
    settings: Settings, knowledge: KnowledgeService, outbound: OutboundHttp
) -> list[Tool]:
    """The knowledge-base tool, plus web and API search when their services are configured."""
    tools: list[Tool] = [KnowledgeSearchTool(knowledge, settings.agent_top_k)]
    if settings.web_search_provider:
        key = settings.web_search_api_key
        web = WebSearchSettings(
            provider=settings.web_search_provider,
            url=settings.web_search_url,
            api_key=key.get_secret_value() if key else None,
            top_k=settings.agent_top_k,
            timeout=settings.tool_timeout_seconds,
        )
        tools.append(WebSearchTool(outbound, web))
    if settings.api_tool_url:
        auth = settings.api_tool_auth_value
        api = ApiToolSettings(
            url=settings.api_tool_url,
            method=settings.api_tool_method,
            body_template=settings.api_tool_body_template,
            auth_header=settings.api_tool_auth_header,
            auth_value=auth.get_secret_value() if auth else None,
            results_path=settings.api_tool_results_path,
            title_field=settings.api_tool_title_field,
            url_field=settings.api_tool_url_field,
            snippet_field=settings.api_tool_snippet_field,
            description=settings.api_tool_description,
            admin_only=settings.api_tool_admin_only,
            top_k=settings.agent_top_k,
            timeout=settings.tool_timeout_seconds,
        )
        tools.append(ApiSearchTool(outbound, api))
    return tools


def llm_settings(settings: Settings, base_url: str | None = None) -> LlmSettings:
    key = settings.llm_api_key
    return LlmSettings(
        base_url=base_url or settings.llm_base_url,
        api_key=key.get_secret_value() if key else None,
        model=settings.llm_model,
        timeout=settings.llm_timeout_seconds,
        max_retries=settings.llm_max_retries,
        temperature=settings.llm_temperature,
        max_tokens=settings.llm_max_tokens,
    )


def build_tracer(settings: Settings) -> Tracer:
    """Langfuse when both keys are set; otherwise no tracing."""
    if settings.langfuse_public_key and settings.langfuse_secret_key:
        # Imported only when configured: the SDK pulls in OpenTelemetry's exporter stack.
        from services.agent.tracing_langfuse import LangfuseTracer

        return LangfuseTracer(
            host=settings.langfuse_host or "https://cloud.langfuse.com",
            public_key=settings.langfuse_public_key,
            secret_key=settings.langfuse_secret_key.get_secret_value(),
        )
    return NoopTracer()


def build_agent(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    knowledge: KnowledgeService,
    outbound: OutboundHttp,
    events: EventRecorder,
    quotas: QuotaService,
    metrics: Metrics,
) -> AgentService:
    """The agent: prompts, tools, the LLM client (none in extractive mode) and the graph."""
    prompts = PromptManager(settings.prompts_dir, auto_reload=settings.prompts_auto_reload)
    provider = settings.resolved_llm_provider
    # The local provider's client is made when its sidecar has started (Application.start).
    llm = ChatModel(llm_settings(settings), metrics) if provider == "openai" else None
    agent_settings = AgentSettings(
        max_query_chars=settings.max_query_chars,
        context_messages=settings.context_messages,
        context_token_budget=settings.context_token_budget,
        intent_confidence=settings.intent_confidence,
        tool_timeout=settings.tool_timeout_seconds,
        run_timeout=settings.agent_run_timeout_seconds,
        max_runs_per_user=settings.max_concurrent_runs_per_user,
        fallback_extractive=settings.llm_fallback_extractive,
    )
    deps = AgentDeps(
        prompts=prompts,
        registry=ToolRegistry(build_tools(settings, knowledge, outbound), prompts),
        embedder=knowledge.embedder,
        llm=llm,
        store=ConversationStore(sessions),
        settings=agent_settings,
        events=events,
        quotas=quotas,
        metrics=metrics,
    )
    return AgentService(deps, build_tracer(settings))


def build_limiter(settings: Settings) -> tuple[RateLimiter, Redis | None]:
    """Redis-backed rate limits when REDIS_URL is set (shared by replicas), else in process;
    the Redis client (if any) is shared with the quota counters."""
    if not settings.redis_url:
        return InProcessRateLimiter(max_keys=100_000), None
    timeout = settings.rate_limit_timeout_seconds
    # A blocking pool: the default one raises past its size, which would wave a burst
    # through (fail open) instead of queueing it within the decision timeout.
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=64,
        timeout=None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    redis = Redis.from_pool(pool)
    limiter = RedisRateLimiter(
        redis,
        prefix=f"{settings.redis_key_prefix}rl:",
        timeout=timeout,
        fail_open=settings.rate_limit_fail_open,
    )
    return limiter, redis


def build_quotas(settings: Settings, redis: Redis | None) -> QuotaService:
    """Per-role quotas, counted in Redis when it is configured (shared by replicas)."""
    counters: Counters = (
        RedisCounters(redis, settings.redis_key_prefix) if redis else InProcessCounters()
    )
    limits = {
        Role.USER: Limits(
            daily_queries=settings.quota_user_daily_queries,
            monthly_queries=settings.quota_user_monthly_queries,
            daily_tokens=settings.quota_user_daily_tokens,
            monthly_tokens=settings.quota_user_monthly_tokens,
        ),
        Role.ADMIN: Limits(
            daily_queries=settings.quota_admin_daily_queries,
            monthly_queries=settings.quota_admin_monthly_queries,
            daily_tokens=settings.quota_admin_daily_tokens,
            monthly_tokens=settings.quota_admin_monthly_tokens,
        ),
    }
    return QuotaService(counters, limits)


def build_stats(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis | None
) -> StatsService:
    """Statistics from the events table, cached in Redis when it is configured."""
    cache: Cache = (
        RedisCache(redis, f"{settings.redis_key_prefix}cache:") if redis else InProcessCache()
    )
    return StatsService(
        sessions,
        cache,
        StatsSettings(
            max_buckets=settings.stats_max_buckets,
            open_ttl=settings.stats_cache_seconds,
            closed_ttl=settings.stats_cache_closed_seconds,
            # Events reach the table within one flush; a minute covers a slow write.
            settle_seconds=settings.events_flush_seconds + 60,
        ),
    )


def build_domain(settings: Settings, registry: CollectorRegistry | None = None) -> Domain:
    """The domain services; their metrics go to `registry` (none: a private one)."""
    metrics = Metrics(registry)
    engine = create_engine(settings.resolved_database_url)
    sessions = create_sessionmaker(engine)
    executor = ThreadPoolExecutor(settings.password_hash_workers, thread_name_prefix="argon2")
    tokens = TokenCodec(
        TokenSettings(
            secret=jwt_secret(settings),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            access_ttl=timedelta(seconds=settings.access_token_ttl_seconds),
            refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_seconds),
        )
    )
    events = EventRecorder(
        sessions,
        RecorderSettings(
            flush_interval=settings.events_flush_seconds,
            capacity=settings.events_buffer_capacity,
        ),
        observer=metrics.observe_event,
    )
    knowledge = build_knowledge(settings, sessions, events, metrics)
    outbound = OutboundHttp(settings.outbound_allowed_networks)
    limiter, redis = build_limiter(settings)
    quotas = build_quotas(settings, redis)
    local_llm = None
    if settings.resolved_llm_provider == "local":
        local_llm = LocalLlmSidecar(
            packaged_model(settings.data_dir),
            threads=settings.local_llm_threads,
            workdir=settings.data_dir / "llm",
        )
    return Domain(
        engine=engine,
        sessions=sessions,
        executor=executor,
        tokens=tokens,
        auth=AuthService(sessions, PasswordHasher(executor), tokens, events),
        users=UserService(sessions, on_deleted=knowledge.purge_owner),
        knowledge=knowledge,
        agent=build_agent(settings, sessions, knowledge, outbound, events, quotas, metrics),
        feedback=FeedbackService(sessions, events),
        events=events,
        usage=UsageService(sessions, quotas),
        stats=build_stats(settings, sessions, redis),
        limiter=limiter,
        redis=redis,
        metrics=metrics,
        outbound=outbound,
        local_llm=local_llm,
        local_llm_settings=llm_settings(settings),
    )


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

    async def start(self) -> None:
        await self.domain.start()
        await self.server.start()
        await self.ops.start()
        await self.monitor.start()
        await self.health.set_all(SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, wait the configured delay, then drain in-flight RPCs."""
        await self.health.shutdown()
        await asyncio.sleep(self.settings.shutdown_delay_seconds)
        await self.server.stop(self.settings.shutdown_grace_seconds if grace is None else grace)
        await self.monitor.stop()
        await self.ops.stop()
        await self.domain.close()


def rate_limits(settings: Settings) -> RateLimits:
    return RateLimits(
        window_seconds=settings.rate_limit_window_seconds,
        per_user=settings.rate_limit_per_user,
        per_ip=settings.rate_limit_per_ip,
        credentials_per_ip=settings.rate_limit_credentials_per_ip,
        trusted_proxies=tuple(settings.trusted_proxies),
    )


def build_monitor(
    settings: Settings, domain: Domain, registry: CollectorRegistry
) -> RuntimeMonitor:
    """Infrastructure metrics; dependencies are probed only where they are configured (the
    embedded Qdrant and the in-process stores cannot be down on their own)."""
    registry.register(PoolCollector(domain.engine))
    caches: dict[str, HitCounts] = {
        "stats": domain.stats.cache,
        "query_embeddings": domain.knowledge.embedder,
    }
    registry.register(CountersCollector(caches, domain.events))
    probes: dict[str, Probe] = {"database": database_probe(domain.engine)}
    if domain.redis is not None:
        probes["redis"] = domain.redis.ping
    if settings.qdrant_url:
        probes["qdrant"] = domain.knowledge.ping_store
    return RuntimeMonitor(registry, probes)


def build_application(settings: Settings) -> Application:
    # No `_created` series beside every counter and histogram: a third of the series, and
    # nothing the dashboards use (prometheus_client's switch is process-wide).
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    domain = build_domain(settings, registry)
    rpc_log = logging.getLogger("agentmesh.rpc")
    server = grpc.aio.server(
        interceptors=[
            RpcMetricsInterceptor(registry),
            RequestLogInterceptor(rpc_log, domain.events),
            AuthInterceptor(domain.tokens),
            *(
                [RateLimitInterceptor(domain.limiter, rate_limits(settings), domain.events)]
                if settings.rate_limit_enabled
                else []
            ),
            ErrorInterceptor(rpc_log),
        ],
        options=server_options(settings),
    )
    auth_grpc.add_AuthServiceServicer_to_server(AuthServicer(domain.auth), server)
    users_grpc.add_UserServiceServicer_to_server(UserServicer(domain.users), server)
    agent_grpc.add_AgentServiceServicer_to_server(AgentServicer(domain.agent), server)
    knowledge_grpc.add_KnowledgeBaseServiceServicer_to_server(
        KnowledgeBaseServicer(domain.knowledge), server
    )
    feedback_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(domain.feedback), server)
    analytics_grpc.add_AnalyticsServiceServicer_to_server(
        AnalyticsServicer(domain.usage, domain.stats), server
    )
    health = ServiceHealth(SERVICE_NAMES)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        [
            *SERVICE_NAMES,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    ops = OpsServer(health, registry, settings.metrics_host, settings.metrics_port)
    monitor = build_monitor(settings, domain, registry)
    return Application(settings, domain, server, health, ops, port, monitor)


def envoy_config(
    settings: Settings,
    *,
    grpc_port: int,
    ops_port: int,
    upstream: str | None = None,
    descriptor: Path | None = None,
) -> dict[str, Any]:
    """envoy/envoy.yaml rendered for this installation: the sidecar's config, or with
    `upstream` naming agentmesh's host, the config of an Envoy in its own container."""
    template = yaml.safe_load(settings.envoy_config_template.read_text())
    addresses = EnvoyAddresses(
        listen_host=settings.http_host,
        listen_port=settings.http_port,
        admin_port=settings.envoy_admin_port,
        grpc_host=upstream or settings.grpc_host,
        grpc_port=grpc_port,
        ops_host=upstream or settings.metrics_host,
        ops_port=ops_port,
        descriptor_set=descriptor or settings.descriptor_set,
        cors_origins=settings.cors_allowed_origins,
    )
    return render_config(template, addresses)


def envoy_sidecar(settings: Settings, app: Application) -> EnvoySidecar:
    return EnvoySidecar(
        settings.resolved_envoy_binary,
        envoy_config(settings, grpc_port=app.grpc_port, ops_port=app.ops.port),
        settings.data_dir / "envoy",
        concurrency=settings.envoy_concurrency,
    )


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
    sidecar = envoy_sidecar(settings, app) if settings.envoy_enabled else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.domain.agent.reload_prompts)
    try:
        if sidecar is not None:
            await sidecar.start()
        log.info(
            "agentmesh serving",
            extra={
                "grpc": f"{settings.grpc_host}:{app.grpc_port}",
                "http": f"{settings.http_host}:{sidecar.port}" if sidecar else None,
                "ops": f"{settings.metrics_host}:{app.ops.port}",
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
