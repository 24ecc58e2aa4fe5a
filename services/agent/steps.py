"""What every step of the graph does around its own work: announcing itself on the run's
stream (STARTED, then COMPLETED or SKIPPED), and asking the model (each reply traced; an
outage ends the run, or the run carries on without the model when the settings allow)."""

import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from services.agent.context import AgentRuntime
from services.agent.events import Event, Step, StepChanged, StepStatus, TokenDelta
from services.agent.llm import ChatModel, LlmCall, LlmUnavailable, Messages
from services.agent.state import State

log = logging.getLogger("agentmesh.agent")
T = TypeVar("T")


@dataclass(frozen=True)
class Done:
    """What a step's body hands back: its state update, and what its COMPLETED event says."""

    update: dict[str, Any]
    detail: str = ""
    intent: str = ""
    # Announced after COMPLETED: a later step this one made pointless, or the run's end.
    after: tuple[Event, ...] = ()


StepBody = Callable[[State, AgentRuntime], Awaitable[Done]]
# Why a step is skipped before it starts (its SKIPPED detail); None runs it.
SkipRule = Callable[[State, AgentRuntime], str | None]


class Node(Protocol):
    """A graph node as LangGraph calls it."""

    def __call__(
        self, state: State, runtime: AgentRuntime
    ) -> Coroutine[Any, Any, dict[str, Any]]: ...


def emit(runtime: AgentRuntime, event: Event) -> None:
    """Send `event` to the run's stream (the service turns it into a stream message)."""
    runtime.stream_writer(event)


def step(name: Step, *, skip: SkipRule | None = None) -> Callable[[StepBody], Node]:
    """Make `body` the graph node of step `name`: SKIPPED when `skip` gives a reason;
    otherwise STARTED, the body, then COMPLETED with the detail it returns. A body that
    raises ends the run, so its step never completes."""

    def wrap(body: StepBody) -> Node:
        async def node(state: State, runtime: AgentRuntime) -> dict[str, Any]:
            reason = skip(state, runtime) if skip is not None else None
            if reason is not None:
                emit(runtime, StepChanged(name, StepStatus.SKIPPED, reason))
                return {}
            emit(runtime, StepChanged(name, StepStatus.STARTED))
            done = await body(state, runtime)
            emit(runtime, StepChanged(name, StepStatus.COMPLETED, done.detail, done.intent))
            for event in done.after:
                emit(runtime, event)
            return done.update

        node.__name__ = node.__qualname__ = body.__name__
        node.__doc__ = body.__doc__
        return node

    return wrap


def fall_back(runtime: AgentRuntime, error: LlmUnavailable) -> None:
    """Continue without the LLM when the settings allow it; otherwise fail the run."""
    if not runtime.context.deps.settings.fallback_extractive:
        raise error
    log.warning("LLM unavailable, answering extractively: %s", error.message)


async def ask_llm(
    runtime: AgentRuntime, request: Awaitable[tuple[T, LlmCall]]
) -> tuple[T, LlmCall] | None:
    """The model's reply to `request`, traced; None when the model is down and the run
    carries on without it."""
    try:
        reply, call = await request
    except LlmUnavailable as error:
        fall_back(runtime, error)
        return None
    runtime.context.trace.generation(call)
    return reply, call


async def stream_llm(
    runtime: AgentRuntime, llm: ChatModel, prompt_name: str, messages: Messages
) -> tuple[str, LlmCall] | None:
    """The model's answer, each delta sent on as a token, traced; None when the model is
    down before its first token and the run carries on without it."""
    call, text = LlmCall(prompt_name, llm.model), ""
    try:
        async for delta in llm.stream(prompt_name, messages, call):
            text += delta
            emit(runtime, TokenDelta(delta))
    except LlmUnavailable as error:
        if text:  # half an answer was already sent: the run fails
            raise
        fall_back(runtime, error)
        return None
    runtime.context.trace.generation(call)
    return text, call
