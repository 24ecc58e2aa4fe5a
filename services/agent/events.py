"""What a run reports while it works, in order; the servicer turns each into a stream event."""

import enum
import uuid
from dataclasses import dataclass

from services.agent.models import Message
from services.agent.tools.base import RetrievedPassage, Source


class Step(enum.StrEnum):
    CLASSIFY_INTENT = "classify_intent"
    LOAD_CONTEXT = "load_context"
    SELECT_TOOLS = "select_tools"
    EXECUTE_TOOLS = "execute_tools"
    SYNTHESIZE = "synthesize"
    PERSIST = "persist"


class StepStatus(enum.StrEnum):
    STARTED = "started"
    COMPLETED = "completed"
    SKIPPED = "skipped"


class ToolOutcome(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    INVALID_ARGUMENTS = "invalid_arguments"


class AnswerMode(enum.StrEnum):
    GENERATED = "generated"
    EXTRACTIVE = "extractive"


@dataclass(frozen=True)
class RunStarted:
    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    conversation_created: bool


@dataclass(frozen=True)
class StepChanged:
    step: Step
    status: StepStatus
    detail: str = ""
    intent: str = ""


@dataclass(frozen=True)
class ToolCallStarted:
    call_id: str
    tool_name: str
    arguments_json: str


@dataclass(frozen=True)
class ToolCallFinished:
    call_id: str
    tool_name: str
    outcome: ToolOutcome
    summary: str
    sources: list[Source]
    error: str
    latency_ms: int


@dataclass(frozen=True)
class RetrievalDone:
    query: str
    passages: list[RetrievedPassage]


@dataclass(frozen=True)
class TokenDelta:
    text: str


@dataclass(frozen=True)
class CitationAdded:
    source: Source


@dataclass(frozen=True)
class UsageReported:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RunCompleted:
    message: Message
    finish_reason: str
    siblings: tuple[uuid.UUID, ...] = ()
    """The answers to the same question, oldest first, the message included (more than
    one once an answer was regenerated)."""


Event = (
    RunStarted
    | StepChanged
    | ToolCallStarted
    | ToolCallFinished
    | RetrievalDone
    | TokenDelta
    | CitationAdded
    | UsageReported
    | RunCompleted
)
