"""What agent nodes depend on, handed to them through LangGraph's runtime context."""

import uuid
from dataclasses import dataclass

from langgraph.runtime import Runtime

from services.agent.conversations import ConversationStore
from services.agent.intents import IntentExamples
from services.agent.llm import ChatModel
from services.agent.prompts import PromptManager
from services.agent.tools.registry import ToolRegistry
from services.agent.tracing import RunTrace
from services.auth.principal import Principal
from services.metrics import Metrics
from services.quotas.service import QuotaService
from services.usage_events.recorder import EventRecorder


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


@dataclass(frozen=True)
class AgentDeps:
    """Built once, complete, before the service is; shared by every run."""

    prompts: PromptManager
    """Every prompt the steps render (re-read on SIGHUP)."""

    registry: ToolRegistry
    """The configured tools, and which of them each intent may use."""

    intents: IntentExamples
    """The example questions of each intent and what embeds them: the fast intent
    classifier."""

    llm: ChatModel | None
    """The chat model; None answers extractively (no LLM configured, or not started yet)."""

    store: ConversationStore
    """Where conversations and their messages are kept."""

    settings: AgentSettings
    events: EventRecorder
    quotas: QuotaService
    metrics: Metrics


@dataclass(frozen=True)
class RunContext:
    """One run: who asks, where it is stored, and the shared dependencies."""

    deps: AgentDeps
    principal: Principal
    """The caller: tools act with their permissions only."""

    run_id: str
    conversation_id: uuid.UUID
    new_title: str | None
    """The title of the conversation this run creates; None when it continues one."""

    user_message_id: uuid.UUID
    """The question: a new one, or the stored one a regenerated answer answers again."""
    question_stored: bool
    """Whether the question is already stored (a regenerated answer): only the answer is."""
    parent_message_id: uuid.UUID | None
    """Where a new question goes in the conversation's tree (None: a first question)."""
    assistant_message_id: uuid.UUID
    started: float
    """time.perf_counter() when the run started (latencies count from here)."""

    trace: RunTrace


# What every graph node receives besides the state.
AgentRuntime = Runtime[RunContext]
