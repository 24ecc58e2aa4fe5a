"""The agent workflow: one LangGraph StateGraph, compiled once at start-up.

classify_intent → load_context → select_tools → [execute_tools] → synthesize → persist

Each node is a step (`steps.step`): the wrapper announces it on the run's stream and the
body does only the step's work. Nodes get their dependencies from the runtime context
(`RunContext`); what they emit reaches the caller through the service as stream events.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import date
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph

from services.agent.answers import citation_record, cited
from services.agent.context import AgentDeps, AgentRuntime, RunContext
from services.agent.events import (
    AnswerMode,
    CitationAdded,
    RetrievalDone,
    RunCompleted,
    Step,
    StepChanged,
    StepStatus,
    TokenDelta,
    ToolCallFinished,
    ToolCallStarted,
    ToolOutcome,
    UsageReported,
)
from services.agent.intents import Intent
from services.agent.llm import ChatModel, LlmCall, RawToolCall
from services.agent.models import Message
from services.agent.planning import RejectedCall, default_calls, vet_calls
from services.agent.state import InputState, PlannedCall, State, Turn
from services.agent.steps import Done, ask_llm, emit, step, stream_llm
from services.agent.tools.base import Source, Tool, ToolCallContext, ToolFailed, ToolResult
from services.auth.principal import Principal
from services.errors import DomainError

log = logging.getLogger("agentmesh.agent")
INTENT_SCHEMA_NAME = "agent/intent_classification.j2"


def _tokens(text: str) -> int:
    # A model-independent estimate (about 4 characters per token for English text).
    return len(text) // 4 + 1


@step(Step.CLASSIFY_INTENT)
async def classify_intent(state: State, runtime: AgentRuntime) -> Done:
    """The question's intent: the nearest example's, or the model's when that one is unsure
    or cannot compare (its encoder is another process, unreachable); without either,
    general (the knowledge base and the web)."""
    deps = runtime.context.deps
    guess = await deps.intents.guess(state.query)
    if guess is None:
        intent, how, similarity = Intent.GENERAL, "default", "encoder unavailable"
    else:
        intent, how, similarity = guess.intent, "embedding", f"similarity {guess.confidence:.2f}"
    update: dict[str, Any] = {}
    unsure = guess is None or guess.confidence < deps.settings.intent_confidence
    if deps.llm is not None and unsure:
        reply = await ask_llm(runtime, _ask_intent(deps, deps.llm, state))
        if reply is None:
            update["llm_down"] = True
        else:
            chosen, call = reply
            update["llm_calls"] = [call]
            if chosen is not None:
                intent, how = chosen, "llm"
    if intent is Intent.FOLLOW_UP and not state.history:
        intent = Intent.GENERAL  # nothing earlier to follow up on
    detail = f"{intent.value} ({how}, {similarity})"
    return Done({**update, "intent": intent}, detail, intent=intent.value)


async def _ask_intent(
    deps: AgentDeps, llm: ChatModel, state: State
) -> tuple[Intent | None, LlmCall]:
    """The model's pick among the intents (None when it names none of them)."""
    infos = deps.intents.infos
    names = [info.name for info in infos]
    prompt = deps.prompts.render(
        INTENT_SCHEMA_NAME,
        intents=infos,
        examples=[
            {"question": example, "answer": f'{{"intent": "{info.name}"}}'}
            for info in infos
            for example in info.examples[:2]
        ],
        history=state.history[-4:],
        query=state.query,
    )
    schema = {
        "type": "object",
        "properties": {"intent": {"type": "string", "enum": names}},
        "required": ["intent"],
        "additionalProperties": False,
    }
    value, call = await llm.structured(
        INTENT_SCHEMA_NAME, [{"role": "user", "content": prompt}], schema
    )
    chosen = value.get("intent") if value is not None else None
    return (Intent(chosen) if chosen in names else None), call


def _new_conversation(state: State, runtime: AgentRuntime) -> str | None:
    return "new conversation" if not state.history else None


@step(Step.LOAD_CONTEXT, skip=_new_conversation)
async def load_context(state: State, runtime: AgentRuntime) -> Done:
    """The history the answer sees: the newest turns verbatim within the token budget,
    the older ones summarized."""
    budget = runtime.context.deps.settings.context_token_budget
    older, recent = _split_history(state.history, budget)
    summary, calls = "", list[LlmCall]()
    if older:
        summary, calls = await _summarize(older, state, runtime)
    detail = f"{len(recent)} messages verbatim, {len(older)} summarized"
    return Done({"context": recent, "summary": summary, "llm_calls": calls}, detail)


def _split_history(history: list[Turn], budget: int) -> tuple[list[Turn], list[Turn]]:
    """(older, recent): the newest turns that fit in `budget` tokens are the recent ones."""
    kept, split = 0, len(history)
    while split > 0 and kept + _tokens(history[split - 1]["content"]) <= budget:
        kept += _tokens(history[split - 1]["content"])
        split -= 1
    return history[:split], history[split:]


async def _summarize(
    turns: list[Turn], state: State, runtime: AgentRuntime
) -> tuple[str, list[LlmCall]]:
    deps = runtime.context.deps
    if deps.llm is not None and not state.llm_down:
        name = "agent/conversation_summary.j2"
        prompt = deps.prompts.render(name, turns=turns, max_words=deps.settings.summary_words)
        messages = [{"role": "user", "content": prompt}]
        max_tokens = deps.settings.summary_words * 2
        reply = await ask_llm(runtime, deps.llm.complete(name, messages, max_tokens=max_tokens))
        if reply is not None:
            text, call = reply
            return text, [call]
    # Without a model: the start of each older turn.
    return "\n".join(f"{t['role']}: {t['content'][:200]}" for t in turns[-20:]), []


def _allowed_tools(state: State, runtime: AgentRuntime) -> list[Tool]:
    """The tools the router allows for the question's intent and the caller's role."""
    return runtime.context.deps.registry.tools_for(state.intent, runtime.context.principal.role)


def _no_tools(state: State, runtime: AgentRuntime) -> str | None:
    return "no tools needed" if not _allowed_tools(state, runtime) else None


@step(Step.SELECT_TOOLS, skip=_no_tools)
async def select_tools(state: State, runtime: AgentRuntime) -> Done:
    """The calls to run: the model's choice among the allowed tools (vetted), or the
    router's default calls when there is no model or it calls nothing."""
    deps, allowed = runtime.context.deps, _allowed_tools(state, runtime)
    planned = default_calls(allowed, state.query, 1)
    update: dict[str, Any] = {}
    if deps.llm is not None and not state.llm_down:
        reply = await ask_llm(runtime, _ask_tools(runtime, deps.llm, state, allowed))
        if reply is None:
            update["llm_down"] = True
        else:
            raw, call = reply
            update["llm_calls"] = [call]
            if raw:  # a model that calls nothing gets the router's default calls
                planned, rejected = vet_calls(raw, allowed, 1)
                update["tool_calls"] = [_refuse(runtime, r) for r in rejected]
    names = ", ".join(p.tool.name for p in planned) or "none"
    # Nothing valid to run: the graph goes straight to the answer (route_after_selection).
    skipped = StepChanged(Step.EXECUTE_TOOLS, StepStatus.SKIPPED, "no valid tool calls")
    return Done({**update, "planned": planned}, names, after=() if planned else (skipped,))


async def _ask_tools(
    runtime: AgentRuntime, llm: ChatModel, state: State, allowed: list[Tool]
) -> tuple[list[RawToolCall], LlmCall]:
    """The model's tool calls among `allowed` (possibly none)."""
    deps, name = runtime.context.deps, "agent/tool_selection.j2"
    prompt = deps.prompts.render(
        name,
        tools=[{"name": t.name, "guidance": deps.registry.description(t)} for t in allowed],
        history=state.context[-6:],
        query=state.query,
    )
    specs = deps.registry.openai_specs(allowed, runtime.context.principal)
    return await llm.tool_calls(name, [{"role": "user", "content": prompt}], specs)


def route_after_selection(state: State) -> str:
    """Run the planned tool calls, or go straight to the answer when there are none."""
    return "execute_tools" if state.planned else "synthesize"


@dataclass(frozen=True)
class ToolRun:
    """How one tool call ended: its outcome, what it returned, and how long it took."""

    call_id: str
    tool_name: str
    arguments_json: str
    outcome: ToolOutcome
    error: str = ""
    latency_ms: int = 0
    result: ToolResult | None = None

    @property
    def sources(self) -> list[Source]:
        return self.result.sources if self.result else []

    @property
    def summary(self) -> str:
        return self.result.summary if self.result else ""

    def finished(self) -> ToolCallFinished:
        """The call's result event."""
        return ToolCallFinished(
            self.call_id,
            self.tool_name,
            self.outcome,
            self.summary,
            self.sources,
            self.error,
            self.latency_ms,
        )

    def record(self) -> dict[str, Any]:
        """The call as stored with the answer (plain JSON)."""
        return {
            "tool_call_id": self.call_id,
            "name": self.tool_name,
            "arguments_json": self.arguments_json,
            "outcome": self.outcome.value,
            "error_message": self.error,
            "latency_ms": self.latency_ms,
        }


async def run_tool_call(call: PlannedCall, principal: Principal, timeout: float) -> ToolRun:
    """Run one planned call for `principal` within `timeout`; a failure is its outcome."""
    started = time.perf_counter()
    result: ToolResult | None = None
    outcome, error = ToolOutcome.OK, ""
    try:
        async with asyncio.timeout(timeout):
            result = await call.tool.execute(call.args, ToolCallContext(principal))
    except TimeoutError:
        outcome, error = ToolOutcome.TIMEOUT, "the tool did not finish in time"
    except (ToolFailed, DomainError) as failure:
        outcome, error = ToolOutcome.ERROR, str(failure)
    except Exception:
        log.exception("tool %s failed", call.tool.name)
        outcome, error = ToolOutcome.ERROR, "the tool failed unexpectedly"
    latency = int((time.perf_counter() - started) * 1000)
    return ToolRun(
        call.call_id, call.tool.name, call.arguments_json, outcome, error, latency, result
    )


def _report(runtime: AgentRuntime, run: ToolRun, query: str) -> None:
    """A finished call on the stream (its retrieval, its result), in metrics and the trace."""
    ctx = runtime.context
    if run.result is not None and run.result.retrieval is not None:
        emit(runtime, RetrievalDone(query, run.result.retrieval))
    emit(runtime, run.finished())
    ctx.deps.metrics.tool_calls.labels(run.tool_name, run.outcome.value).inc()
    ctx.deps.metrics.tool_call_seconds.labels(run.tool_name).observe(run.latency_ms / 1000)
    ctx.trace.tool(
        name=run.tool_name,
        arguments=run.arguments_json,
        outcome=run.outcome.value,
        latency_ms=run.latency_ms,
        summary=run.summary,
        error=run.error,
    )


def _refuse(runtime: AgentRuntime, rejected: RejectedCall) -> dict[str, Any]:
    """Announce a refused call as started and ended (it never ran); its stored record."""
    r, registry = rejected, runtime.context.deps.registry
    run = ToolRun(r.call_id, r.tool_name, r.arguments_json, ToolOutcome.INVALID_ARGUMENTS, r.error)
    # The model may name a tool that does not exist: such names are not a metrics label.
    known = r.tool_name if registry.get_tool_by_name(r.tool_name) else "unknown"
    runtime.context.deps.metrics.tool_calls.labels(known, run.outcome.value).inc()
    emit(runtime, ToolCallStarted(r.call_id, r.tool_name, r.arguments_json))
    emit(runtime, run.finished())
    return run.record()


@step(Step.EXECUTE_TOOLS)
async def execute_tools(state: State, runtime: AgentRuntime) -> Done:
    """Run the planned calls concurrently; their sources are numbered as they finish."""
    ctx = runtime.context
    sources: list[Source] = []
    finished: list[ToolRun] = []

    async def run_and_report(call: PlannedCall) -> None:
        emit(runtime, ToolCallStarted(call.call_id, call.tool.name, call.arguments_json))
        ran = await run_tool_call(call, ctx.principal, ctx.deps.settings.tool_timeout)
        for source in ran.sources:  # numbered in the order results arrive
            sources.append(source)
            source.index = len(sources)
        finished.append(ran)
        _report(runtime, ran, call.args.model_dump().get("query", ""))

    await asyncio.gather(*(run_and_report(call) for call in state.planned))
    update = {
        "sources": sources,
        "tool_errors": [r.tool_name for r in finished if r.outcome is not ToolOutcome.OK],
        "tool_calls": [r.record() for r in finished],
    }
    return Done(update, f"{len(sources)} sources")


@step(Step.SYNTHESIZE)
async def synthesize(state: State, runtime: AgentRuntime) -> Done:
    """The answer, streamed from the model; extractive without one (or when it is down
    and the settings allow)."""
    deps = runtime.context.deps
    if deps.llm is not None and not state.llm_down:
        name = "agent/response_synthesis.j2"
        streamed = await stream_llm(runtime, deps.llm, name, _synthesis_messages(state, deps))
        if streamed is not None:
            answer, call = streamed
            update = {
                "answer": answer,
                "mode": AnswerMode.GENERATED,
                "finish_reason": call.finish_reason or "stop",
                "llm_calls": [call],
            }
            return Done(update, AnswerMode.GENERATED.value)
    return _extractive(state, runtime)


def _synthesis_messages(state: State, deps: AgentDeps) -> list[dict[str, Any]]:
    """The system prompt, the recent turns, then the question with its sources."""
    system = deps.prompts.render(
        "agent/system.j2",
        assistant_name=deps.settings.assistant_name,
        today=date.today().isoformat(),
        summary=state.summary,
    )
    question = deps.prompts.render(
        "agent/response_synthesis.j2",
        sources=state.sources,
        query=state.query,
        tool_errors=state.tool_errors,
    )
    return [
        {"role": "system", "content": system},
        *({"role": t["role"], "content": t["content"]} for t in state.context),
        {"role": "user", "content": question},
    ]


def _extractive(state: State, runtime: AgentRuntime) -> Done:
    """The answer without a model: the best sources quoted, each line sent as a token."""
    deps = runtime.context.deps
    shown = sorted(state.sources, key=lambda s: -s.score)[: deps.settings.extractive_sources]
    shown.sort(key=lambda s: s.index)
    answer = deps.prompts.render(
        "agent/extractive_answer.j2",
        sources=shown,
        greeting=state.intent is Intent.GREETING,
        web=deps.registry.get_tool_by_name("web_search") is not None,
    )
    for line in answer.splitlines(keepends=True):
        emit(runtime, TokenDelta(line))
    # The template prints each shown passage's [n] marker, so persist cites exactly those.
    mode = AnswerMode.EXTRACTIVE
    return Done({"answer": answer, "mode": mode, "finish_reason": "stop"}, mode.value)


@step(Step.PERSIST)
async def persist(state: State, runtime: AgentRuntime) -> Done:
    """Store the question and the answer together; announce citations, usage, the end."""
    ctx = runtime.context
    citations = cited(state.answer, state.sources)
    question = Message(
        id=ctx.user_message_id, role="user", content=state.query, citations=[], tool_calls=[]
    )
    reply = _reply(state, ctx, citations)
    siblings = await ctx.deps.store.save_run(
        ctx.principal,
        conversation_id=ctx.conversation_id,
        title=ctx.new_title,
        parent_id=ctx.parent_message_id,
        question=question,
        answer=reply,
        question_stored=ctx.question_stored,
    )
    for source in citations:
        emit(runtime, CitationAdded(source))
    emit(runtime, UsageReported(reply.prompt_tokens, reply.completion_tokens))
    return Done({}, after=(RunCompleted(reply, state.finish_reason, siblings),))


def _reply(state: State, ctx: RunContext, citations: list[Source]) -> Message:
    """The assistant's message: the answer, what it cites, the calls and tokens it took."""
    generated = state.mode is AnswerMode.GENERATED
    return Message(
        id=ctx.assistant_message_id,
        role="assistant",
        content=state.answer,
        citations=[citation_record(s) for s in citations],
        tool_calls=state.tool_calls,
        prompt_tokens=sum(c.prompt_tokens for c in state.llm_calls),
        completion_tokens=sum(c.completion_tokens for c in state.llm_calls),
        model=ctx.deps.llm.model if generated and ctx.deps.llm else None,
        mode=state.mode.value,
        latency_ms=int((time.perf_counter() - ctx.started) * 1000),
    )


def build_graph() -> CompiledStateGraph[State, RunContext, InputState, State]:
    """The workflow, compiled (once, at start-up)."""
    graph = StateGraph(State, context_schema=RunContext, input_schema=InputState)
    graph.add_node("classify_intent", classify_intent)
    graph.add_node("load_context", load_context)
    graph.add_node("select_tools", select_tools)
    graph.add_node("execute_tools", execute_tools)
    graph.add_node("synthesize", synthesize)
    graph.add_node("persist", persist)
    graph.add_edge(START, "classify_intent")
    graph.add_edge("classify_intent", "load_context")
    graph.add_edge("load_context", "select_tools")
    graph.add_conditional_edges(
        "select_tools", route_after_selection, ["execute_tools", "synthesize"]
    )
    graph.add_edge("execute_tools", "synthesize")
    graph.add_edge("synthesize", "persist")
    graph.add_edge("persist", END)
    return graph.compile()
