"""The agent workflow: one LangGraph StateGraph, compiled once at start-up.

classify_intent → load_context → select_tools → [execute_tools] → synthesize → persist

Nodes get their dependencies from the runtime context (`RunContext`) and report progress
with the runtime's stream writer; the service turns what they write into stream events.
"""

import asyncio
import logging
import time
from datetime import date
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime

from services.agent.answers import citation_record, cited
from services.agent.context import RunContext
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
from services.agent.llm import LlmCall, LlmUnavailable
from services.agent.models import Message
from services.agent.planning import RejectedCall, default_calls, vet_calls
from services.agent.state import AgentState, PlannedCall, Turn
from services.agent.tools.base import Source, ToolCallContext, ToolFailed, ToolResult
from services.errors import DomainError

log = logging.getLogger("agentmesh.agent")
Ctx = Runtime[RunContext]
INTENT_SCHEMA_NAME = "agent/intent_classification.j2"


def _emit(runtime: Ctx, event: object) -> None:
    runtime.stream_writer(event)


def _tokens(text: str) -> int:
    # A model-independent estimate (about 4 characters per token for English text).
    return len(text) // 4 + 1


def _fall_back(runtime: Ctx, error: LlmUnavailable) -> None:
    """Continue without the LLM when the settings allow it; otherwise fail the run."""
    if not runtime.context.deps.settings.fallback_extractive:
        raise error
    log.warning("LLM unavailable, answering extractively: %s", error.message)


async def classify_intent(state: AgentState, runtime: Ctx) -> dict[str, Any]:
    deps = runtime.context.deps
    _emit(runtime, StepChanged(Step.CLASSIFY_INTENT, StepStatus.STARTED))
    assert deps.intents is not None
    guess = await deps.intents.guess(deps.embedder, state["query"])
    intent, how = guess.intent, "embedding"
    calls: list[LlmCall] = []
    llm_down = False
    if deps.llm is not None and guess.confidence < deps.settings.intent_confidence:
        names = [info.name for info in deps.intents.infos]
        prompt = deps.prompts.render(
            INTENT_SCHEMA_NAME,
            intents=deps.intents.infos,
            examples=[
                {"question": example, "answer": f'{{"intent": "{info.name}"}}'}
                for info in deps.intents.infos
                for example in info.examples[:2]
            ],
            history=state["history"][-4:],
            query=state["query"],
        )
        schema = {
            "type": "object",
            "properties": {"intent": {"type": "string", "enum": names}},
            "required": ["intent"],
            "additionalProperties": False,
        }
        try:
            value, call = await deps.llm.structured(
                INTENT_SCHEMA_NAME, [{"role": "user", "content": prompt}], schema
            )
            runtime.context.trace.generation(call)
            calls.append(call)
            if value is not None and value.get("intent") in names:
                intent, how = Intent(value["intent"]), "llm"
        except LlmUnavailable as error:
            _fall_back(runtime, error)
            llm_down = True
    if intent is Intent.FOLLOW_UP and not state["history"]:
        intent = Intent.GENERAL  # nothing earlier to follow up on
    _emit(
        runtime,
        StepChanged(
            Step.CLASSIFY_INTENT,
            StepStatus.COMPLETED,
            detail=f"{intent.value} ({how}, similarity {guess.confidence:.2f})",
            intent=intent.value,
        ),
    )
    return {"intent": intent.value, "llm_calls": calls, "llm_down": llm_down}


async def load_context(state: AgentState, runtime: Ctx) -> dict[str, Any]:
    deps = runtime.context.deps
    history = state["history"]
    if not history:
        _emit(runtime, StepChanged(Step.LOAD_CONTEXT, StepStatus.SKIPPED, "new conversation"))
        return {"context": [], "summary": ""}
    _emit(runtime, StepChanged(Step.LOAD_CONTEXT, StepStatus.STARTED))
    budget, kept = deps.settings.context_token_budget, 0
    split = len(history)
    while split > 0 and kept + _tokens(history[split - 1]["content"]) <= budget:
        kept += _tokens(history[split - 1]["content"])
        split -= 1
    older, recent = history[:split], history[split:]
    summary, calls = "", list[LlmCall]()
    if older:
        summary, calls = await _summarize(older, state, runtime)
    _emit(
        runtime,
        StepChanged(
            Step.LOAD_CONTEXT,
            StepStatus.COMPLETED,
            f"{len(recent)} messages verbatim, {len(older)} summarized",
        ),
    )
    return {"context": recent, "summary": summary, "llm_calls": calls}


async def _summarize(
    turns: list[Turn], state: AgentState, runtime: Ctx
) -> tuple[str, list[LlmCall]]:
    deps = runtime.context.deps
    if deps.llm is not None and not state.get("llm_down"):
        name = "agent/conversation_summary.j2"
        prompt = deps.prompts.render(name, turns=turns, max_words=deps.settings.summary_words)
        try:
            text, call = await deps.llm.complete(
                name,
                [{"role": "user", "content": prompt}],
                max_tokens=deps.settings.summary_words * 2,
            )
            runtime.context.trace.generation(call)
            return text, [call]
        except LlmUnavailable as error:
            _fall_back(runtime, error)
    # Without a model: the start of each older turn.
    return "\n".join(f"{t['role']}: {t['content'][:200]}" for t in turns[-20:]), []


async def select_tools(state: AgentState, runtime: Ctx) -> dict[str, Any]:
    ctx = runtime.context
    deps = ctx.deps
    allowed = deps.registry.tools_for(Intent(state["intent"]), ctx.principal.role)
    if not allowed:
        _emit(runtime, StepChanged(Step.SELECT_TOOLS, StepStatus.SKIPPED, "no tools needed"))
        return {"planned": []}
    _emit(runtime, StepChanged(Step.SELECT_TOOLS, StepStatus.STARTED))
    planned: list[PlannedCall] = default_calls(allowed, state["query"], 1)
    calls: list[LlmCall] = []
    records: list[dict[str, Any]] = []
    llm_down = bool(state.get("llm_down"))
    if deps.llm is not None and not llm_down:
        name = "agent/tool_selection.j2"
        prompt = deps.prompts.render(
            name,
            tools=[{"name": t.name, "guidance": deps.registry.description(t)} for t in allowed],
            history=state["context"][-6:],
            query=state["query"],
        )
        try:
            raw, call = await deps.llm.tool_calls(
                name,
                [{"role": "user", "content": prompt}],
                deps.registry.openai_specs(allowed, ctx.principal),
            )
            ctx.trace.generation(call)
            calls.append(call)
            if raw:  # a model that calls nothing gets the router's default calls
                planned, rejected = vet_calls(raw, allowed, 1)
                records = [_report_rejected(runtime, r) for r in rejected]
        except LlmUnavailable as error:
            _fall_back(runtime, error)
            llm_down = True
    names = ", ".join(p.tool.name for p in planned) or "none"
    _emit(runtime, StepChanged(Step.SELECT_TOOLS, StepStatus.COMPLETED, names))
    if not planned:
        _emit(runtime, StepChanged(Step.EXECUTE_TOOLS, StepStatus.SKIPPED, "no valid tool calls"))
    return {"planned": planned, "llm_calls": calls, "tool_calls": records, "llm_down": llm_down}


def _report_rejected(runtime: Ctx, rejected: RejectedCall) -> dict[str, Any]:
    """Announce a refused call as started and ended (it never ran); its stored record."""
    r, outcome = rejected, ToolOutcome.INVALID_ARGUMENTS
    deps = runtime.context.deps
    # The model may name a tool that does not exist: such names are not a metrics label.
    known = r.tool_name if deps.registry.get_tool_by_name(r.tool_name) else "unknown"
    deps.metrics.tool_calls.labels(known, outcome.value).inc()
    _emit(runtime, ToolCallStarted(r.call_id, r.tool_name, r.arguments_json))
    _emit(runtime, ToolCallFinished(r.call_id, r.tool_name, outcome, "", [], r.error, 0))
    return _tool_record(r.call_id, r.tool_name, r.arguments_json, outcome, r.error, 0)


def _tool_record(
    call_id: str, name: str, arguments: str, outcome: ToolOutcome, error: str, latency_ms: int
) -> dict[str, Any]:
    return {
        "tool_call_id": call_id,
        "name": name,
        "arguments_json": arguments,
        "outcome": outcome.value,
        "error_message": error,
        "latency_ms": latency_ms,
    }


def route_after_selection(state: AgentState) -> str:
    return "execute_tools" if state["planned"] else "synthesize"


async def execute_tools(state: AgentState, runtime: Ctx) -> dict[str, Any]:
    ctx = runtime.context
    _emit(runtime, StepChanged(Step.EXECUTE_TOOLS, StepStatus.STARTED))
    sources: list[Source] = []
    errors: list[str] = []
    records: list[dict[str, Any]] = []

    async def run(call: PlannedCall) -> None:
        _emit(runtime, ToolCallStarted(call.call_id, call.tool.name, call.arguments_json))
        started = time.perf_counter()
        result: ToolResult | None = None
        outcome, error = ToolOutcome.OK, ""
        try:
            async with asyncio.timeout(ctx.deps.settings.tool_timeout):
                result = await call.tool.execute(call.args, ToolCallContext(ctx.principal))
        except TimeoutError:
            outcome, error = ToolOutcome.TIMEOUT, "the tool did not finish in time"
        except (ToolFailed, DomainError) as failure:
            outcome, error = ToolOutcome.ERROR, str(failure)
        except Exception:
            log.exception("tool %s failed", call.tool.name)
            outcome, error = ToolOutcome.ERROR, "the tool failed unexpectedly"
        latency = int((time.perf_counter() - started) * 1000)
        found = result.sources if result else []
        for source in found:  # numbered in the order results arrive
            sources.append(source)
            source.index = len(sources)
        if result is not None and result.retrieval is not None:
            _emit(
                runtime,
                RetrievalDone(call.args.model_dump().get("query", ""), result.retrieval),
            )
        summary = result.summary if result else ""
        _emit(
            runtime,
            ToolCallFinished(call.call_id, call.tool.name, outcome, summary, found, error, latency),
        )
        if outcome is not ToolOutcome.OK:
            errors.append(call.tool.name)
        records.append(
            _tool_record(call.call_id, call.tool.name, call.arguments_json, outcome, error, latency)
        )
        ctx.deps.metrics.tool_calls.labels(call.tool.name, outcome.value).inc()
        ctx.deps.metrics.tool_call_seconds.labels(call.tool.name).observe(latency / 1000)
        ctx.trace.tool(
            name=call.tool.name,
            arguments=call.arguments_json,
            outcome=outcome.value,
            latency_ms=latency,
            summary=summary,
            error=error,
        )

    await asyncio.gather(*(run(call) for call in state["planned"]))
    _emit(runtime, StepChanged(Step.EXECUTE_TOOLS, StepStatus.COMPLETED, f"{len(sources)} sources"))
    return {"sources": sources, "tool_errors": errors, "tool_calls": records}


async def synthesize(state: AgentState, runtime: Ctx) -> dict[str, Any]:
    ctx = runtime.context
    deps = ctx.deps
    _emit(runtime, StepChanged(Step.SYNTHESIZE, StepStatus.STARTED))
    sources = state.get("sources", [])
    if deps.llm is not None and not state.get("llm_down"):
        name = "agent/response_synthesis.j2"
        messages: list[dict[str, Any]] = [
            {
                "role": "system",
                "content": deps.prompts.render(
                    "agent/system.j2",
                    assistant_name=deps.settings.assistant_name,
                    today=date.today().isoformat(),
                    summary=state.get("summary", ""),
                ),
            },
            *({"role": t["role"], "content": t["content"]} for t in state.get("context", [])),
            {
                "role": "user",
                "content": deps.prompts.render(
                    name,
                    sources=sources,
                    query=state["query"],
                    tool_errors=state.get("tool_errors", []),
                ),
            },
        ]
        call = LlmCall(name, deps.llm.model)
        answer = ""
        try:
            async for delta in deps.llm.stream(name, messages, call):
                answer += delta
                _emit(runtime, TokenDelta(delta))
        except LlmUnavailable as error:
            if answer:  # half an answer was already sent: the run fails
                raise
            _fall_back(runtime, error)
        else:
            ctx.trace.generation(call)
            _emit(
                runtime,
                StepChanged(Step.SYNTHESIZE, StepStatus.COMPLETED, AnswerMode.GENERATED.value),
            )
            return {
                "answer": answer,
                "mode": AnswerMode.GENERATED.value,
                "finish_reason": call.finish_reason or "stop",
                "llm_calls": [call],
            }
    return _extractive(state, runtime, sources)


def _extractive(state: AgentState, runtime: Ctx, sources: list[Source]) -> dict[str, Any]:
    deps = runtime.context.deps
    shown = sorted(sources, key=lambda s: -s.score)[: deps.settings.extractive_sources]
    shown.sort(key=lambda s: s.index)
    answer = deps.prompts.render(
        "agent/extractive_answer.j2",
        sources=shown,
        greeting=state["intent"] == Intent.GREETING.value,
        web=deps.registry.get_tool_by_name("web_search") is not None,
    )
    for line in answer.splitlines(keepends=True):
        _emit(runtime, TokenDelta(line))
    _emit(runtime, StepChanged(Step.SYNTHESIZE, StepStatus.COMPLETED, AnswerMode.EXTRACTIVE.value))
    # The template prints each shown passage's [n] marker, so persist cites exactly those.
    return {"answer": answer, "mode": AnswerMode.EXTRACTIVE.value, "finish_reason": "stop"}


async def persist(state: AgentState, runtime: Ctx) -> dict[str, Any]:
    ctx = runtime.context
    _emit(runtime, StepChanged(Step.PERSIST, StepStatus.STARTED))
    answer = state["answer"]
    citations = cited(answer, state.get("sources", []))
    calls = state.get("llm_calls", [])
    prompt_tokens = sum(c.prompt_tokens for c in calls)
    completion_tokens = sum(c.completion_tokens for c in calls)
    generated = state["mode"] == AnswerMode.GENERATED.value
    question = Message(
        id=ctx.user_message_id, role="user", content=state["query"], citations=[], tool_calls=[]
    )
    reply = Message(
        id=ctx.assistant_message_id,
        role="assistant",
        content=answer,
        citations=[citation_record(s) for s in citations],
        tool_calls=state.get("tool_calls", []),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        model=ctx.deps.llm.model if generated and ctx.deps.llm else None,
        mode=state["mode"],
        latency_ms=int((time.perf_counter() - ctx.started) * 1000),
    )
    await ctx.deps.store.save_run(
        ctx.principal,
        conversation_id=ctx.conversation_id,
        title=ctx.new_title,
        question=question,
        answer=reply,
    )
    for source in citations:
        _emit(runtime, CitationAdded(source))
    _emit(runtime, UsageReported(prompt_tokens, completion_tokens))
    _emit(runtime, StepChanged(Step.PERSIST, StepStatus.COMPLETED))
    _emit(runtime, RunCompleted(reply, state.get("finish_reason", "stop")))
    ctx.trace.end(answer=answer, intent=state["intent"], error=None)
    return {}


def build_graph() -> CompiledStateGraph[AgentState, RunContext, AgentState, AgentState]:
    """The workflow, compiled (once, at start-up)."""
    graph = StateGraph(AgentState, context_schema=RunContext)
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
