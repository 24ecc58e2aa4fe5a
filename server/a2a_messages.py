"""A2A's messages (lf.a2a.v1) from the agent's tasks and run records: a task's snapshot, and
the stream of task status and artifact updates a run's records become."""

from collections.abc import AsyncIterator

from a2a.types import a2a_pb2 as a2a
from google.protobuf.timestamp_pb2 import Timestamp

from services.agent.a2a_tasks import TaskState, TaskView
from services.agent.events import RunCompleted, TokenDelta, ToolCallFinished, ToolCallStarted
from services.agent.run_log import RunCancelled, RunRecord, RunStopped

STATE_TO_PROTO = {
    TaskState.WORKING: a2a.TASK_STATE_WORKING,
    TaskState.COMPLETED: a2a.TASK_STATE_COMPLETED,
    TaskState.FAILED: a2a.TASK_STATE_FAILED,
    TaskState.CANCELED: a2a.TASK_STATE_CANCELED,
}
STATE_OF_PROTO = {proto: state for state, proto in STATE_TO_PROTO.items()}
# The one artifact of a task: the answer, streamed in chunks as the model writes it.
ANSWER_ARTIFACT = "answer"


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _agent_message(task_id: str, context_id: str, text: str, message_id: str = "") -> a2a.Message:
    return a2a.Message(
        message_id=message_id or f"{task_id}-status",
        context_id=context_id,
        task_id=task_id,
        role=a2a.ROLE_AGENT,
        parts=[a2a.Part(text=text)],
    )


def _answer(text: str) -> a2a.Artifact:
    return a2a.Artifact(artifact_id=ANSWER_ARTIFACT, name="answer", parts=[a2a.Part(text=text)])


def task_to_proto(task: TaskView, history_length: int | None = None) -> a2a.Task:
    """A task as A2A shows it: its state (with the answer or the error as the status
    message), the answer as its artifact, and the exchange as its history."""
    stamp = Timestamp()
    stamp.FromDatetime(task.updated_at)
    status = a2a.TaskStatus(state=STATE_TO_PROTO[task.state], timestamp=stamp)
    history = [
        a2a.Message(
            message_id=f"{task.id}-question",
            context_id=task.context_id,
            task_id=task.id,
            role=a2a.ROLE_USER,
            parts=[a2a.Part(text=task.question)],
        )
    ]
    artifacts = []
    if task.state is TaskState.COMPLETED:
        answer = _agent_message(task.id, task.context_id, task.answer, task.answer_message_id)
        status.message.CopyFrom(answer)
        history.append(answer)
        artifacts.append(_answer(task.answer))
    elif task.error:
        status.message.CopyFrom(_agent_message(task.id, task.context_id, task.error))
    if history_length is not None:  # A2A: 0 means no history, unset means all of it
        history = history[len(history) - history_length :] if history_length else []
    return a2a.Task(
        id=task.id, context_id=task.context_id, status=status, artifacts=artifacts, history=history
    )


def _status(task: TaskView, state: int, text: str = "", message_id: str = "") -> a2a.StreamResponse:
    status = a2a.TaskStatus(state=state, timestamp=_now())  # type: ignore[arg-type]
    if text:
        status.message.CopyFrom(_agent_message(task.id, task.context_id, text, message_id))
    return a2a.StreamResponse(
        status_update=a2a.TaskStatusUpdateEvent(
            task_id=task.id, context_id=task.context_id, status=status
        )
    )


def _chunk(task: TaskView, text: str, *, append: bool, last: bool) -> a2a.StreamResponse:
    return a2a.StreamResponse(
        artifact_update=a2a.TaskArtifactUpdateEvent(
            task_id=task.id,
            context_id=task.context_id,
            artifact=_answer(text),
            append=append,
            last_chunk=last,
        )
    )


async def stream_updates(
    task: TaskView, records: AsyncIterator[RunRecord]
) -> AsyncIterator[a2a.StreamResponse]:
    """A run's records as A2A stream events: the task first, then answer tokens as chunks
    of the answer artifact, tool calls as WORKING status updates, and the final status
    (COMPLETED, CANCELED or FAILED with the error), in-band: a client of the HTTP+JSON
    binding sees no trailers."""
    yield a2a.StreamResponse(task=task_to_proto(task))
    chunks = 0
    async for record in records:
        match record.event:
            case TokenDelta(text=text) if text:
                yield _chunk(task, text, append=chunks > 0, last=False)
                chunks += 1
            case ToolCallStarted(tool_name=name):
                yield _status(task, a2a.TASK_STATE_WORKING, f"calling the tool {name}")
            case ToolCallFinished(tool_name=name, outcome=outcome):
                yield _status(task, a2a.TASK_STATE_WORKING, f"the tool {name}: {outcome.value}")
            case RunCompleted(message=message):
                # An extractive answer (no model) comes whole, in one last chunk.
                text = "" if chunks else message.content
                yield _chunk(task, text, append=chunks > 0, last=True)
                yield _status(task, a2a.TASK_STATE_COMPLETED, message.content, str(message.id))
            case RunStopped(error=RunCancelled() as error):
                yield _status(task, a2a.TASK_STATE_CANCELED, error.message)
            case RunStopped(error=error):
                yield _status(task, a2a.TASK_STATE_FAILED, error.message)
