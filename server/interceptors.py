"""Server interceptors: request id and log, auth, error mapping. The rate limiter is in
`server/rate_limits.py`, the metrics interceptor in `server/rpc_metrics.py`; the order of
the chain, and why, is documented where it is built (`interceptors()` in `server/main.py`).

grpc.aio interceptors only see the handler lookup, so each one here re-wraps the handler's
behaviour; `wrap_handler` does that once for all four RPC kinds, including async-generator
(server-streaming) handlers.
"""

import asyncio
import hmac
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.rpc import status_pb2

from server.access import Access, access_for
from server.errors import INTERNAL, UNIMPLEMENTED, rich_status, to_grpc_status
from server.request_context import RequestInfo, current_request
from services.auth.auth_state import AuthStates
from services.auth.principal import Principal
from services.auth.tokens import TokenCodec
from services.errors import DomainError, PermissionDenied, Unauthenticated
from services.outages import outage_of
from services.usage_events.recorder import EventKind, EventRecorder

Context = grpc.aio.ServicerContext[Any, Any]
Behavior = Callable[..., Any]
if TYPE_CHECKING:  # the class is generic only in the type stubs
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
UnaryCall = Callable[[], Awaitable[Any]]
StreamCall = Callable[[], AsyncIterator[Any]]

REQUEST_ID_HEADER = "x-request-id"
# Method-name prefixes of the RPCs recorded as usage events (probes and grpcurl's
# reflection calls are not usage).
RECORDED_RPCS = "/agentmesh."
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


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


class WrappedHandlers:
    """Each method's wrapped handler, built on its first call and reused for as long as the
    handler it wraps is the same object: grpc finds a method's handler in a dict, and every
    interceptor in the chain reuses its wrapper, so after a method's first call no layer
    builds closures or handler objects per call."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[Handler, Handler]] = {}

    def get(self, method: str, inner: Handler, wrap: Callable[[Handler], Handler]) -> Handler:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is inner:
            return cached[1]
        wrapped = wrap(inner)
        self._by_method[method] = (inner, wrapped)
        return wrapped


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """Base: override `unary` and/or `stream` to run code around every RPC's behaviour."""

    _handlers: WrappedHandlers | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if self._handlers is None:
            self._handlers = WrappedHandlers()
        method = handler_call_details.method
        return self._handlers.get(method, handler, lambda h: wrap_handler(h, method, self))

    async def unary(self, call: UnaryCall, context: Context, method: str) -> Any:
        return await call()

    def stream(self, call: StreamCall, context: Context, method: str) -> AsyncIterator[Any]:
        return call()


def wrap_handler(handler: Handler, method: str, interceptor: WrappingInterceptor) -> Handler:
    """A copy of `handler` whose behaviour runs inside `interceptor`."""
    if handler.response_streaming:
        inner = cast(Behavior, handler.stream_stream or handler.unary_stream)

        async def stream_behavior(request: Any, context: Context) -> AsyncIterator[Any]:
            call: StreamCall = lambda: iterate_behavior(inner, request, context)  # noqa: E731
            async for item in interceptor.stream(call, context, method):
                yield item

        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_stream_rpc_method_handler
        )
        behavior: Behavior = stream_behavior
    else:
        inner = cast(Behavior, handler.stream_unary or handler.unary_unary)

        async def unary_behavior(request: Any, context: Context) -> Any:
            return await interceptor.unary(
                lambda: call_behavior(inner, request, context), context, method
            )

        factory = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        behavior = unary_behavior
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def abort(context: Context, status: status_pb2.Status) -> None:
    """End the RPC with a rich status (raises grpc.aio.AbortError).

    The request id goes into the trailers: a call that fails before its first response
    message has sent no headers yet, so the failure travels as a trailers-only response,
    which Envoy's transcoder turns into the status's own HTTP code (see RequestLogInterceptor).
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
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    if failed is None:
        return "OK"
    if context.cancelled() or isinstance(failed, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN"


class RequestLogInterceptor(WrappingInterceptor):
    """Gives every RPC a request id (from `x-request-id` or new), echoes it in the response,
    and writes one structured log line per RPC: id, rpc, code, latency, user.
    Every call of an agentmesh service (not health checks or reflection) is also recorded
    as a usage event, the denominator of the error rate.

    A stream's id goes out with the response headers only with its first message. Sending
    headers earlier would commit the HTTP status: Envoy's transcoder answers a REST stream
    with 200 as soon as headers arrive, so a stream refused before its first event (a foreign
    conversation, bad arguments, a quota) would reach REST clients as 200 with an error body
    instead of 404/400/429. A unary call sends its id at once (its status comes with its
    trailers either way). A call that fails carries the id in its trailers too (`abort`),
    which become the headers of a trailers-only response.
    """

    def __init__(self, logger: logging.Logger, events: EventRecorder) -> None:
        self._log = logger
        self._events = events

    def _begin(self, context: Context, method: str) -> RequestInfo:
        incoming = metadata_value(context, REQUEST_ID_HEADER)
        request_id = incoming if incoming and _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        # The peer is read now: once a call is cancelled, asking its context for the peer
        # reaches into a released C call object (it crashed the process in a test).
        info = RequestInfo(request_id=request_id, rpc=method, peer=context.peer())
        remaining = context.time_remaining()
        if remaining is not None:
            info.deadline = time.monotonic() + remaining
        current_request.set(info)
        return info

    @staticmethod
    async def _send_id(context: Context, info: RequestInfo) -> None:
        await context.send_initial_metadata(((REQUEST_ID_HEADER, info.request_id),))

    def _end(
        self, info: RequestInfo, context: Context, started: float, failed: BaseException | None
    ) -> None:
        code = code_name(context, failed)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        self._log.info(
            "rpc finished",
            extra={"rpc": info.rpc, "code": code, "latency_ms": latency_ms, "peer": info.peer},
        )
        if info.rpc.startswith(RECORDED_RPCS):
            self._events.record(
                EventKind.RPC,
                user_id=info.principal.user_id if info.principal else None,
                rpc=info.rpc,
                code=code,
                latency_ms=latency_ms,
                success=code == "OK",
            )

    async def unary(self, call: UnaryCall, context: Context, method: str) -> Any:
        started = time.perf_counter()
        info = self._begin(context, method)
        # A unary answer's HTTP status is set by its trailers whatever was sent before (the
        # transcoder waits for them), so its id goes out at once: sent before the handler
        # runs, it costs a tenth of what it costs beside the answer (measured, issue 17).
        await self._send_id(context, info)
        failed: BaseException | None = None
        try:
            return await call()
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._end(info, context, started, failed)

    async def stream(self, call: StreamCall, context: Context, method: str) -> AsyncIterator[Any]:
        started = time.perf_counter()
        info = self._begin(context, method)
        failed: BaseException | None = None
        sent = False
        try:
            async for item in call():
                if not sent:
                    await self._send_id(context, info)
                    sent = True
                yield item
            if not sent:  # an empty stream ends trailers-only
                context.set_trailing_metadata(((REQUEST_ID_HEADER, info.request_id),))
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._end(info, context, started, failed)


class AuthInterceptor(WrappingInterceptor):
    """Authenticates `authorization: Bearer <access token>` and enforces the access table.
    SERVICE methods take the service credential instead, and act for no user.

    A valid signature is not enough: the token's account must still exist and be enabled
    and its session must not be revoked (`AuthStates`: one cache read per call), and the
    access table is checked against the account's current role. A call refused here is
    first handed to `on_refused` (the rate limiter charges it to the client's address, and
    ends a flood of bad tokens with RESOURCE_EXHAUSTED), then ends UNAUTHENTICATED or
    PERMISSION_DENIED."""

    _log = logging.getLogger("agentmesh.auth")

    def __init__(
        self,
        tokens: TokenCodec,
        states: AuthStates,
        service_token: str,
        on_refused: Callable[[Context, str], Awaitable[None]] | None = None,
    ) -> None:
        self._tokens = tokens
        self._states = states
        self._service_token = service_token.encode()
        self._on_refused = on_refused

    async def _principal(self, context: Context, method: str) -> Principal | None:
        access = access_for(method)
        if access is None:
            raise PermissionDenied(
                "this method is not open to any caller", reason="METHOD_NOT_ALLOWED"
            )
        if access is Access.PUBLIC:
            return None
        scheme, _, token = (metadata_value(context, "authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        if access is Access.SERVICE:
            if not hmac.compare_digest(token.strip().encode(), self._service_token):
                raise Unauthenticated("not the service credential", reason="TOKEN_INVALID")
            return None
        principal = await self._states.principal(self._tokens.decode_access(token.strip()))
        if access is Access.ADMIN and not principal.is_admin:
            raise PermissionDenied("this method is for administrators", reason="ADMIN_REQUIRED")
        return principal

    async def _authenticate(self, context: Context, method: str) -> None:
        try:
            principal = await self._principal(context, method)
        except DomainError as error:
            if self._on_refused is not None:
                await self._on_refused(context, method)  # aborts when over the limit
            await abort(context, rich_status(error))
            return
        except Exception as exc:  # reading the auth state failed
            if (outage := outage_of(exc)) is None:
                self._log.exception("authentication failed unexpectedly in %s", method)
                await abort(context, INTERNAL)
            else:
                self._log.warning("%s in %s: %r", outage.reason, method, exc)
                await abort(context, rich_status(outage))
            return
        info = current_request.get()
        if info is None:
            info = RequestInfo(request_id=uuid.uuid4().hex, rpc=method)
            current_request.set(info)
        info.principal = principal
        if principal is not None:  # a call made on this user's behalf presents it again
            info.credential = metadata_value(context, "authorization")

    async def unary(self, call: UnaryCall, context: Context, method: str) -> Any:
        await self._authenticate(context, method)
        return await call()

    async def stream(self, call: StreamCall, context: Context, method: str) -> AsyncIterator[Any]:
        await self._authenticate(context, method)
        async for item in call():
            yield item


class ErrorInterceptor(WrappingInterceptor):
    """Maps DomainErrors to their status with details; a dependency that cannot be reached
    (services/outages.py) to UNAVAILABLE; anything else unexpected to INTERNAL with a generic
    message (the traceback goes to the log, never to the client)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger

    async def _fail(self, context: Context, method: str, exc: Exception) -> None:
        if isinstance(exc, DomainError):
            await abort(context, rich_status(exc))
        elif isinstance(exc, NotImplementedError):
            await abort(context, UNIMPLEMENTED)
        elif (outage := outage_of(exc)) is not None:  # a dependency is down, not a bug
            self._log.warning("%s in %s: %r", outage.reason, method, exc)
            await abort(context, rich_status(outage))
        else:
            self._log.exception("unhandled error in %s", method)
            await abort(context, INTERNAL)

    async def unary(self, call: UnaryCall, context: Context, method: str) -> Any:
        try:
            return await call()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, method, exc)

    async def stream(self, call: StreamCall, context: Context, method: str) -> AsyncIterator[Any]:
        try:
            async for item in call():
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await self._fail(context, method, exc)
