"""AgentService: the agent's runs (unary and streamed) and the caller's conversations."""

import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc

from server.errors import rich_status
from server.request_context import current_principal, current_request
from server.servicers.converters import feedback_to_proto, search_result_to_proto, to_timestamp
from services.agent import events
from services.agent.conversations import ConversationDetail
from services.agent.models import Conversation, Message
from services.agent.run_log import RunRecord, RunStopped
from services.agent.service import AgentService, Ask
from services.agent.tools.base import Source, SourceKind
from services.feedback.models import Feedback
from services.feedback.service import FeedbackService

ROLE_TO_PROTO = {"user": agent_pb2.MESSAGE_ROLE_USER, "assistant": agent_pb2.MESSAGE_ROLE_ASSISTANT}
MODE_TO_PROTO = {
    events.AnswerMode.GENERATED.value: agent_pb2.ANSWER_MODE_GENERATED,
    events.AnswerMode.EXTRACTIVE.value: agent_pb2.ANSWER_MODE_EXTRACTIVE,
}
SOURCE_TO_PROTO = {
    SourceKind.KNOWLEDGE_BASE.value: agent_pb2.SOURCE_TYPE_KNOWLEDGE_BASE,
    SourceKind.WEB.value: agent_pb2.SOURCE_TYPE_WEB,
    SourceKind.API.value: agent_pb2.SOURCE_TYPE_API,
}
OUTCOME_TO_PROTO = {
    events.ToolOutcome.OK.value: agent_pb2.TOOL_OUTCOME_OK,
    events.ToolOutcome.ERROR.value: agent_pb2.TOOL_OUTCOME_ERROR,
    events.ToolOutcome.TIMEOUT.value: agent_pb2.TOOL_OUTCOME_TIMEOUT,
    events.ToolOutcome.INVALID_ARGUMENTS.value: agent_pb2.TOOL_OUTCOME_INVALID_ARGUMENTS,
}
STEP_TO_PROTO = {
    events.Step.CLASSIFY_INTENT: agent_pb.STEP_CLASSIFY_INTENT,
    events.Step.LOAD_CONTEXT: agent_pb.STEP_LOAD_CONTEXT,
    events.Step.SELECT_TOOLS: agent_pb.STEP_SELECT_TOOLS,
    events.Step.EXECUTE_TOOLS: agent_pb.STEP_EXECUTE_TOOLS,
    events.Step.SYNTHESIZE: agent_pb.STEP_SYNTHESIZE,
    events.Step.PERSIST: agent_pb.STEP_PERSIST,
}
STATUS_TO_PROTO = {
    events.StepStatus.STARTED: agent_pb.STEP_STATUS_STARTED,
    events.StepStatus.COMPLETED: agent_pb.STEP_STATUS_COMPLETED,
    events.StepStatus.SKIPPED: agent_pb.STEP_STATUS_SKIPPED,
}


def citation_to_proto(record: dict[str, Any]) -> agent_pb2.Citation:
    return agent_pb2.Citation(
        **{**record, "source_type": SOURCE_TO_PROTO.get(record["source_type"], 0)}
    )


def source_to_proto(source: Source) -> agent_pb2.Citation:
    return agent_pb2.Citation(
        index=source.index,
        source_type=SOURCE_TO_PROTO[source.kind.value],
        document_id=source.document_id,
        chunk_id=source.chunk_id,
        title=source.title,
        url=source.url,
        snippet=source.text[:500],
        page=source.page,
        start_offset=source.start,
        end_offset=source.end,
        score=source.score,
    )


def message_to_proto(
    message: Message,
    feedback: Feedback | None = None,
    siblings: list[uuid.UUID] | None = None,
) -> agent_pb2.Message:
    proto = agent_pb2.Message(
        message_id=str(message.id),
        conversation_id=str(message.conversation_id),
        parent_message_id=str(message.parent_id) if message.parent_id else "",
        sibling_message_ids=[str(sibling) for sibling in siblings or ()],
        role=ROLE_TO_PROTO[message.role],
        content=message.content,
        citations=[citation_to_proto(c) for c in message.citations],
        tool_calls=[
            agent_pb2.ToolCall(**{**t, "outcome": OUTCOME_TO_PROTO.get(t["outcome"], 0)})
            for t in message.tool_calls
        ],
        model=message.model or "",
        mode=MODE_TO_PROTO.get(message.mode or "", agent_pb2.ANSWER_MODE_UNSPECIFIED),
        latency_ms=message.latency_ms or 0,
        created_at=to_timestamp(message.created_at),
    )
    if message.role == "assistant":
        proto.usage.CopyFrom(
            agent_pb2.TokenUsage(
                prompt_tokens=message.prompt_tokens,
                completion_tokens=message.completion_tokens,
                total_tokens=message.prompt_tokens + message.completion_tokens,
            )
        )
    if feedback is not None:
        proto.feedback.CopyFrom(feedback_to_proto(feedback))
    return proto


def conversation_to_proto(conversation: Conversation, message_count: int) -> agent_pb2.Conversation:
    return agent_pb2.Conversation(
        conversation_id=str(conversation.id),
        title=conversation.title,
        created_at=to_timestamp(conversation.created_at),
        updated_at=to_timestamp(conversation.updated_at),
        message_count=message_count,
        active_message_id=str(conversation.active_message_id or ""),
    )


def event_fields(event: events.Event) -> dict[str, Any]:
    """The oneof field of StreamQueryResponse that carries `event`."""
    match event:
        case events.RunStarted():
            return {"run_started": agent_pb.RunStarted(**vars(event))}
        case events.StepChanged():
            return {
                "step": agent_pb.StepEvent(
                    step=STEP_TO_PROTO[event.step],
                    status=STATUS_TO_PROTO[event.status],
                    detail=event.detail,
                    intent=event.intent,
                )
            }
        case events.ToolCallStarted():
            return {
                "tool_call": agent_pb.ToolCallStarted(
                    tool_call_id=event.call_id,
                    tool_name=event.tool_name,
                    arguments_json=event.arguments_json,
                )
            }
        case events.ToolCallFinished():
            return {
                "tool_result": agent_pb.ToolCallResult(
                    tool_call_id=event.call_id,
                    tool_name=event.tool_name,
                    outcome=OUTCOME_TO_PROTO[event.outcome.value],
                    summary=event.summary,
                    sources=[source_to_proto(s) for s in event.sources],
                    error_message=event.error,
                    latency_ms=event.latency_ms,
                )
            }
        case events.RetrievalDone():
            return {
                "retrieval": agent_pb.RetrievalResults(
                    query=event.query, results=[search_result_to_proto(p) for p in event.passages]
                )
            }
        case events.TokenDelta():
            return {"token": agent_pb.TokenDelta(text=event.text)}
        case events.CitationAdded():
            return {"citation": source_to_proto(event.source)}
        case events.UsageReported():
            return {
                "usage": agent_pb2.TokenUsage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    total_tokens=event.prompt_tokens + event.completion_tokens,
                )
            }
        case events.RunCompleted():
            return {
                "completed": agent_pb.RunCompleted(
                    message=message_to_proto(event.message, siblings=list(event.siblings)),
                    finish_reason=event.finish_reason,
                )
            }
    raise TypeError(f"unknown agent event {event!r}")


# StreamQuery and AttachRun send the same envelope under two names (buf STANDARD gives each
# RPC its own response message).
RunEventMessage = TypeVar(
    "RunEventMessage", agent_pb.StreamQueryResponse, agent_pb.AttachRunResponse
)


async def run_events(
    message: type[RunEventMessage], run_id: str, records: AsyncIterator[RunRecord]
) -> AsyncIterator[RunEventMessage]:
    """A run's records as stream messages. A run that did not complete ends with an `error`
    event, then the same status (REST clients, who see no trailers, see the event)."""
    async for record in records:
        if isinstance(record.event, RunStopped):
            error = record.event.error
            yield message(run_id=run_id, seq=record.seq, error=rich_status(error))
            raise error.with_traceback(None)  # the error interceptor ends the stream with it
        yield message(run_id=run_id, seq=record.seq, **event_fields(record.event))


def ask_of(request: agent_pb.QueryRequest | agent_pb.StreamQueryRequest) -> Ask:
    return Ask(
        query=request.query,
        conversation_id=request.conversation_id,
        edit_message_id=request.edit_message_id,
        regenerate_message_id=request.regenerate_message_id,
    )


def _request_id() -> str:
    info = current_request.get()
    return info.request_id if info else ""


class AgentServicer(agent_grpc.AgentServiceServicer):
    def __init__(self, agent: AgentService, feedback: FeedbackService) -> None:
        self._agent = agent
        # GetConversation shows the caller's feedback on each message: the feedback package
        # sits above the agent's (it judges the agent's messages), so the two meet here.
        self._feedback = feedback

    async def Query(self, request: agent_pb.QueryRequest, context: Any) -> agent_pb.QueryResponse:
        result = await self._agent.query(
            current_principal(), ask_of(request), request_id=_request_id()
        )
        return agent_pb.QueryResponse(
            conversation_id=result.started.conversation_id,
            message=message_to_proto(
                result.completed.message, siblings=list(result.completed.siblings)
            ),
            run_id=result.run_id,
            user_message_id=result.started.user_message_id,
        )

    async def StreamQuery(
        self, request: agent_pb.StreamQueryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb.StreamQueryResponse]:
        principal = current_principal()
        run_id = await self._agent.start(principal, ask_of(request), request_id=_request_id())
        # The run is the service's: closing this stream leaves it running (AttachRun).
        records = self._agent.attach(principal, run_id)
        async for response in run_events(agent_pb.StreamQueryResponse, run_id, records):
            yield response

    async def AttachRun(
        self, request: agent_pb.AttachRunRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[agent_pb.AttachRunResponse]:
        records = self._agent.attach(current_principal(), request.run_id, request.after_seq)
        async for response in run_events(agent_pb.AttachRunResponse, request.run_id, records):
            yield response

    async def CancelRun(
        self, request: agent_pb.CancelRunRequest, context: Any
    ) -> agent_pb.CancelRunResponse:
        await self._agent.cancel(current_principal(), request.run_id)
        return agent_pb.CancelRunResponse()

    async def ListConversations(
        self, request: agent_pb.ListConversationsRequest, context: Any
    ) -> agent_pb.ListConversationsResponse:
        page = await self._agent.list_conversations(
            current_principal(), request.page_size, request.page_token, request.query
        )
        return agent_pb.ListConversationsResponse(
            conversations=[
                conversation_to_proto(c.conversation, c.message_count) for c in page.conversations
            ],
            next_page_token=page.next_page_token,
        )

    async def _with_feedback(self, detail: ConversationDetail) -> dict[str, Any]:
        """The conversation and its active branch, each message with its siblings and the
        caller's feedback."""
        mine = await self._feedback.mine(current_principal(), [m.id for m in detail.messages])
        return {
            "conversation": conversation_to_proto(detail.conversation, detail.message_count),
            "messages": [
                message_to_proto(m, mine.get(m.id), detail.siblings[m.id]) for m in detail.messages
            ],
        }

    async def GetConversation(
        self, request: agent_pb.GetConversationRequest, context: Any
    ) -> agent_pb.GetConversationResponse:
        detail = await self._agent.get_conversation(current_principal(), request.conversation_id)
        return agent_pb.GetConversationResponse(**await self._with_feedback(detail))

    async def SwitchBranch(
        self, request: agent_pb.SwitchBranchRequest, context: Any
    ) -> agent_pb.SwitchBranchResponse:
        detail = await self._agent.switch_branch(
            current_principal(), request.conversation_id, request.message_id
        )
        return agent_pb.SwitchBranchResponse(**await self._with_feedback(detail))

    async def DeleteConversation(
        self, request: agent_pb.DeleteConversationRequest, context: Any
    ) -> agent_pb.DeleteConversationResponse:
        await self._agent.delete_conversation(current_principal(), request.conversation_id)
        return agent_pb.DeleteConversationResponse()
