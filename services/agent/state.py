"""The state that flows through the agent graph (one per run, in memory)."""

import operator
from dataclasses import dataclass
from typing import Annotated, Any, TypedDict

from pydantic import BaseModel

from services.agent.llm import LlmCall
from services.agent.tools.base import Source, Tool


class Turn(TypedDict):
    role: str  # user | assistant
    content: str


@dataclass(frozen=True)
class PlannedCall:
    """A validated tool call the router allows."""

    call_id: str
    tool: Tool
    args: BaseModel
    arguments_json: str


class AgentState(TypedDict, total=False):
    query: str  # the cleaned question
    history: list[Turn]  # the conversation's last messages, oldest first
    intent: str
    context: list[Turn]  # the part of history given verbatim (within the token budget)
    summary: str  # older turns, summarized
    planned: list[PlannedCall]
    sources: list[Source]  # numbered in the order tools finished
    tool_errors: list[str]
    answer: str
    mode: str
    finish_reason: str
    llm_down: bool  # the LLM failed and the run fell back to extractive (by setting)
    # Appended to by every node that records them.
    tool_calls: Annotated[list[dict[str, Any]], operator.add]
    llm_calls: Annotated[list[LlmCall], operator.add]
