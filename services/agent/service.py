"""AgentService: runs the agent graph for a caller and keeps their conversations."""

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from typing import cast

from services.agent.accounting import RunAccount, record_refused
from services.agent.context import AgentDeps, RunContext
from services.agent.conversations import (
    ConversationDetail,
    ConversationPage,
    conversation_id_of,
)
from services.agent.events import Event, RunCompleted, RunStarted
from services.agent.graph import build_graph
from services.agent.intents import IntentExamples
from services.agent.llm import ChatModel
from services.agent.prompts import PromptManager
from services.agent.state import InputState, Turn
from services.agent.text import clean_query, title_from
from services.agent.tracing import NoopTracer, Tracer
from services.auth.principal import Principal
from services.db import new_id
from services.errors import QuotaViolation, ResourceExhausted


@dataclass(frozen=True)
class QueryResult:
    run_id: str
    started: RunStarted
    completed: RunCompleted


def _run_started(context: RunContext) -> RunStarted:
    return RunStarted(
        conversation_id=str(context.conversation_id),
        user_message_id=str(context.user_message_id),
        assistant_message_id=str(context.assistant_message_id),
        conversation_created=context.new_title is not None,
    )


class AgentService:
    """The agent's runs (each one pass through the compiled graph) and the caller's
    conversations; built with every dependency it needs (see `use_llm` for the one late one)."""

    def __init__(self, deps: AgentDeps, tracer: Tracer | None = None) -> None:
        self._deps = deps
        self._tracer: Tracer = tracer or NoopTracer()
        self._graph = build_graph()  # compiled once, shared by every run
        self._running: Counter[uuid.UUID] = Counter()  # runs in flight per user

    @property
    def prompts(self) -> PromptManager:
        """The prompts the agent renders."""
        return self._deps.prompts

    @property
    def intents(self) -> IntentExamples:
        """The embedded intent examples (the fast intent classifier)."""
        return self._deps.intents

    def use_llm(self, llm: ChatModel) -> None:
        """Answer with `llm` from now on. Only for a model served by a sidecar the process
        starts itself (LLM_PROVIDER=local), whose address is known once it runs: call it
        before serving. Every other model is in the deps the service is built with."""
        self._deps = replace(self._deps, llm=llm)

    async def stop(self) -> None:
        """Close the LLM client and flush the tracer (at shutdown)."""
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
            except ResourceExhausted as refusal:
                record_refused(self._deps, principal, refusal)
                raise
            context = self._new_run(principal, question, cid, title, request_id)
            async for item in self._run(context, InputState(query=question, history=history)):
                yield item

    def _new_run(
        self,
        principal: Principal,
        question: str,
        cid: uuid.UUID,
        title: str | None,
        request_id: str,
    ) -> RunContext:
        """The context of a new run, with its trace opened."""
        run_id = uuid.uuid4().hex
        return RunContext(
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

    async def _run(
        self, context: RunContext, given: InputState
    ) -> AsyncIterator[tuple[str, Event]]:
        """Stream the graph's events within the run's time budget; the account records how
        the run ended."""
        account = RunAccount(context)
        yield context.run_id, _run_started(context)
        budget = self._deps.settings.run_timeout
        window = asyncio.timeout(budget)
        try:
            async with window:
                async for event in self._graph.astream(
                    given, context=context, stream_mode="custom"
                ):
                    if isinstance(event, RunCompleted):
                        await account.completed(event.message)
                    else:
                        account.progress(event)
                    yield context.run_id, cast(Event, event)
        except TimeoutError as error:
            if not window.expired():  # not this run's budget: a failure like any other
                account.failed(error)
                raise
            account.timed_out()
            raise ResourceExhausted(
                f"the run took longer than its {budget:g} s budget", reason="AGENT_RUN_TIMEOUT"
            ) from None
        except BaseException as error:  # cancellation included: the account says how it ended
            if isinstance(error, asyncio.CancelledError | GeneratorExit):
                account.cancelled(error)
            else:
                account.failed(error)
            raise

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
