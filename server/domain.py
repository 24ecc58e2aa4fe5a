"""The first layer of the composition root: the domain, built from Settings.

`build_domain` decides which objects exist and hands each what it needs by constructor;
`server/domain_settings.py` maps Settings onto their settings objects. Nothing here
imports grpc: `server/main.py` serves a built Domain, and any process kind (every service
in one, or one service alone) is a choice of services over the same Domain.
"""

import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TypeVar

from prometheus_client import CollectorRegistry
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from server import domain_settings as configured
from server.config import Settings
from server.llm_sidecar import LocalLlmSidecar, packaged_model
from server.request_context import request_origin
from services.accounts.export import AccountExports
from services.agent.a2a_tasks import A2aTasks
from services.agent.accounting import UNKNOWN_INTENT
from services.agent.context import AgentDeps
from services.agent.conversations import ConversationStore
from services.agent.events import ToolOutcome
from services.agent.intents import Intent, IntentExamples, TextEncoder
from services.agent.llm import PURPOSES, ChatModel, LlmSettings
from services.agent.prompts import PromptManager
from services.agent.run_log import InProcessRunLog
from services.agent.run_log_redis import SOCKET_TIMEOUT_SECONDS as RUN_LOG_SOCKET_TIMEOUT
from services.agent.run_log_redis import RedisRunLog
from services.agent.run_slots import InProcessRunSlots, RedisRunSlots
from services.agent.runs import RunManager
from services.agent.service import AgentService
from services.agent.tools.api_search import ApiSearchTool
from services.agent.tools.base import Tool
from services.agent.tools.knowledge_search import KnowledgeBase, KnowledgeSearchTool
from services.agent.tools.mcp_toolbox import McpToolbox
from services.agent.tools.outbound import OutboundHttp
from services.agent.tools.registry import ToolRegistry
from services.agent.tools.web_search import WebSearchTool
from services.agent.tracing import NoopTracer, Tracer
from services.analytics.stats import StatsService
from services.analytics.usage import UsageService
from services.audit.listing import AuditListing
from services.audit.retention import AuditRetention
from services.audit.trail import AuditTrail
from services.auth.api_keys import ApiKeyService, KeyCredentials
from services.auth.auth_state import AuthStates, InProcessStateCache, RedisStateCache
from services.auth.invitations import Invitations
from services.auth.passwords import PasswordHasher
from services.auth.service import AuthService
from services.auth.tokens import TokenCodec
from services.auth.users import UserService
from services.cache import Cache, InProcessCache, RedisCache
from services.db import create_engine, create_sessionmaker
from services.feedback.service import FeedbackService
from services.knowledge.chunking import ChunkingPolicy
from services.knowledge.durable_queue import DurableQueue
from services.knowledge.embeddings import Embedder
from services.knowledge.ingestion import (
    IngestionPipeline,
    InProcessQueue,
    JobQueue,
    PassageIndex,
)
from services.knowledge.lexical import LexicalEncoder
from services.knowledge.reranking import CrossEncoderReranker
from services.knowledge.service import KnowledgeService
from services.knowledge.vector_backends import connect_vector_store
from services.limits import InProcessRateLimiter, RateLimiter, RedisRateLimiter
from services.metrics import Metrics
from services.quotas.counters import Counters, InProcessCounters, RedisCounters
from services.quotas.service import QuotaService
from services.teams.groups import GroupService
from services.usage_events.recorder import EventRecorder

# Threads parsing, chunking and building lexical vectors (a PDF waits on its child process).
PARSE_THREADS = 2
# Redis connections per process and client; the pool blocks past this (see `redis_client`).
REDIS_CONNECTIONS = 64
T = TypeVar("T")


@dataclass
class Peers:
    """Clients of services another process serves, made by the transport layer
    (`server/peers.py`); None where this process serves the service itself."""

    knowledge: KnowledgeBase | None = None  # searches, as the end user
    index: PassageIndex | None = None  # the index owner's writes, as the service
    encoder: TextEncoder | None = None  # the index owner's model, as the service
    close: Callable[[], Awaitable[None]] | None = None


@dataclass
class Domain:
    """The domain services and the resources they hold. The knowledge base and the agent
    exist only in a process that serves them; the heavy ones, the vector index and the
    embedding model (torch), only with the knowledge base."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    executor: ThreadPoolExecutor
    tokens: TokenCodec
    service_token: str  # what agentmesh's own processes present (internal services)
    auth_states: AuthStates  # who may act as each account now, checked on every call
    auth: AuthService
    users: UserService
    invitations: Invitations  # CreateUser's one-time tokens, redeemed by AcceptInvitation
    account_exports: AccountExports  # everything held about a person, as one download
    groups: GroupService  # groups of accounts (issue 23), served with the users' service
    # API keys: managed, and checked on every call that presents one (with their last use).
    api_keys: ApiKeyService
    knowledge_service: KnowledgeService | None
    agent_service: AgentService | None
    embedder: Embedder | None  # the knowledge base's; None without it
    feedback: FeedbackService
    events: EventRecorder
    audit: AuditTrail
    audit_listing: AuditListing
    # Deletes records past AUDIT_RETENTION_DAYS; only in a process serving the audit service.
    audit_retention: AuditRetention | None
    usage: UsageService
    stats: StatsService
    outbound: OutboundHttp
    limiter: RateLimiter
    redis: Redis | None  # quotas, caches and the readiness probe
    metrics: Metrics
    peers: Peers = field(default_factory=Peers)
    limiter_redis: Redis | None = None  # the rate limiter's own, with its tight timeouts
    # The llama.cpp server of LLM_PROVIDER=local; the agent's client is made once it serves.
    local_llm: LocalLlmSidecar | None = None
    local_llm_settings: LlmSettings | None = None
    mcp_tools: McpToolbox | None = None  # the agent's MCP tool servers (MCP_SERVERS_FILE)
    # The agent's runs as A2A tasks (server/servicers/a2a.py); with the agent only.
    a2a_tasks: A2aTasks | None = None

    @property
    def knowledge(self) -> KnowledgeService:
        """The knowledge base of a process that serves it."""
        if self.knowledge_service is None:
            raise LookupError("this process does not serve the knowledge base")
        return self.knowledge_service

    @property
    def agent(self) -> AgentService:
        """The agent of a process that serves it."""
        if self.agent_service is None:
            raise LookupError("this process does not serve the agent")
        return self.agent_service

    def reload(self) -> None:
        """SIGHUP: re-read the prompts and the MCP servers file (in the background)."""
        if self.agent_service is not None:
            self.agent_service.reload_prompts()
        if self.mcp_tools is not None:
            self.mcp_tools.reload_soon()

    async def start(self) -> None:
        await self.events.start()
        if self.mcp_tools is not None:
            await self.mcp_tools.start()  # their tools are listed before the first run
        await self.api_keys.credentials.start()
        if self.audit_retention is not None:
            await self.audit_retention.start()
        if self.knowledge_service is not None:
            await self.knowledge_service.start()
        if self.local_llm is not None and self.local_llm_settings is not None:
            await self.local_llm.start()
            # Its address and model are known only now that it runs.
            settings = replace(
                self.local_llm_settings,
                base_url=self.local_llm.base_url,
                model=self.local_llm.model,
                api_key=None,
            )
            self.agent.use_llm(ChatModel(settings, self.metrics))
            self.metrics.declare_llm_series(settings.model, PURPOSES.values())

    async def close(self) -> None:
        if self.agent_service is not None:
            await self.agent_service.stop()
        if self.a2a_tasks is not None:  # after the runs: their tasks record how they ended
            await self.a2a_tasks.stop()
        if self.mcp_tools is not None:
            await self.mcp_tools.stop()
        if self.local_llm is not None:
            await self.local_llm.stop()
        await self.outbound.close()
        if self.knowledge_service is not None:
            await self.knowledge_service.stop()  # closes the embedder too
        if self.peers.close is not None:
            await self.peers.close()
        await self.events.stop()  # after everything that records events
        await self.api_keys.credentials.stop()
        if self.audit_retention is not None:
            await self.audit_retention.stop()
        for redis in (self.redis, self.limiter_redis):
            if redis is not None:
                await redis.aclose()
        await self.engine.dispose()
        self.executor.shutdown(wait=False, cancel_futures=True)


def build_knowledge(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    embedder: Embedder,
    events: EventRecorder,
    metrics: Metrics,
    audit: AuditTrail | None = None,
) -> KnowledgeService:
    """The knowledge base: Qdrant, ingestion workers, the optional cross-encoder."""
    store = connect_vector_store(
        url=settings.qdrant_url,
        api_key=configured.revealed(settings.qdrant_api_key),
        data_dir=settings.data_dir,
        collection=settings.qdrant_collection,
    )
    lexical = LexicalEncoder()
    executor = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="ingest")
    pipeline = build_pipeline(settings, sessions, store, embedder, lexical, executor, metrics)
    queue = build_ingestion_queue(settings, sessions, pipeline)
    reranker = (
        CrossEncoderReranker.load(settings.reranker_model, embedder)
        if settings.reranker_model
        else None
    )
    return KnowledgeService(
        sessions,
        store,
        embedder,
        lexical,
        queue,
        executor,
        configured.knowledge_settings(settings),
        events,
        metrics,
        reranker,
        audit=audit,
    )


def build_pipeline(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    index: PassageIndex,
    embedder: Embedder,
    lexical: LexicalEncoder,
    executor: ThreadPoolExecutor,
    metrics: Metrics,
) -> IngestionPipeline:
    """Parse, chunk, embed and write into `index`: the vector store itself, or (in a worker
    process beside an embedded store) the process that owns it."""
    chunking = ChunkingPolicy(
        embedder.max_tokens, settings.chunk_overlap_tokens, settings.max_chunks_per_document
    )
    limits = configured.parse_limits(settings)
    return IngestionPipeline(
        sessions, index, embedder, lexical, chunking, limits, executor, metrics
    )


def build_ingestion_queue(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    pipeline: IngestionPipeline | None,
) -> JobQueue:
    """PostgreSQL: the durable queue, which any number of processes work on (`pipeline`
    None: this one only queues). SQLite: the in-process queue of the one process."""
    url = settings.resolved_database_url
    if url.startswith("postgresql"):
        return DurableQueue(
            url,
            sessions,
            configured.queue_settings(settings),
            pipeline,
            queue_name=configured.ingestion_queue(settings),
        )
    if pipeline is None or settings.ingest_workers == 0:
        raise ValueError("with SQLite this process must ingest: set INGEST_WORKERS above 0")
    return InProcessQueue(
        pipeline, sessions, workers=settings.ingest_workers, capacity=settings.ingest_queue_size
    )


def build_tools(settings: Settings, knowledge: KnowledgeBase, outbound: OutboundHttp) -> list[Tool]:
    """The knowledge-base tool, plus web and API search when their services are configured."""
    tools: list[Tool] = [KnowledgeSearchTool(knowledge, settings.agent_top_k)]
    if web := configured.web_search_settings(settings):
        tools.append(WebSearchTool(outbound, web))
    if api := configured.api_tool_settings(settings):
        tools.append(ApiSearchTool(outbound, api))
    return tools


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
    encoder: TextEncoder,
    knowledge: KnowledgeBase,
    outbound: OutboundHttp,
    events: EventRecorder,
    quotas: QuotaService,
    metrics: Metrics,
    mcp: McpToolbox | None = None,
) -> AgentService:
    """The agent: prompts, tools (with the MCP servers' of `mcp`), the intent examples
    (embedded through `encoder` when first needed), the LLM client (none in extractive
    mode) and the graph."""
    prompts = PromptManager(settings.prompts_dir, auto_reload=settings.prompts_auto_reload)
    provider = settings.resolved_llm_provider
    # The local provider's client is made when its sidecar has started (Domain.start).
    llm = ChatModel(configured.llm_settings(settings), metrics) if provider == "openai" else None
    registry = ToolRegistry(build_tools(settings, knowledge, outbound), prompts, mcp)
    # Every series a dashboard or an alert reads exists from the first scrape, at 0.
    tools = [tool.name for tool in registry.get_all_tools()]
    metrics.declare_agent_series(Intent, UNKNOWN_INTENT, tools, ToolOutcome)
    if llm is not None:
        metrics.declare_llm_series(llm.model, PURPOSES.values())
    deps = AgentDeps(
        prompts=prompts,
        registry=registry,
        intents=IntentExamples.load(prompts, encoder),
        llm=llm,
        store=ConversationStore(sessions),
        settings=configured.agent_settings(settings),
        events=events,
        quotas=quotas,
        metrics=metrics,
    )
    return AgentService(deps, build_tracer(settings), build_runs(settings))


def build_runs(settings: Settings) -> RunManager:
    """Where agent runs keep their events and count against the per-user cap: Redis when it
    is configured (any replica re-attaches to or cancels a run), else this process."""
    ttl = settings.agent_run_log_ttl_seconds
    if not settings.redis_url:
        return RunManager(InProcessRunLog(ttl), InProcessRunSlots())
    # Its own client: followers block in XREAD for longer than the limiter's socket timeout.
    redis = Redis.from_url(
        settings.redis_url, socket_timeout=RUN_LOG_SOCKET_TIMEOUT, retry=resend_on_new_connection()
    )
    prefix = settings.redis_key_prefix
    return RunManager(RedisRunLog(redis, prefix, ttl), RedisRunSlots(redis, prefix))


def resend_on_new_connection() -> Retry:
    """A pooled connection Redis dropped (it restarted, or the network cut it) shows only
    when used: the command is sent once more, on a new connection. Connection errors only:
    a command that timed out may have run, and INCRBY must not run twice."""
    return Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,))


def redis_client(url: str, timeout: float) -> Redis:
    """A client whose connections give up after `timeout` seconds (connecting, or waiting
    for a reply), and which survives Redis restarting between two calls."""
    # A blocking pool: the default one raises past its size, which would wave a burst
    # through the limiter (fail open) instead of queueing it within the decision timeout.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=REDIS_CONNECTIONS,
        timeout=None,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=resend_on_new_connection(),
    )
    return Redis.from_pool(pool)


def connect_redis(settings: Settings) -> Redis | None:
    """The Redis client for quotas and caches when REDIS_URL is set (shared by replicas),
    with REDIS_TIMEOUT_SECONDS; None keeps them in process."""
    if not settings.redis_url:
        return None
    return redis_client(settings.redis_url, settings.redis_timeout_seconds)


def connect_limiter_redis(settings: Settings) -> Redis | None:
    """The rate limiter's own client: its timeouts are the decision's few milliseconds,
    which would fail slower calls (quotas, caches) spuriously under load."""
    if not settings.redis_url:
        return None
    return redis_client(settings.redis_url, settings.rate_limit_timeout_seconds)


def build_auth_states(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    tokens: TokenCodec,
    redis: Redis | None,
) -> AuthStates:
    """Accounts' auth states, cached in Redis when it is configured (every replica applies a
    deletion or a revoked session on its next call), else in process, or not at all."""
    ttl = settings.auth_state_cache_seconds
    # Revoked sessions matter while their access tokens live, plus room for clock skew.
    window = tokens.access_ttl + timedelta(minutes=1)
    if ttl == 0:
        return AuthStates(sessions, None, window=window)
    if redis is None:
        return AuthStates(sessions, InProcessStateCache(ttl), window=window)
    prefix = f"{settings.redis_key_prefix}authstate:"
    cache = RedisStateCache(redis, prefix, ttl, timeout=settings.rate_limit_timeout_seconds)
    return AuthStates(sessions, cache, window=window)


def build_limiter(settings: Settings, redis: Redis | None) -> RateLimiter:
    """Rate limits counted in Redis when it is configured (shared by replicas)."""
    if redis is None:
        return InProcessRateLimiter(max_keys=100_000)
    return RedisRateLimiter(
        redis,
        prefix=f"{settings.redis_key_prefix}rl:",
        timeout=settings.rate_limit_timeout_seconds,
        fail_open=settings.rate_limit_fail_open,
    )


def build_quotas(settings: Settings, redis: Redis | None, metrics: Metrics) -> QuotaService:
    """Per-role quotas, counted in Redis when it is configured (shared by replicas)."""
    counters: Counters = (
        RedisCounters(redis, settings.redis_key_prefix, settings.redis_timeout_seconds)
        if redis
        else InProcessCounters()
    )
    return QuotaService(
        counters,
        configured.quota_limits(settings),
        fail_open=settings.quota_fail_open,
        metrics=metrics,
    )


def shared_queries(settings: Settings, redis: Redis | None) -> Cache | None:
    """Query embeddings shared by the processes on one Redis: replicas of the knowledge
    base embed a question once between them (the one an agent process asked to embed it,
    to classify it, and the one its search reached through Envoy)."""
    return RedisCache(redis, f"{settings.redis_key_prefix}qemb:") if redis else None


def build_stats(
    settings: Settings, sessions: async_sessionmaker[AsyncSession], redis: Redis | None
) -> StatsService:
    """Statistics from the events table, cached in Redis when it is configured."""
    cache: Cache = (
        RedisCache(redis, f"{settings.redis_key_prefix}cache:") if redis else InProcessCache()
    )
    return StatsService(sessions, cache, configured.stats_settings(settings))


def build_domain(
    settings: Settings, registry: CollectorRegistry | None = None, peers: Peers | None = None
) -> Domain:
    """The domain of a process serving SERVICES; their metrics go to `registry` (none: a
    private one). `peers` reach what the process needs but does not serve: the knowledge
    base for the agent's tool, the index owner for a deleted account's passages and for
    the agent's embeddings."""
    served = set(settings.services)
    peers = peers or Peers()
    metrics = Metrics(registry)
    engine = create_engine(settings.resolved_database_url)
    sessions = create_sessionmaker(engine)
    executor = ThreadPoolExecutor(settings.password_hash_workers, thread_name_prefix="argon2")
    tokens = TokenCodec(configured.token_settings(settings))
    events = EventRecorder(
        sessions, configured.recorder_settings(settings), observer=metrics.observe_event
    )
    audit = AuditTrail(sessions, where=request_origin)
    redis = connect_redis(settings)
    limiter_redis = connect_limiter_redis(settings)
    # Read on every authenticated call: the hot path's client, with its tight timeouts.
    states = build_auth_states(settings, sessions, tokens, limiter_redis)
    # The model (and torch) only where the knowledge base is: an agent apart from it
    # embeds through the knowledge process (peers.encoder).
    embedder = (
        Embedder.load(configured.embedder_settings(settings), shared_queries(settings, redis))
        if "knowledge" in served
        else None
    )
    knowledge = (
        build_knowledge(settings, sessions, embedder, events, metrics, audit)
        if embedder is not None
        else None
    )
    outbound = OutboundHttp(settings.outbound_allowed_networks)
    quotas = build_quotas(settings, redis, metrics)
    agent, mcp_tools = None, None
    if "agent" in served:
        searched = knowledge or _required(peers.knowledge, "KNOWLEDGE_TARGET")
        encoder: TextEncoder = (
            embedder if embedder is not None else _required(peers.encoder, "INDEX_TARGET")
        )
        # The environment is read here, the root: `${NAME}` secrets of the MCP servers file.
        mcp_tools = McpToolbox(
            settings.mcp_servers_file,
            os.environ,
            metrics,
            auto_reload=settings.prompts_auto_reload,
        )
        agent = build_agent(
            settings, sessions, encoder, searched, outbound, events, quotas, metrics, mcp_tools
        )
    purge = knowledge.purge_owner if knowledge else None
    if "users" in served and purge is None:
        purge = _required(peers.index, "INDEX_TARGET").delete_owner
    local_llm = None
    if agent is not None and settings.resolved_llm_provider == "local":
        local_llm = LocalLlmSidecar(
            packaged_model(settings.data_dir),
            threads=settings.local_llm_threads,
            workdir=settings.data_dir / "llm",
        )
    hasher = PasswordHasher(executor)
    auth = AuthService(sessions, hasher, tokens, events, states, audit)
    invitations = Invitations(
        sessions, hasher, auth, audit, ttl=timedelta(hours=settings.invitation_ttl_hours)
    )
    return Domain(
        engine=engine,
        sessions=sessions,
        executor=executor,
        tokens=tokens,
        service_token=configured.index_token(settings),
        auth_states=states,
        auth=auth,
        users=UserService(
            sessions,
            states,
            hasher=hasher,
            invitations=invitations,
            audit=audit,
            on_deleted=purge,
        ),
        invitations=invitations,
        account_exports=AccountExports(sessions, audit),
        groups=GroupService(sessions, audit),
        api_keys=ApiKeyService(sessions, states, audit, KeyCredentials(sessions, states)),
        knowledge_service=knowledge,
        agent_service=agent,
        embedder=embedder,
        feedback=FeedbackService(sessions, events),
        events=events,
        audit=audit,
        audit_listing=AuditListing(sessions),
        audit_retention=(
            AuditRetention(sessions, settings.audit_retention_days) if "audit" in served else None
        ),
        usage=UsageService(sessions, quotas, settings.storage_quota_bytes),
        stats=build_stats(settings, sessions, redis),
        limiter=build_limiter(settings, limiter_redis),
        redis=redis,
        limiter_redis=limiter_redis,
        metrics=metrics,
        outbound=outbound,
        peers=peers,
        local_llm=local_llm,
        local_llm_settings=configured.llm_settings(settings),
        mcp_tools=mcp_tools,
        a2a_tasks=A2aTasks(agent, sessions) if agent is not None else None,
    )


def _required(peer: T | None, setting: str) -> T:
    """A peer this process cannot work without (server/peers.py makes it from `setting`)."""
    if peer is None:
        raise ValueError(f"a service this process serves needs another's: set {setting}")
    return peer
