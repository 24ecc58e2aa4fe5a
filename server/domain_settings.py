"""Settings → the domain's own settings objects, one function each.

Domain code never sees `Settings`: every package takes a small frozen dataclass of what it
needs. This module is the one place that maps the environment's names onto those fields
(and unwraps secrets), so `server/domain.py` only decides which objects exist and how they
connect. It imports no grpc.
"""

import hashlib
import os
import secrets
from datetime import timedelta
from pathlib import Path

from pydantic import SecretStr

from server.config import Settings
from services.agent.context import AgentSettings
from services.agent.llm import LlmSettings
from services.agent.tools.api_search import ApiToolSettings
from services.agent.tools.web_search import WebSearchSettings
from services.analytics.stats import StatsSettings
from services.auth.principal import Role
from services.auth.tokens import TokenSettings
from services.knowledge.durable_queue import QUEUE_PREFIX, QueueSettings
from services.knowledge.embeddings import EmbedderSettings, packaged_model_path
from services.knowledge.parsing import ParseLimits
from services.knowledge.service import KnowledgeSettings
from services.quotas.service import Limits
from services.usage_events.recorder import RecorderSettings

MIB = 1024 * 1024


def revealed(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def jwt_secret(settings: Settings) -> str:
    """JWT_SECRET, or a random key created once in DATA_DIR (so tokens survive restarts)."""
    return _secret(settings.jwt_secret, settings.data_dir / "jwt-secret")


def index_token(settings: Settings) -> str:
    """INDEX_TOKEN, or a random one created once in DATA_DIR (workers beside it read it)."""
    return _secret(settings.index_token, settings.data_dir / "index-token")


def _secret(configured: SecretStr | None, path: Path) -> str:
    """The configured secret, or the one in `path`, written there (0600) the first time."""
    if configured is not None:
        return configured.get_secret_value()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then linked into place: processes starting
        # together (a server and its workers) all end up reading the one that won.
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
        try:
            os.link(partial, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(partial)
    return path.read_text().strip()


def token_settings(settings: Settings) -> TokenSettings:
    return TokenSettings(
        secret=jwt_secret(settings),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl=timedelta(seconds=settings.access_token_ttl_seconds),
        refresh_ttl=timedelta(seconds=settings.refresh_token_ttl_seconds),
    )


def recorder_settings(settings: Settings) -> RecorderSettings:
    return RecorderSettings(
        flush_interval=settings.events_flush_seconds, capacity=settings.events_buffer_capacity
    )


def embedder_settings(settings: Settings) -> EmbedderSettings:
    return EmbedderSettings(
        model=settings.embedding_model or packaged_model_path(),
        batch_size=settings.embedding_batch_size,
        threads=settings.embedding_threads,
        query_cache_size=settings.query_cache_size,
    )


def parse_limits(settings: Settings) -> ParseLimits:
    return ParseLimits(
        pdf_timeout_seconds=settings.pdf_timeout_seconds,
        pdf_memory_bytes=settings.pdf_memory_mb * MIB,
    )


def ingestion_queue(settings: Settings) -> str:
    """The queue of the index ingestion writes into. A Qdrant server takes any worker's
    writes: one queue. An embedded engine takes only its owner's (and its workers', through
    the owner): one queue per owner, named from the service credential they share, so two
    owners on one database never run each other's jobs."""
    if settings.qdrant_url:
        return QUEUE_PREFIX
    digest = hashlib.sha256(index_token(settings).encode()).hexdigest()[:16]
    return f"{QUEUE_PREFIX}-{digest}"


def queue_settings(settings: Settings) -> QueueSettings:
    return QueueSettings(
        capacity=settings.ingest_queue_size,
        workers=settings.ingest_workers,
        max_attempts=settings.ingest_max_attempts,
        heartbeat_seconds=settings.ingest_stalled_seconds / 3,
        stalled_seconds=settings.ingest_stalled_seconds,
        sweep_seconds=settings.ingest_sweep_seconds,
    )


def knowledge_settings(settings: Settings) -> KnowledgeSettings:
    return KnowledgeSettings(
        max_upload_bytes=settings.max_upload_bytes,
        dense_weight=settings.hybrid_dense_weight,
        candidates=settings.search_candidates,
        parse_limits=parse_limits(settings),
        storage_quota_bytes=settings.storage_quota_bytes,
    )


def llm_settings(settings: Settings) -> LlmSettings:
    return LlmSettings(
        base_url=settings.llm_base_url,
        api_key=revealed(settings.llm_api_key),
        model=settings.llm_model,
        timeout=settings.llm_timeout_seconds,
        max_retries=settings.llm_max_retries,
        temperature=settings.llm_temperature,
        max_tokens=settings.llm_max_tokens,
    )


def agent_settings(settings: Settings) -> AgentSettings:
    return AgentSettings(
        max_query_chars=settings.max_query_chars,
        context_messages=settings.context_messages,
        context_token_budget=settings.context_token_budget,
        intent_confidence=settings.intent_confidence,
        tool_timeout=settings.tool_timeout_seconds,
        run_timeout=settings.agent_run_timeout_seconds,
        max_runs_per_user=settings.max_concurrent_runs_per_user,
        fallback_extractive=settings.llm_fallback_extractive,
    )


def web_search_settings(settings: Settings) -> WebSearchSettings | None:
    """The web search tool's settings; None when no provider is configured (tool off)."""
    if not settings.web_search_provider:
        return None
    return WebSearchSettings(
        provider=settings.web_search_provider,
        url=settings.web_search_url,
        api_key=revealed(settings.web_search_api_key),
        top_k=settings.agent_top_k,
        timeout=settings.tool_timeout_seconds,
    )


def api_tool_settings(settings: Settings) -> ApiToolSettings | None:
    """The external API tool's settings; None when no URL is configured (tool off)."""
    if not settings.api_tool_url:
        return None
    return ApiToolSettings(
        url=settings.api_tool_url,
        method=settings.api_tool_method,
        body_template=settings.api_tool_body_template,
        auth_header=settings.api_tool_auth_header,
        auth_value=revealed(settings.api_tool_auth_value),
        results_path=settings.api_tool_results_path,
        title_field=settings.api_tool_title_field,
        url_field=settings.api_tool_url_field,
        snippet_field=settings.api_tool_snippet_field,
        description=settings.api_tool_description,
        admin_only=settings.api_tool_admin_only,
        top_k=settings.agent_top_k,
        timeout=settings.tool_timeout_seconds,
    )


def quota_limits(settings: Settings) -> dict[Role, Limits]:
    """Each role's query and token quotas per UTC day and month (0: unlimited)."""
    return {
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


def stats_settings(settings: Settings) -> StatsSettings:
    return StatsSettings(
        max_buckets=settings.stats_max_buckets,
        open_ttl=settings.stats_cache_seconds,
        closed_ttl=settings.stats_cache_closed_seconds,
        # Events reach the table within one flush; a minute covers a slow write.
        settle_seconds=settings.events_flush_seconds + 60,
    )
