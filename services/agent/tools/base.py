"""The tool interface: a name, a description, pydantic arguments (their JSON schema is
what the model sees) and an async `execute` that returns sources."""

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel

from services.auth.principal import Principal, Role


class SourceKind(enum.StrEnum):
    KNOWLEDGE_BASE = "knowledge_base"
    WEB = "web"
    API = "api"


@dataclass
class Source:
    """One thing a tool found that an answer may cite; `index` is set when the run numbers it."""

    kind: SourceKind
    title: str
    text: str
    url: str = ""
    document_id: str = ""
    chunk_id: str = ""
    page: int = 0
    start: int = 0
    end: int = 0
    score: float = 0.0
    index: int = 0


@dataclass(frozen=True)
class RetrievedPassage:
    """A passage as a retrieval tool found it, reported whole in the run's retrieval event
    (the tool's own payload: the agent does not depend on the knowledge package's types)."""

    chunk_id: str
    document_id: str
    document_title: str
    text: str
    score: float
    page: int
    start: int
    end: int
    chunk_index: int
    legs: frozenset[str]  # the retrieval legs that found it: "dense", "sparse"


@dataclass
class ToolResult:
    """What a tool returns: its sources and a one-line summary for the event stream."""

    sources: list[Source]
    summary: str
    # Passages as a retrieval tool searched them, for the stream's retrieval event.
    retrieval: list[RetrievedPassage] | None = None


class ToolFailed(Exception):
    """A tool could not do its work; the message is shown to the user and the model."""


@dataclass(frozen=True)
class ToolCallContext:
    """Who the tool runs for: it acts with the end user's permissions, never more."""

    principal: Principal


ALL_ROLES = frozenset(Role)


class Tool(ABC):
    """One capability the agent can call."""

    name: ClassVar[str]
    kind: ClassVar[SourceKind]
    Args: ClassVar[type[BaseModel]]
    roles: frozenset[Role] = ALL_ROLES
    guidance_prompt: ClassVar[str]

    def prompt_variables(self) -> dict[str, object]:
        """Variables of the tool's guidance prompt (its description as the model sees it)."""
        return {}

    @abstractmethod
    async def execute(self, args: BaseModel, call: ToolCallContext) -> ToolResult:
        """Run the tool with validated `args` for `call.principal`."""
