"""lf.a2a.v1.A2AService: the agent for other agents (issue 22), over A2aTasks.

A task is a run and its context is the run's conversation; a message to an existing context
continues that conversation. Push notifications and the extended agent card are not offered
(the agent card says so): those RPCs answer FAILED_PRECONDITION with A2A's own reasons.
"""

from collections.abc import AsyncIterator
from typing import Any

from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc as a2a_grpc
from google.protobuf import empty_pb2

from server.a2a_messages import STATE_OF_PROTO, stream_updates, task_to_proto
from server.request_context import current_principal, current_request
from services.agent.a2a_tasks import A2aTasks
from services.errors import FailedPrecondition, InvalidArgument


def _text_of(request: a2a.SendMessageRequest) -> str:
    """The question in a message: its text parts, joined (INVALID_ARGUMENT without one)."""
    texts = [part.text for part in request.message.parts if part.WhichOneof("content") == "text"]
    if not any(text.strip() for text in texts):
        raise InvalidArgument.of("message.parts", "must hold a text part")
    return "\n".join(texts)


def _request_id() -> str:
    info = current_request.get()
    return info.request_id if info else ""


def _history_length(config: a2a.SendMessageConfiguration) -> int | None:
    return config.history_length if config.HasField("history_length") else None


def _no_push_notifications() -> FailedPrecondition:
    return FailedPrecondition(
        "push notifications are not supported", reason="PUSH_NOTIFICATION_NOT_SUPPORTED"
    )


class A2aServicer(a2a_grpc.A2AServiceServicer):
    def __init__(self, tasks: A2aTasks) -> None:
        self._tasks = tasks

    async def _send(self, request: a2a.SendMessageRequest) -> Any:
        principal = current_principal()
        text = _text_of(request)
        return await self._tasks.send(
            principal, text, request.message.context_id, request_id=_request_id()
        )

    async def SendMessage(
        self, request: a2a.SendMessageRequest, context: Any
    ) -> a2a.SendMessageResponse:
        task = await self._send(request)
        if not request.configuration.return_immediately:  # A2A's default: wait for the end
            task = await self._tasks.wait(current_principal(), task.id)
        history = _history_length(request.configuration)
        return a2a.SendMessageResponse(task=task_to_proto(task, history))

    async def SendStreamingMessage(
        self, request: a2a.SendMessageRequest, context: Any
    ) -> AsyncIterator[a2a.StreamResponse]:
        task = await self._send(request)
        # The run is the service's: closing this stream leaves it running (SubscribeToTask).
        records = self._tasks.follow(current_principal(), task.id)
        async for response in stream_updates(task, records):
            yield response

    async def GetTask(self, request: a2a.GetTaskRequest, context: Any) -> a2a.Task:
        task = await self._tasks.get(current_principal(), request.id)
        history = request.history_length if request.HasField("history_length") else None
        return task_to_proto(task, history)

    async def ListTasks(self, request: a2a.ListTasksRequest, context: Any) -> a2a.ListTasksResponse:
        state = STATE_OF_PROTO.get(request.status) if request.status else None
        if request.status and state is None:
            raise InvalidArgument.of("status", "no task of this agent is in this state")
        page = await self._tasks.list(
            current_principal(),
            context_id=request.context_id,
            state=state,
            size=request.page_size,
            token=request.page_token,
        )
        history = request.history_length if request.HasField("history_length") else None
        return a2a.ListTasksResponse(
            tasks=[task_to_proto(task, history) for task in page.tasks],
            next_page_token=page.next_page_token,
            page_size=len(page.tasks),
        )

    async def CancelTask(self, request: a2a.CancelTaskRequest, context: Any) -> a2a.Task:
        return task_to_proto(await self._tasks.cancel(current_principal(), request.id))

    async def SubscribeToTask(
        self, request: a2a.SubscribeToTaskRequest, context: Any
    ) -> AsyncIterator[a2a.StreamResponse]:
        principal = current_principal()
        # Refused before the first event, so an HTTP+JSON client sees the status code.
        task = await self._tasks.running(principal, request.id)
        async for response in stream_updates(task, self._tasks.follow(principal, request.id)):
            yield response

    async def CreateTaskPushNotificationConfig(
        self, request: a2a.TaskPushNotificationConfig, context: Any
    ) -> a2a.TaskPushNotificationConfig:
        raise _no_push_notifications()

    async def GetTaskPushNotificationConfig(
        self, request: a2a.GetTaskPushNotificationConfigRequest, context: Any
    ) -> a2a.TaskPushNotificationConfig:
        raise _no_push_notifications()

    async def ListTaskPushNotificationConfigs(
        self, request: a2a.ListTaskPushNotificationConfigsRequest, context: Any
    ) -> a2a.ListTaskPushNotificationConfigsResponse:
        raise _no_push_notifications()

    async def DeleteTaskPushNotificationConfig(
        self, request: a2a.DeleteTaskPushNotificationConfigRequest, context: Any
    ) -> empty_pb2.Empty:
        raise _no_push_notifications()

    async def GetExtendedAgentCard(
        self, request: a2a.GetExtendedAgentCardRequest, context: Any
    ) -> a2a.AgentCard:
        raise FailedPrecondition(
            "this agent has no extended card", reason="EXTENDED_AGENT_CARD_NOT_CONFIGURED"
        )
