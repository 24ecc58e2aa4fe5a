"""Checks every request gets before any handler sees it, for every method of every service.

- Bytes that do not parse as the method's request message are INVALID_ARGUMENT (reason
  MALFORMED_REQUEST), not grpc's UNKNOWN naming a Python exception class.
- A NUL character in any string field, at any depth (repeated fields and map keys and values
  included), is INVALID_ARGUMENT with a field violation: no text the services store or pass
  on may carry one (PostgreSQL refuses it; C strings end at it).

Client-streaming methods (only server reflection has one) are passed through untouched.
"""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from server.errors import plain_status, rich_status
from server.interceptors import (
    Behavior,
    Context,
    Handler,
    abort,
    call_behavior,
    iterate_behavior,
)
from services.errors import FieldViolation, InvalidArgument

MALFORMED = plain_status(
    grpc.StatusCode.INVALID_ARGUMENT,
    "the request is not a valid protobuf message for this method",
    "MALFORMED_REQUEST",
)


class Malformed:
    """What a request that failed to parse is replaced with, for the handler to refuse."""


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
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


async def check(request: Any, context: Context) -> None:
    """Abort the call when its request is malformed or carries a NUL character."""
    if isinstance(request, Malformed):
        await abort(context, MALFORMED)
    if isinstance(request, Message) and (violations := nul_violations(request)):
        await abort(context, rich_status(InvalidArgument(violations, reason="NUL_CHARACTER")))


class RequestCheckInterceptor(grpc.aio.ServerInterceptor):
    """Runs `check` on the request of every unary-request method before its handler."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        parse = tolerant(handler.request_deserializer)
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
