"""A2A tasks: the agent's runs as another agent sees them (issue 22).

A task is a run (its id is the run id) and its context is the run's conversation. While the
run runs, the run log (issue 15) holds its events: streams follow them there. Its row in
`a2a_tasks` holds what the task is once the log forgets it: a recorder, started with the
run in this process, writes how the run ended and its answer.
"""

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.agent.a2a_task_models import A2aTask
from services.agent.events import RunCompleted, RunStarted
from services.agent.run_log import RunCancelled, RunRecord, RunStopped
from services.agent.service import AgentService, Ask
from services.auth.principal import Principal
from services.db import utcnow
from services.errors import FailedPrecondition, InvalidArgument, NotFound
from services.pagination import decode_cursor, page_size, split_page

logger = logging.getLogger("agentmesh.agent.a2a")

# How long CancelTask waits for the run to end, so that it can answer with the task
# CANCELED; a run on another replica ends within the run log's cancel poll.
CANCEL_WAIT_SECONDS = 5.0


class TaskState(enum.StrEnum):
    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self is not TaskState.WORKING


class TaskNotFound(NotFound):
    """No such task, or another user's (their tasks are not disclosed). The reason is
    A2A's, so an A2A client recognises it."""

    reason = "TASK_NOT_FOUND"


class TaskNotCancelable(FailedPrecondition):
    reason = "TASK_NOT_CANCELABLE"


class UnsupportedOperation(FailedPrecondition):
    reason = "UNSUPPORTED_OPERATION"


@dataclass(frozen=True)
class TaskView:
    """A task as its owner reads it."""

    id: str
    context_id: str
    state: TaskState
    question: str
    answer: str
    answer_message_id: str
    error: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class TaskPage:
    tasks: list[TaskView]
    next_page_token: str


def _view(row: A2aTask) -> TaskView:
    return TaskView(
        id=row.id.hex,
        context_id=str(row.context_id),
        state=TaskState(row.state),
        question=row.question,
        answer=row.answer,
        answer_message_id=str(row.answer_message_id or ""),
        error=row.error,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def task_id_of(text: str) -> uuid.UUID:
    """A task id from a request (a run id: 32 hexadecimal digits); any other text names no
    task (NOT_FOUND, as A2A says of an unknown id), an empty one is INVALID_ARGUMENT."""
    if not text:
        raise InvalidArgument.of("id", "must name a task (32 hexadecimal digits)")
    if len(text) != 32 or text.strip("0123456789abcdef"):
        raise TaskNotFound(f"no task {text!r} of yours")
    return uuid.UUID(hex=text)


def _ending(record: RunRecord) -> dict[str, object]:
    """The columns a run's last record sets."""
    match record.event:
        case RunCompleted(message=message):
            return {
                "state": TaskState.COMPLETED.value,
                "answer": message.content,
                "answer_message_id": message.id,
            }
        case RunStopped(error=RunCancelled() as error):
            return {"state": TaskState.CANCELED.value, "error": error.message}
        case RunStopped(error=error):
            return {"state": TaskState.FAILED.value, "error": error.message}
    raise ValueError(f"not a last record: {record!r}")


class A2aTasks:
    """Starts, reads, lists and cancels a caller's tasks over the agent's runs."""

    def __init__(self, agent: AgentService, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._agent = agent
        self._sessions = sessions
        self._recorders: dict[str, asyncio.Task[None]] = {}

    async def send(
        self, principal: Principal, text: str, context_id: str, *, request_id: str = ""
    ) -> TaskView:
        """Start a run on `text` in the conversation `context_id` (a new one when empty)
        and keep its task; refusals (the question, the conversation, quotas) raise here."""
        if not text.strip():
            raise InvalidArgument.of("message.parts", "must hold text")
        ask = Ask(query=text, conversation_id=context_id)
        run_id = await self._agent.start(principal, ask, request_id=request_id)
        # The run's first record names its conversation (a new one has no id before it).
        records = self._agent.attach(principal, run_id)
        async with contextlib.aclosing(records):  # type: ignore[type-var]
            first = await anext(records)
        started = first.event if isinstance(first.event, RunStarted) else None
        row = A2aTask(
            id=uuid.UUID(hex=run_id),
            user_id=principal.user_id,
            context_id=uuid.UUID(started.conversation_id) if started else uuid.uuid4(),
            state=TaskState.WORKING.value,
            question=text,
            answer="",
            error="",
        )
        async with self._sessions.begin() as s:
            s.add(row)
        self._recorders[run_id] = asyncio.create_task(
            self._record(principal, run_id), name=f"a2a-task-{run_id}"
        )
        return _view(row)

    async def _record(self, principal: Principal, run_id: str) -> None:
        """Follow the run to its end and write how it ended into its task."""
        try:
            async for record in self._agent.attach(principal, run_id):
                if record.last:
                    async with self._sessions.begin() as s:
                        await s.execute(
                            update(A2aTask)
                            .where(A2aTask.id == uuid.UUID(hex=run_id))
                            .values(**_ending(record), updated_at=utcnow())
                        )
        except Exception:  # the row stays WORKING; the run's own log has the rest
            logger.warning("recording the end of A2A task %s failed", run_id, exc_info=True)
        finally:
            self._recorders.pop(run_id, None)

    async def get(self, principal: Principal, task_id: str) -> TaskView:
        """The caller's task (NOT_FOUND when it is not theirs)."""
        async with self._sessions() as s:
            row = await s.get(A2aTask, task_id_of(task_id))
        if row is None or row.user_id != principal.user_id:
            raise TaskNotFound(f"no task {task_id!r} of yours")
        return _view(row)

    async def wait(self, principal: Principal, task_id: str) -> TaskView:
        """The caller's task once its run has ended."""
        task = await self.get(principal, task_id)
        if task.state.terminal:
            return task
        async for _ in self.follow(principal, task_id):
            pass
        return await self.get(principal, task_id)

    async def list(
        self,
        principal: Principal,
        *,
        context_id: str,
        state: TaskState | None,
        size: int,
        token: str,
    ) -> TaskPage:
        """A page of the caller's tasks, newest first, optionally of one context or state."""
        limit = page_size(size, maximum=100)
        cursor = decode_cursor(token)
        statement = (
            select(A2aTask)
            .where(A2aTask.user_id == principal.user_id)
            .order_by(A2aTask.created_at.desc(), A2aTask.id.desc())
            .limit(limit + 1)
        )
        if context_id:
            try:
                statement = statement.where(A2aTask.context_id == uuid.UUID(context_id))
            except ValueError:
                raise InvalidArgument.of("context_id", "must be a context id") from None
        if state is not None:
            statement = statement.where(A2aTask.state == state.value)
        if cursor is not None:
            statement = statement.where(
                or_(
                    A2aTask.created_at < cursor.at,
                    and_(A2aTask.created_at == cursor.at, A2aTask.id < cursor.id),
                )
            )
        async with self._sessions() as s:
            rows = list((await s.scalars(statement)).all())
        page, next_token = split_page(rows, limit)
        return TaskPage([_view(row) for row in page], next_token)

    async def cancel(self, principal: Principal, task_id: str) -> TaskView:
        """Cancel the caller's running task and return it ended (TASK_NOT_CANCELABLE when
        it has already ended)."""
        task = await self.get(principal, task_id)
        if task.state.terminal:
            raise TaskNotCancelable(f"task {task_id} has already ended ({task.state.value})")
        await self._agent.cancel(principal, task_id)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_SECONDS):
                return await self.wait(principal, task_id)
        return await self.get(principal, task_id)

    async def running(self, principal: Principal, task_id: str) -> TaskView:
        """The caller's task while its run runs (UNSUPPORTED_OPERATION once it has ended:
        A2A subscribes only to a task in progress)."""
        task = await self.get(principal, task_id)
        if task.state.terminal:
            raise UnsupportedOperation(f"task {task_id} has ended ({task.state.value})")
        return task

    async def follow(self, principal: Principal, task_id: str) -> AsyncIterator[RunRecord]:
        """The records of the caller's task's run from its start (found with `get` or
        `running`), then each new one until its last, which comes once the task records
        the end: a client that saw it reads the ended task next."""
        async for record in self._agent.attach(principal, task_id):
            if record.last:
                await self._recorded(task_id)
            yield record

    async def _recorded(self, task_id: str) -> None:
        """Wait until this process's recorder (if it runs here) has written the task's end."""
        recorder = self._recorders.get(task_id)
        if recorder is not None:
            await asyncio.shield(recorder)

    async def stop(self) -> None:
        """Let the recorders write the ends of the runs (at shutdown, after the agent has
        stopped its runs)."""
        await asyncio.gather(*self._recorders.values(), return_exceptions=True)
