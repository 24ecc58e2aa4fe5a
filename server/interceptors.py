"""The call pipeline: the one grpc.aio interceptor, which runs every stage of every call.

The stages, in order (each in its own module; the chain is built in `server/main.py`):

1. Unknown methods: UNIMPLEMENTED with an ErrorInfo (METHOD_NOT_FOUND), and no stage sees
   them, so a made-up method name never becomes a metric label or a usage event.
2. Metrics (server/rpc_metrics.py): every call is counted and timed, including the ones the
   stages after it refuse (shed calls too), and the time includes their cost.
3. Admission (server/admission.py, load shedding): a call over its budget of calls in
   flight is refused with OVERLOADED (and RetryInfo) at once, unparsed: under overload a
   refusal costs no log line and no usage event. Health checks and reflection are exempt.
4. Request id and log (server/request_log.py): every admitted call, refused or not, gets a
   request id, a log line and its `rpc` usage event with the final status code.
5. Request checks (server/request_checks.py): a request over its method's size limit is
   RESOURCE_EXHAUSTED before it is parsed; one that does not parse, or carries a NUL
   character in any string, is INVALID_ARGUMENT; both before anything reads it, with or
   without a token.
6. Authentication (server/authentication.py): the principal goes into the request context;
   the access table passes health, reflection and the credential RPCs through. A token or
   API key must also belong to an account that still exists and is enabled (a token's
   session not signed out, a key not revoked or expired), and a key's use of the method
   is checked (read-only keys only read; no key manages credentials). A call it refuses
   is first charged to its client address's rate limit, so a flood of bad tokens is
   limited too.
7. Rate limits (server/rate_limits.py, when enabled): after authentication, so per-user
   windows know the user; anonymous calls are limited by client address, Login also by
   account.
8. Error mapping, innermost: a DomainError becomes its status and details; a dependency that
   cannot be reached (services/outages.py) UNAVAILABLE; anything else unexpected INTERNAL
   with a generic message (the traceback goes to the log, never to the client).

Why one interceptor and not one per stage: grpc.aio interceptors only see the handler
lookup, so each must re-wrap the handler's behaviour, and a chain of eight cost a coroutine
per stage for the lookup and another per stage for the call, each with its own try block,
on every call: more than half of a plain authenticated call (issue 17, bench/hot_path.py).
Here each method's wrapped handler is built on its first call, with what the stages need to
know about the method decided once (its access, its limits, its metric children), and a call
runs the stages in one coroutine. The wrapper handles all four handler kinds, including
async-generator (server-streaming) handlers.
"""

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc

from server.access import Access, KeyUse, access_for, key_use
from server.admission import Admission, Budget
from server.authentication import Authentication
from server.errors import INTERNAL, UNIMPLEMENTED, rich_status, to_grpc_status
from server.handlers import (
    REQUEST_ID_HEADER,
    Behavior,
    Context,
    Handler,
    abort,
    code_name,
    iterate_behavior,
    metadata_value,
)
from server.rate_limits import RateLimitGate
from server.request_checks import UNKNOWN_METHOD, ReceiveLimits, checked_requests, problem, tolerant
from server.request_context import RequestInfo
from server.request_log import RequestLog
from server.rpc_metrics import MethodMetrics, RpcMetrics, grpc_type
from services.errors import DomainError
from services.outages import outage_of

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]


@dataclass(frozen=True)
class Stages:
    """What the pipeline runs for every call; `limits` None: rate limits are off."""

    metrics: RpcMetrics
    admission: Admission
    log: RequestLog
    receive_limits: ReceiveLimits
    auth: Authentication
    limits: RateLimitGate | None
    errors: logging.Logger


@dataclass(frozen=True)
class MethodPlan:
    """What the stages decide about a method once, on its first call."""

    method: str
    metrics: MethodMetrics
    budget: Budget | None
    access: Access | None
    key_use: KeyUse  # what an API key may do with it
    limits: RateLimitGate | None  # None: not rate limited
    client_stream: bool


@dataclass(frozen=True)
class Wrapped:
    """A method's handlers: the admitted and the shed call's."""

    inner: Handler  # the handler grpc found, to notice if it is ever replaced
    plan: MethodPlan
    admitted: Handler
    refused: Handler


class CallPipeline(grpc.aio.ServerInterceptor):
    def __init__(self, stages: Stages) -> None:
        self._stages = stages
        self._by_method: dict[str, Wrapped] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return UNKNOWN_METHOD_HANDLER
        method = handler_call_details.method
        wrapped = self._by_method.get(method)
        if wrapped is None or wrapped.inner is not handler:
            wrapped = self._by_method[method] = self._wrap(handler, method)
        if self._stages.admission.admit(wrapped.plan.budget):
            return wrapped.admitted
        return wrapped.refused

    def _wrap(self, handler: Handler, method: str) -> Wrapped:
        stages = self._stages
        kind = grpc_type(handler.request_streaming, handler.response_streaming)
        plan = MethodPlan(
            method=method,
            metrics=stages.metrics.of(method, kind),
            budget=stages.admission.budget(method),
            access=access_for(method),
            key_use=key_use(method),
            limits=stages.limits if stages.limits and stages.limits.limits(method) else None,
            client_stream=handler.request_streaming,
        )
        parse = tolerant(handler.request_deserializer, stages.receive_limits.of(method))
        if handler.response_streaming:
            inner = cast(Behavior, handler.stream_stream or handler.unary_stream)
            behavior: Behavior = self._streaming(plan, inner)
        else:
            inner = cast(Behavior, handler.stream_unary or handler.unary_unary)
            behavior = self._unary(plan, inner)
        factory = _factory(handler)
        return Wrapped(
            inner=handler,
            plan=plan,
            admitted=factory(behavior, parse, handler.response_serializer),
            refused=factory(
                self._refusing(plan, to_grpc_status(stages.admission.refusal)),
                _unread,
                handler.response_serializer,
            ),
        )

    # --- the stages before the handler, shared by both kinds of call --------------------

    async def _admit(
        self, plan: MethodPlan, info: RequestInfo, request: Any, context: Context
    ) -> Any:
        """Checks, authentication and rate limits; the request the handler gets (a client
        stream's requests are checked one by one as the handler reads them)."""
        stages = self._stages
        if plan.client_stream:
            request = checked_requests(request, context)
        elif (refused := problem(request)) is not None:
            await abort(context, refused)
        authorization = None
        if plan.access is not Access.PUBLIC:
            authorization = metadata_value(context, "authorization")
        try:
            principal = await stages.auth.principal(plan.access, authorization, plan.key_use)
        except DomainError:
            if stages.limits is not None:
                await stages.limits.charge_refused(context, info)  # aborts over the limit
            raise
        info.principal = principal
        if principal is not None:  # a call made on this user's behalf presents it again
            info.credential = authorization
        if plan.limits is not None:
            await plan.limits.admit(context, info, request)
        return request

    async def _fail(self, plan: MethodPlan, context: Context, exc: Exception) -> None:
        """End the call with the status `exc` maps to (raises grpc.aio.AbortError)."""
        if isinstance(exc, DomainError):
            await abort(context, rich_status(exc))
        elif isinstance(exc, NotImplementedError):
            await abort(context, UNIMPLEMENTED)
        elif (outage := outage_of(exc)) is not None:  # a dependency is down, not a bug
            self._stages.errors.warning("%s in %s: %r", outage.reason, plan.method, exc)
            await abort(context, rich_status(outage))
        else:
            self._stages.errors.exception("unhandled error in %s", plan.method)
            await abort(context, INTERNAL)

    # --- the two call shapes --------------------------------------------------------------

    def _unary(self, plan: MethodPlan, inner: Behavior) -> Behavior:
        stages, metrics, method = self._stages, plan.metrics, plan.method
        sent = metrics.sent

        async def unary(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            metrics.begin()
            info = stages.log.begin(context, method, metadata_value(context, REQUEST_ID_HEADER))
            failed: BaseException | None = None
            try:
                # A unary answer's HTTP status is set by its trailers whatever was sent
                # before (the transcoder waits for them), so its id goes out at once: sent
                # before the handler runs, it costs a tenth of what it costs beside the
                # answer (measured, issue 17).
                await stages.log.send_id(context, info)
                try:
                    request = await self._admit(plan, info, request, context)
                    response = inner(request, context)
                    if inspect.isawaitable(response):
                        response = await response
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._fail(plan, context, exc)
                sent.inc()
                return response
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._end(plan, info, context, started, failed)

        return unary

    def _streaming(self, plan: MethodPlan, inner: Behavior) -> Behavior:
        stages, metrics, method = self._stages, plan.metrics, plan.method
        sent = metrics.sent

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            metrics.begin()
            info = stages.log.begin(context, method, metadata_value(context, REQUEST_ID_HEADER))
            failed: BaseException | None = None
            try:
                any_sent = False
                try:
                    request = await self._admit(plan, info, request, context)
                    async for item in iterate_behavior(inner, request, context):
                        if not any_sent:
                            await stages.log.send_id(context, info)
                            any_sent = True
                        sent.inc()
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await self._fail(plan, context, exc)
                if not any_sent:  # an empty stream ends trailers-only
                    stages.log.id_in_trailers(context, info)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._end(plan, info, context, started, failed)

        return streaming

    def _end(
        self,
        plan: MethodPlan,
        info: RequestInfo,
        context: Context,
        started: float,
        failed: BaseException | None,
    ) -> None:
        code = code_name(context, failed)
        seconds = time.perf_counter() - started
        plan.metrics.end(code, seconds)
        self._stages.log.end(info, code, seconds)

    def _refusing(self, plan: MethodPlan, status: grpc.Status) -> Behavior:
        """A shed call: counted and timed, and ended with `status` (OVERLOADED)."""
        metrics = plan.metrics

        async def refuse(request: Any, context: Context) -> None:
            started = time.perf_counter()
            metrics.begin()
            try:
                await context.abort(status.code, status.details, status.trailing_metadata)
            finally:
                metrics.end(code_name(context, None), time.perf_counter() - started)

        return refuse


def _factory(handler: Handler) -> Callable[..., Handler]:
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler
    return grpc.unary_unary_rpc_method_handler


def _unread(raw: bytes) -> None:
    """The request of a refused call: never parsed."""


async def _unknown_method(requests: Any, context: Context) -> None:
    await abort(context, UNKNOWN_METHOD)


# Any kind of call of an unknown method ends the same way, and nothing it sends is read.
UNKNOWN_METHOD_HANDLER: Handler = grpc.stream_stream_rpc_method_handler(_unknown_method)
