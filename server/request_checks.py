"""Checks every request gets before any handler sees it, for every method of every service.

- A request larger than its method's receive limit (`ReceiveLimits`: small by default,
  large only for the methods that carry files or passages) is RESOURCE_EXHAUSTED (reason
  REQUEST_TOO_LARGE), refused on its size before it is parsed, with or without a token.
  grpc core has already read the bytes by then: it refuses by itself only what exceeds the
  server's `grpc.max_receive_message_length`, the largest method limit (that refusal is
  grpc's own RESOURCE_EXHAUSTED, without details). What the per-method limit saves is the
  parsing, and everything after it: auth, handlers, storage.
- Bytes that do not parse as the method's request message are INVALID_ARGUMENT (reason
  MALFORMED_REQUEST), not grpc's UNKNOWN naming a Python exception class.
- A NUL character in any string field, at any depth (repeated fields and map keys and values
  included), is INVALID_ARGUMENT with a field violation: no text the services store or pass
  on may carry one (PostgreSQL refuses it; C strings end at it).

Client-streaming methods (only server reflection has one) get the same checks on each
message. The call pipeline (server/interceptors.py) runs them; it also answers a method no
service has with UNKNOWN_METHOD (UNIMPLEMENTED with an ErrorInfo), in place of grpc's bare
"Method not found!".
"""

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2

from server.errors import plain_status, rich_status
from server.handlers import Context, abort
from services.errors import FieldViolation, InvalidArgument, ResourceExhausted

MALFORMED = plain_status(
    grpc.StatusCode.INVALID_ARGUMENT,
    "the request is not a valid protobuf message for this method",
    "MALFORMED_REQUEST",
)
UNKNOWN_METHOD = plain_status(
    grpc.StatusCode.UNIMPLEMENTED, "no service here has this method", "METHOD_NOT_FOUND"
)

# The methods whose requests are large by design, with the limit that applies to them
# (`ReceiveLimits.large`); every other method gets `ReceiveLimits.default`.
LARGE_REQUESTS: frozenset[str] = frozenset(
    {
        # A whole file, up to MAX_UPLOAD_BYTES, in one unary message.
        "/agentmesh.knowledge.v1.KnowledgeBaseService/UploadDocument",
        # A worker's batch of passages with their vectors (server/remote_index.py):
        # a few MB; internal, with the service credential.
        "/agentmesh.indexing.v1.IndexingService/UpsertPassages",
    }
)


@dataclass(frozen=True)
class ReceiveLimits:
    """The largest request message, in bytes, each method accepts."""

    default: int
    large: int

    def of(self, method: str) -> int:
        return self.large if method in LARGE_REQUESTS else self.default


class Malformed:
    """What a request that failed to parse is replaced with, for the handler to refuse."""


@dataclass(frozen=True)
class TooLarge:
    """What a request over its method's limit is replaced with, unparsed."""

    size: int
    limit: int


def tolerant(
    deserialize: Callable[[bytes], Any] | None, limit: int
) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        if len(raw) > limit:
            return TooLarge(len(raw), limit)
        try:
            return deserialize(raw)
        except (DecodeError, ValueError, TypeError):
            return Malformed()

    return parse


def nul_violations(message: Message, prefix: str = "") -> list[FieldViolation]:
    """A violation for every string in `message` (recursively) that holds a NUL."""
    found: list[FieldViolation] = []
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            entry_type = field.message_type
            if entry_type is not None and entry_type.GetOptions().map_entry:
                for key, item in value.items():
                    entry = f'{path}["{key}"]'
                    if isinstance(key, str) and "\x00" in key:
                        found.append(FieldViolation(path, "keys must not contain NUL characters"))
                    if isinstance(item, Message):
                        found += nul_violations(item, entry + ".")
                    elif isinstance(item, str) and "\x00" in item:
                        found.append(FieldViolation(entry, "must not contain NUL characters"))
            elif field.is_repeated:
                for index, item in enumerate(value):
                    found += nul_violations(item, f"{path}[{index}].")
            else:
                found += nul_violations(value, path + ".")
        elif field.type == FieldDescriptor.TYPE_STRING:
            items = value if field.is_repeated else [value]
            for index, item in enumerate(items):
                if "\x00" in item:
                    where = f"{path}[{index}]" if items is value else path
                    found.append(FieldViolation(where, "must not contain NUL characters"))
    return found


def too_large(request: TooLarge) -> ResourceExhausted:
    return ResourceExhausted(
        f"the request is {request.size} bytes; this method accepts at most {request.limit}",
        reason="REQUEST_TOO_LARGE",
        metadata={"limit_bytes": str(request.limit)},
    )


def problem(request: Any) -> status_pb2.Status | None:
    """Why `request` is refused (too large, malformed, a NUL character), or None."""
    if isinstance(request, TooLarge):
        return rich_status(too_large(request))
    if isinstance(request, Malformed):
        return MALFORMED
    if isinstance(request, Message) and (violations := nul_violations(request)):
        return rich_status(InvalidArgument(violations, reason="NUL_CHARACTER"))
    return None


async def checked_requests(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """The messages of a client stream, each checked before the handler reads it."""
    async for request in requests:
        if (refused := problem(request)) is not None:
            await abort(context, refused)
        yield request
