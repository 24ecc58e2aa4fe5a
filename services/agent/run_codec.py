"""Run records as JSON, for a run log shared through Redis: plain data only (never pickles,
which anyone able to write to Redis could turn into code). Events are dataclasses, read
back through pydantic; the stored answer of RunCompleted and the DomainError of RunStopped
are written field by field."""

import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter

from services import errors
from services.agent import events
from services.agent.models import Message
from services.agent.run_log import RunRecord, RunStopped

JSON = dict[str, Any]

# The event types by name, as records carry them, each with its pydantic reader and writer.
EVENT_TYPES: dict[str, TypeAdapter[Any]] = {
    cls.__name__: TypeAdapter(cls)
    for cls in (
        events.RunStarted,
        events.StepChanged,
        events.ToolCallStarted,
        events.ToolCallFinished,
        events.RetrievalDone,
        events.TokenDelta,
        events.CitationAdded,
        events.UsageReported,
    )
}
# The DomainError classes an error is written as (its nearest one of these): each maps to
# one status, and its reason, message and details are kept.
ERROR_TYPES: dict[str, type[errors.DomainError]] = {
    cls.__name__: cls
    for cls in (
        errors.InvalidArgument,
        errors.NotFound,
        errors.AlreadyExists,
        errors.FailedPrecondition,
        errors.Aborted,
        errors.Cancelled,
        errors.PermissionDenied,
        errors.Unauthenticated,
        errors.ResourceExhausted,
        errors.Unavailable,
        errors.DomainError,
    )
}


def _message_to_json(message: Message) -> JSON:
    return {
        "id": str(message.id),
        "conversation_id": str(message.conversation_id),
        "parent_id": str(message.parent_id) if message.parent_id else None,
        "role": message.role,
        "content": message.content,
        "citations": message.citations,
        "tool_calls": message.tool_calls,
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "model": message.model,
        "mode": message.mode,
        "latency_ms": message.latency_ms,
        "created_at": message.created_at.isoformat(),
    }


def _message_of(data: JSON) -> Message:
    return Message(
        **{
            **data,
            "id": uuid.UUID(data["id"]),
            "conversation_id": uuid.UUID(data["conversation_id"]),
            "parent_id": uuid.UUID(data["parent_id"]) if data.get("parent_id") else None,
            "created_at": datetime.fromisoformat(data["created_at"]),
        }
    )


def _error_to_json(error: errors.DomainError) -> JSON:
    kind = next(cls.__name__ for cls in type(error).__mro__ if cls.__name__ in ERROR_TYPES)
    data: JSON = {
        "type": kind,
        "message": error.message,
        "reason": error.reason,
        "metadata": error.metadata,
    }
    if isinstance(error, errors.InvalidArgument):
        data["fields"] = [[v.field, v.description] for v in error.violations]
    if isinstance(error, errors.ResourceExhausted):
        data["retry_after"] = error.retry_after
        data["quotas"] = [[v.subject, v.description] for v in error.violations]
    return data


def _error_of(data: JSON) -> errors.DomainError:
    kind = ERROR_TYPES.get(data["type"], errors.DomainError)
    error: errors.DomainError
    if kind is errors.InvalidArgument:
        violations = [errors.FieldViolation(f, d) for f, d in data.get("fields", [])]
        error = errors.InvalidArgument(violations, reason=data["reason"])
        error.metadata = data["metadata"]
    elif kind is errors.ResourceExhausted:
        error = errors.ResourceExhausted(
            data["message"],
            retry_after=data.get("retry_after"),
            violations=[errors.QuotaViolation(s, d) for s, d in data.get("quotas", [])],
            reason=data["reason"],
            metadata=data["metadata"],
        )
    else:
        error = kind(data["message"], reason=data["reason"], metadata=data["metadata"])
    return error


def encode(record: RunRecord) -> bytes:
    """The record as JSON bytes."""
    event = record.event
    data: JSON
    if isinstance(event, RunStopped):
        data = {"type": "RunStopped", "error": _error_to_json(event.error)}
    elif isinstance(event, events.RunCompleted):
        data = {
            "type": "RunCompleted",
            "message": _message_to_json(event.message),
            "finish_reason": event.finish_reason,
            "siblings": [str(sibling) for sibling in event.siblings],
        }
    else:
        name = type(event).__name__
        data = {"type": name, "event": EVENT_TYPES[name].dump_python(event, mode="json")}
    return json.dumps({"seq": record.seq, **data}, separators=(",", ":")).encode()


def decode(raw: bytes | str) -> RunRecord:
    """A record written by `encode`."""
    data = json.loads(raw)
    kind = data["type"]
    event: events.Event | RunStopped
    if kind == "RunStopped":
        event = RunStopped(_error_of(data["error"]))
    elif kind == "RunCompleted":
        siblings = tuple(uuid.UUID(sibling) for sibling in data.get("siblings", ()))
        event = events.RunCompleted(_message_of(data["message"]), data["finish_reason"], siblings)
    else:
        event = EVENT_TYPES[kind].validate_python(data["event"])
    return RunRecord(int(data["seq"]), event)
