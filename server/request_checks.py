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
message. `UnknownMethodInterceptor` answers a method no service has with UNIMPLEMENTED and
an ErrorInfo, in place of grpc's bare "Method not found!".
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from server.errors import plain_status, rich_status
from server.interceptors import (
    Behavior,
    Context,
    Handler,
    WrappedHandlers,
    abort,
    call_behavior,
    iterate_behavior,
)
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


async def check(request: Any, context: Context) -> None:
    """Abort the call when its request is too large, malformed or carries a NUL character."""
    if isinstance(request, TooLarge):
        await abort(context, rich_status(too_large(request)))
    if isinstance(request, Malformed):
        await abort(context, MALFORMED)
    if isinstance(request, Message) and (violations := nul_violations(request)):
        await abort(context, rich_status(InvalidArgument(violations, reason="NUL_CHARACTER")))


async def checked_requests(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
    """The messages of a client stream, each checked before the handler reads it."""
    async for request in requests:
        await check(request, context)
        yield request


class RequestCheckInterceptor(grpc.aio.ServerInterceptor):
    """Runs `check` on every request message of every method before its handler, with
    the receive limit of `limits` for the method."""

    def __init__(self, limits: ReceiveLimits) -> None:
        self._limits = limits
        self._handlers = WrappedHandlers()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return self._handlers.get(method, handler, lambda h: self._checking(h, method))

    def _checking(self, handler: Handler, method: str) -> Handler:
        parse = tolerant(handler.request_deserializer, self._limits.of(method))
        if handler.request_streaming:
            return _checked_client_stream(handler, parse)
        if handler.response_streaming:
            streamed = cast(Behavior, handler.unary_stream)

            async def checked_stream(request: Any, context: Context) -> AsyncIterator[Any]:
                await check(request, context)
                async for item in iterate_behavior(streamed, request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                checked_stream, parse, handler.response_serializer
            )
        unary = cast(Behavior, handler.unary_unary)

        async def checked(request: Any, context: Context) -> Any:
            await check(request, context)
            return await call_behavior(unary, request, context)

        return grpc.unary_unary_rpc_method_handler(checked, parse, handler.response_serializer)


def _checked_client_stream(handler: Handler, parse: Callable[[bytes], Any] | None) -> Handler:
    if handler.response_streaming:
        bidi = cast(Behavior, handler.stream_stream)

        async def checked_bidi(
            requests: AsyncIterator[Any], context: Context
        ) -> AsyncIterator[Any]:
            async for item in iterate_behavior(bidi, checked_requests(requests, context), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(
            checked_bidi, parse, handler.response_serializer
        )
    unary = cast(Behavior, handler.stream_unary)

    async def checked_unary(requests: AsyncIterator[Any], context: Context) -> Any:
        return await call_behavior(unary, checked_requests(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(checked_unary, parse, handler.response_serializer)


class UnknownMethodInterceptor(grpc.aio.ServerInterceptor):
    """UNIMPLEMENTED with an ErrorInfo (METHOD_NOT_FOUND) for a method no service has.

    Outermost in the chain: the interceptors inside never see the call, so a made-up
    method name never becomes a metric label or a log line's rpc.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is not None:
            return handler
        # Any kind of call ends the same way, and nothing it sends is read or parsed.
        return grpc.stream_stream_rpc_method_handler(_unknown_method)


async def _unknown_method(requests: Any, context: Context) -> None:
    await abort(context, UNKNOWN_METHOD)
