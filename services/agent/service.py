"""AgentService: runs the agent graph for a caller and keeps their conversations."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import cast

from services.agent.accounting import RunAccount, record_refused
from services.agent.context import AgentDeps, RunContext
from services.agent.conversations import (
    Branch,
    ConversationDetail,
    ConversationPage,
    conversation_id_of,
)
from services.agent.events import Event, RunCompleted, RunStarted
from services.agent.graph import build_graph
from services.agent.intents import IntentExamples
from services.agent.llm import ChatModel
from services.agent.prompts import PromptManager
from services.agent.run_log import (
    InProcessRunLog,
    RunCancelled,
    RunRecord,
    RunStopped,
    run_id_of,
)
from services.agent.run_slots import InProcessRunSlots
from services.agent.runs import RunManager
from services.agent.state import InputState, Turn
from services.agent.text import clean_query, title_from
from services.agent.tracing import NoopTracer, Tracer
from services.auth.principal import Principal
from services.db import new_id, require_uuid
from services.errors import InvalidArgument, ResourceExhausted

# How long the in-process run log keeps an ended run when none is given.
DEFAULT_RUN_LOG_TTL_SECONDS = 600.0


@dataclass(frozen=True)
class Ask:
    """What a caller asks a run for, as the request says it (checked by `start`)."""

    query: str
    """The question; empty with `regenerate_message_id`."""
    conversation_id: str = ""
    """The conversation to continue; empty starts one. The question follows its active
    leaf, unless one of the two below says where it goes."""
    edit_message_id: str = ""
    """A question to replace: the new one is stored beside it (a sibling)."""
    regenerate_message_id: str = ""
    """An answer to produce again: its question is answered anew, beside it."""


@dataclass(frozen=True)
class Placed:
    """A run's question and where it goes."""

    conversation_id: uuid.UUID
    title: str | None
    """The title of the conversation the run creates; None when it continues one."""
    question: str
    branch: Branch

    @property
    def history(self) -> list[Turn]:
        return [Turn(role=m.role, content=m.content) for m in self.branch.history]


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
    """The agent's runs (each one pass through the compiled graph, run in the background by
    `runs`, which keeps their events in its run log) and the caller's conversations; built
    with every dependency it needs (see `use_llm` for the one late one)."""

    def __init__(
        self, deps: AgentDeps, tracer: Tracer | None = None, runs: RunManager | None = None
    ) -> None:
        self._deps = deps
        self._tracer: Tracer = tracer or NoopTracer()
        self._graph = build_graph()  # compiled once, shared by every run
        self._runs = runs or RunManager(
            InProcessRunLog(DEFAULT_RUN_LOG_TTL_SECONDS), InProcessRunSlots()
        )

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
        """Interrupt the runs still running here (their streams end RUN_INTERRUPTED), close
        the LLM client and flush the tracer (at shutdown, once the RPCs are drained)."""
        await self._runs.stop()
        if self._deps.llm is not None:
            await self._deps.llm.close()
        # Flushing may wait on an unreachable Langfuse: not on the event loop.
        await asyncio.to_thread(self._tracer.close)

    def reload_prompts(self) -> None:
        """Re-read every prompt file (SIGHUP)."""
        self._deps.prompts.reload()

    async def start(self, principal: Principal, ask: Ask, *, request_id: str = "") -> str:
        """Admit a run and start it in the background; its id. The run belongs to this
        service, not to the caller: follow it with `attach`, stop it with `cancel`. Nothing
        is stored unless it completes. Refusals (the question, the conversation, quotas, the
        concurrent-run cap) raise here, before any event."""
        placed = await self._place(principal, ask)
        run_id = uuid.uuid4().hex
        await self._runs.admit(principal.user_id, run_id, self._deps.settings.max_runs_per_user)
        try:
            try:
                await self._deps.quotas.admit_query(principal)
            except ResourceExhausted as refusal:
                record_refused(self._deps, principal, refusal)
                raise
            await self._runs.open(run_id, principal.user_id)
        except BaseException:
            await self._runs.release(principal.user_id, run_id)
            raise
        context = self._new_run(run_id, principal, placed, request_id)
        given = InputState(query=placed.question, history=placed.history)
        self._runs.launch(run_id, self._run(context, given))
        return run_id

    async def _place(self, principal: Principal, ask: Ask) -> Placed:
        """The run's question and where it goes in the tree (INVALID_ARGUMENT, NOT_FOUND)."""
        settings = self._deps.settings
        query, conversation_id = ask.query, ask.conversation_id
        edit, regenerate = ask.edit_message_id, ask.regenerate_message_id
        if edit and regenerate:
            raise InvalidArgument.of("regenerate_message_id", "cannot go with edit_message_id")
        if (edit or regenerate) and not conversation_id:
            named = "edit_message_id" if edit else "regenerate_message_id"
            raise InvalidArgument.of("conversation_id", f"is required with {named}")
        if regenerate and query:
            raise InvalidArgument.of("query", "must be empty with regenerate_message_id")
        question = "" if regenerate else clean_query(query, max_chars=settings.max_query_chars)
        if not conversation_id:
            return Placed(new_id(), title_from(question), question, Branch(None))
        cid = conversation_id_of(conversation_id)
        branch = await self._deps.store.branch(
            principal,
            cid,
            settings.context_messages,
            edit=require_uuid(edit, field="edit_message_id") if edit else None,
            regenerate=(
                require_uuid(regenerate, field="regenerate_message_id") if regenerate else None
            ),
        )
        if branch.question is not None:
            question = branch.question.content
        return Placed(cid, None, question, branch)

    def attach(
        self, principal: Principal, run_id: str, after_seq: int = 0
    ) -> AsyncIterator[RunRecord]:
        """The caller's run's records after `after_seq`, then each new one until its last
        (RunCompleted, or RunStopped with the error its streams end with); RunNotFound when
        no such run of the caller's is kept."""
        if after_seq < 0:
            raise InvalidArgument.of("after_seq", "must not be negative")
        return self._runs.follow(run_id_of(run_id), principal.user_id, after_seq)

    async def cancel(self, principal: Principal, run_id: str) -> None:
        """Stop the caller's run wherever it runs (nothing when it already ended)."""
        await self._runs.cancel(run_id_of(run_id), principal.user_id)

    def _new_run(
        self, run_id: str, principal: Principal, placed: Placed, request_id: str
    ) -> RunContext:
        """The context of a new run, with its trace opened."""
        stored = placed.branch.question
        return RunContext(
            deps=self._deps,
            principal=principal,
            run_id=run_id,
            conversation_id=placed.conversation_id,
            new_title=placed.title,
            user_message_id=stored.id if stored is not None else new_id(),
            question_stored=stored is not None,
            parent_message_id=placed.branch.parent_id,
            assistant_message_id=new_id(),
            started=time.perf_counter(),
            trace=self._tracer.start_run(
                run_id=run_id,
                request_id=request_id,
                user_id=str(principal.user_id),
                conversation_id=str(placed.conversation_id),
                query=placed.question,
            ),
        )

    async def _run(self, context: RunContext, given: InputState) -> AsyncIterator[Event]:
        """Stream the graph's events within the run's time budget; the account records how
        the run ended."""
        account = RunAccount(context)
        yield _run_started(context)
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
                    yield cast(Event, event)
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

    async def query(self, principal: Principal, ask: Ask, *, request_id: str = "") -> QueryResult:
        """Run the agent to the end and return the stored answer. Its caller learns the run
        id only at the end, so the run lasts as long as the call: a caller that goes away
        cancels it."""
        run_id = await self.start(principal, ask, request_id=request_id)
        started, completed, ended = None, None, False
        try:
            async for record in self._runs.follow(run_id, principal.user_id, 0):
                ended = record.last
                match record.event:
                    case RunStarted() as event:
                        started = event
                    case RunCompleted() as event:
                        completed = event
                    case RunStopped(error=error):
                        raise error.with_traceback(None)
        finally:
            if not ended:
                self._runs.stop_run(run_id, RunCancelled("the caller went away"))
        assert started is not None and completed is not None
        return QueryResult(run_id, started, completed)

    async def list_conversations(
        self, principal: Principal, page_size: int, page_token: str, query: str = ""
    ) -> ConversationPage:
        return await self._deps.store.list(principal, page_size, page_token, query)

    async def get_conversation(
        self, principal: Principal, conversation_id: str
    ) -> ConversationDetail:
        return await self._deps.store.get(principal, conversation_id_of(conversation_id))

    async def delete_conversation(self, principal: Principal, conversation_id: str) -> None:
        await self._deps.store.delete(principal, conversation_id_of(conversation_id))

    async def switch_branch(
        self, principal: Principal, conversation_id: str, message_id: str
    ) -> ConversationDetail:
        return await self._deps.store.switch_branch(
            principal,
            conversation_id_of(conversation_id),
            require_uuid(message_id, field="message_id"),
        )
