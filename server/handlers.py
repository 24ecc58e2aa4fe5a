"""What the call pipeline (server/interceptors.py) and its stages share about grpc.aio
calls: the handler types, running a handler's behaviour of any kind, ending a call with a
rich status, reading invocation metadata, and naming the code a call ended with."""

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import status_pb2

from server.errors import to_grpc_status
from server.request_context import current_request

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[..., Any]
if TYPE_CHECKING:  # the class is generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

REQUEST_ID_HEADER = "x-request-id"


async def call_behavior(behavior: Behavior, request: Any, context: Context) -> Any:
    result = behavior(request, context)
    return await result if inspect.isawaitable(result) else result


async def iterate_behavior(
    behavior: Behavior, request: Any, context: Context
) -> AsyncIterator[Any]:
    result = behavior(request, context)
    if inspect.isawaitable(result):  # a handler that writes with context.write()
        result = await result
    if result is None:
        return
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        for item in result:
            yield item


async def abort(context: Context, status: status_pb2.Status) -> None:
    """End the RPC with a rich status (raises grpc.aio.AbortError).

    The request id goes into the trailers: a call that fails before its first response
    message has sent no headers yet, so the failure travels as a trailers-only response,
    which Envoy's transcoder turns into the status's own HTTP code (see server/request_log.py).
    """
    grpc_status = to_grpc_status(status)
    trailers = tuple(grpc_status.trailing_metadata)
    if (info := current_request.get()) is not None:
        trailers += ((REQUEST_ID_HEADER, info.request_id),)
    await context.abort(grpc_status.code, grpc_status.details, trailers)


def metadata_value(context: Context, key: str) -> str | None:
    """The text value of an invocation metadata key (HTTP headers arrive lower-cased)."""
    for name, value in context.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return None


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def code_name(context: Context, failed: BaseException | None) -> str:
    """The status code a call ended with, as logs, metrics and usage events name it.

    A call whose client went away (cancelled, deadline passed, connection dropped) ends
    with CancelledError inside the handler, and `context.cancelled()` does not always say
    so by then: it is CANCELLED all the same, never UNKNOWN (which the error-rate alert
    counts)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        return _CODE_NAMES.get(code, "UNKNOWN")
    if failed is None:
        return "OK"
    if context.cancelled() or isinstance(failed, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"
