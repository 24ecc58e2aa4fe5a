"""What agent nodes depend on, handed to them through LangGraph's runtime context."""

import uuid
from dataclasses import dataclass

from services.agent.conversations import ConversationStore
from services.agent.intents import IntentExamples
from services.agent.llm import ChatModel
from services.agent.prompts import PromptManager
from services.agent.tools.registry import ToolRegistry
from services.agent.tracing import RunTrace
from services.analytics.recorder import EventRecorder
from services.auth.principal import Principal
from services.knowledge.embeddings import Embedder
from services.metrics import Metrics
from services.quotas.service import QuotaService


@dataclass(frozen=True)
class AgentSettings:
    max_query_chars: int = 8000
    context_messages: int = 50
    context_token_budget: int = 3000
    intent_confidence: float = 0.55
    tool_timeout: float = 15.0
    run_timeout: float = 180.0
    max_runs_per_user: int = 4
    fallback_extractive: bool = False
    extractive_sources: int = 3
    summary_words: int = 150
    assistant_name: str = "agentmesh"


@dataclass
class AgentDeps:
    """Built once at start-up and shared by every run."""

    prompts: PromptManager
    registry: ToolRegistry
    embedder: Embedder
    llm: ChatModel | None  # None: extractive mode
    store: ConversationStore
    settings: AgentSettings
    events: EventRecorder
    quotas: QuotaService
    metrics: Metrics
    intents: IntentExamples | None = None  # embedded at start()


@dataclass(frozen=True)
class RunContext:
    """One run: who asks, where it is stored, and the shared dependencies."""

    deps: AgentDeps
    principal: Principal
    run_id: str
    conversation_id: uuid.UUID
    new_title: str | None  # set when this run creates the conversation
    user_message_id: uuid.UUID
    assistant_message_id: uuid.UUID
    started: float  # time.perf_counter() at the start
    trace: RunTrace
