"""AgentService: runs the agent graph for a caller and keeps their conversations."""

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import cast

from services.agent.context import AgentDeps, RunContext
from services.agent.conversations import (
    ConversationDetail,
    ConversationPage,
    conversation_id_of,
)
from services.agent.events import Event, RunCompleted, RunStarted, StepChanged, TokenDelta
from services.agent.graph import build_graph
from services.agent.intents import IntentExamples
from services.agent.state import AgentState, Turn
from services.agent.text import clean_query, title_from
from services.agent.tracing import NoopTracer, Tracer
from services.analytics.recorder import EventKind
from services.auth.principal import Principal
from services.db import new_id
from services.errors import DomainError, QuotaViolation, ResourceExhausted


@dataclass(frozen=True)
class QueryResult:
    run_id: str
    started: RunStarted
    completed: RunCompleted


class AgentService:
    def __init__(self, deps: AgentDeps, tracer: Tracer | None = None) -> None:
        self._deps = deps
        self._tracer: Tracer = tracer or NoopTracer()
        self._graph = build_graph()  # compiled once, shared by every run
        self._running: Counter[uuid.UUID] = Counter()  # runs in flight per user

    @property
    def deps(self) -> AgentDeps:
        return self._deps

    async def start(self) -> None:
        """Embed the intent examples (needs the embedding model's workers running)."""
        self._deps.intents = await IntentExamples.load(self._deps.prompts, self._deps.embedder)

    async def stop(self) -> None:
        if self._deps.llm is not None:
            await self._deps.llm.close()
        # Flushing may wait on an unreachable Langfuse: not on the event loop.
        await asyncio.to_thread(self._tracer.close)

    def reload_prompts(self) -> None:
        """Re-read every prompt file (SIGHUP)."""
        self._deps.prompts.reload()

    async def run(
        self, principal: Principal, query: str, conversation_id: str, *, request_id: str = ""
    ) -> AsyncIterator[tuple[str, Event]]:
        """Run the agent, yielding (run id, event) from RunStarted to RunCompleted. Nothing is
        stored unless the run completes; errors propagate as DomainErrors."""
        settings = self._deps.settings
        question = clean_query(query, max_chars=settings.max_query_chars)
        if conversation_id:
            cid = conversation_id_of(conversation_id)
            rows = await self._deps.store.recent_messages(principal, cid, settings.context_messages)
            history = [Turn(role=m.role, content=m.content) for m in rows]
            title = None
        else:
            cid, history, title = new_id(), [], title_from(question)
        with self._admitted(principal):
            try:
                await self._deps.quotas.admit_query(principal)
            except ResourceExhausted as error:
                self._deps.events.record(
                    EventKind.QUOTA_REFUSED,
                    user_id=principal.user_id,
                    code=error.reason,
                    data=error.metadata,  # which quota: metric and period
                )
                self._deps.metrics.agent_queries.labels("unknown", "refused").inc()
                raise
            async for item in self._run(principal, question, cid, history, title, request_id):
                yield item

    async def _run(
        self,
        principal: Principal,
        question: str,
        cid: uuid.UUID,
        history: list[Turn],
        title: str | None,
        request_id: str,
    ) -> AsyncIterator[tuple[str, Event]]:
        run_id = uuid.uuid4().hex
        context = RunContext(
            deps=self._deps,
            principal=principal,
            run_id=run_id,
            conversation_id=cid,
            new_title=title,
            user_message_id=new_id(),
            assistant_message_id=new_id(),
            started=time.perf_counter(),
            trace=self._tracer.start_run(
                run_id=run_id,
                request_id=request_id,
                user_id=str(principal.user_id),
                conversation_id=str(cid),
                query=question,
            ),
        )
        started = RunStarted(
            conversation_id=str(cid),
            user_message_id=str(context.user_message_id),
            assistant_message_id=str(context.assistant_message_id),
            conversation_created=title is not None,
        )
        yield run_id, started
        state: AgentState = {
            "query": question,
            "history": history,
            "tool_calls": [],
            "llm_calls": [],
        }
        budget = self._deps.settings.run_timeout
        window = asyncio.timeout(budget)
        metrics, intent, first_token = self._deps.metrics, "unknown", True
        try:
            async with window:
                async for event in self._graph.astream(
                    state, context=context, stream_mode="custom"
                ):
                    if isinstance(event, StepChanged) and event.intent:
                        intent = event.intent
                    elif isinstance(event, TokenDelta) and first_token:
                        first_token = False
                        metrics.agent_first_token_seconds.observe(
                            time.perf_counter() - context.started
                        )
                    elif isinstance(event, RunCompleted):
                        self._record_completed(principal, event)
                        self._count_run(context, intent, "ok")
                        message = event.message
                        await self._deps.quotas.add_tokens(
                            principal, message.prompt_tokens + message.completion_tokens
                        )
                    yield run_id, cast(Event, event)
        except TimeoutError:
            if not window.expired():
                raise
            context.trace.end(answer="", intent="", error="run timeout")
            self._record_failed(principal, context, "AGENT_RUN_TIMEOUT")
            self._count_run(context, intent, "timeout")
            raise ResourceExhausted(
                f"the run took longer than its {budget:g} s budget", reason="AGENT_RUN_TIMEOUT"
            ) from None
        except BaseException as error:  # cancellation included: the trace says how it ended
            context.trace.end(answer="", intent="", error=type(error).__name__)
            reason = error.reason if isinstance(error, DomainError) else type(error).__name__
            self._record_failed(principal, context, reason)
            cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit)
            self._count_run(context, intent, "cancelled" if cancelled else "error")
            raise

    def _count_run(self, context: RunContext, intent: str, outcome: str) -> None:
        metrics = self._deps.metrics
        metrics.agent_queries.labels(intent, outcome).inc()
        seconds = time.perf_counter() - context.started
        metrics.agent_run_seconds.labels(outcome).observe(seconds)

    def _record_completed(self, principal: Principal, completed: RunCompleted) -> None:
        """Usage events of a finished run: the query, and each tool call it made."""
        message, events = completed.message, self._deps.events
        for call in message.tool_calls:
            events.record(
                EventKind.TOOL_CALL,
                user_id=principal.user_id,
                tool=call["name"],
                code=call["outcome"],
                latency_ms=call["latency_ms"],
                success=call["outcome"] == "ok",
            )
        events.record(
            EventKind.AGENT_QUERY,
            user_id=principal.user_id,
            model=message.model,
            tokens_in=message.prompt_tokens,
            tokens_out=message.completion_tokens,
            latency_ms=message.latency_ms,
            success=True,
            data={"mode": message.mode, "tools": [c["name"] for c in message.tool_calls]},
        )

    def _record_failed(self, principal: Principal, context: RunContext, reason: str) -> None:
        self._deps.events.record(
            EventKind.AGENT_QUERY,
            user_id=principal.user_id,
            latency_ms=(time.perf_counter() - context.started) * 1000,
            success=False,
            code=reason,
        )

    @contextlib.contextmanager
    def _admitted(self, principal: Principal) -> Iterator[None]:
        """Count a run against the caller's concurrent-run limit while it lasts."""
        limit = self._deps.settings.max_runs_per_user
        if self._running[principal.user_id] >= limit:
            raise ResourceExhausted(
                f"at most {limit} agent runs at a time per user",
                retry_after=1.0,
                violations=[QuotaViolation(f"user:{principal.user_id}", "concurrent agent runs")],
                reason="TOO_MANY_CONCURRENT_RUNS",
            )
        self._running[principal.user_id] += 1
        try:
            yield
        finally:
            self._running[principal.user_id] -= 1
            if not self._running[principal.user_id]:
                del self._running[principal.user_id]

    async def query(
        self, principal: Principal, query: str, conversation_id: str, *, request_id: str = ""
    ) -> QueryResult:
        """Run the agent to the end and return the stored answer."""
        run_id, started, completed = "", None, None
        async for event_run_id, event in self.run(
            principal, query, conversation_id, request_id=request_id
        ):
            run_id = event_run_id
            if isinstance(event, RunStarted):
                started = event
            elif isinstance(event, RunCompleted):
                completed = event
        assert started is not None and completed is not None
        return QueryResult(run_id, started, completed)

    async def list_conversations(
        self, principal: Principal, page_size: int, page_token: str
    ) -> ConversationPage:
        return await self._deps.store.list(principal, page_size, page_token)

    async def get_conversation(
        self, principal: Principal, conversation_id: str
    ) -> ConversationDetail:
        return await self._deps.store.get(principal, conversation_id_of(conversation_id))

    async def delete_conversation(self, principal: Principal, conversation_id: str) -> None:
        await self._deps.store.delete(principal, conversation_id_of(conversation_id))
