"""Load shedding: a bound on the RPCs in flight, so that excess load fails at once with
RESOURCE_EXHAUSTED (ErrorInfo reason OVERLOADED, RetryInfo) and what is admitted keeps
near-unloaded latency, instead of every call slowing down together with nothing refused.

Calls count against one of two budgets:

- runs: the agent's runs (Query, StreamQuery, AttachRun). A run holds its slot for its whole
  length, seconds to minutes mostly spent waiting on the LLM; apart, a few long runs cannot
  starve the short calls, and a burst of short calls cannot refuse runs.
- calls: every other RPC. Short (tens of milliseconds unloaded), so the bound keeps the
  queue in front of the one event loop short.

grpc.health.v1 (Check and Watch) and reflection are exempt: probes must answer under load,
and a Health.Watch would hold a slot for as long as its client watches.

A call counts from the moment its handler is looked up, as soon as its headers arrive and
before its request is read, until its task ends however it ends (answered, failed,
cancelled), as grpc.aio's own limiter counts: under load the calls waiting for the busy
event loop are in flight too, and they are what must be refused. The price: a client that
sends headers and never its request holds a slot until it cancels or its connection drops
(keepalive; in front of the server, Envoy's stream idle timeout).
"""

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import status_pb2
from prometheus_client import CollectorRegistry, Counter, Gauge

from server.errors import rich_status, to_grpc_status
from server.interceptors import Context, Handler
from services.errors import ResourceExhausted

CALLS = "calls"
RUNS = "runs"
RUN_METHODS = frozenset(
    {
        "/agentmesh.agent.v1.AgentService/Query",
        "/agentmesh.agent.v1.AgentService/StreamQuery",
        "/agentmesh.agent.v1.AgentService/AttachRun",
    }
)
# Infrastructure that must answer however loaded the server is.
EXEMPT_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def budget_of(method: str) -> str | None:
    """The budget a method counts against; None for the exempt ones."""
    if method.lstrip("/").partition("/")[0] in EXEMPT_SERVICES:
        return None
    return RUNS if method in RUN_METHODS else CALLS


@dataclass
class Budget:
    limit: int
    in_flight: int = 0

    def count(self) -> float:
        return self.in_flight

    def release(self, _task: "asyncio.Task[Any]") -> None:
        self.in_flight -= 1


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call while its budget has room; otherwise answers it with OVERLOADED
    without parsing its request, counted in `agentmesh_rpcs_shed_total{budget}`."""

    def __init__(
        self, limits: Mapping[str, int], retry_after: float, registry: CollectorRegistry
    ) -> None:
        self._budgets = {name: Budget(limit) for name, limit in limits.items()}
        self._refusals: dict[str, Handler] = {}  # by method, built on its first call
        overloaded = ResourceExhausted(
            "the server is overloaded; try again shortly",
            retry_after=retry_after,
            reason="OVERLOADED",
        )
        self._refusal = rich_status(overloaded)
        self._shed = Counter(
            "agentmesh_rpcs_shed",
            "RPCs refused with OVERLOADED because their budget (calls, runs) was full.",
            ["budget"],
            registry=registry,
        )
        in_flight = Gauge(
            "agentmesh_rpcs_in_flight",
            "RPCs admitted and not yet ended, by budget (calls, runs).",
            ["budget"],
            registry=registry,
        )
        for name, budget in self._budgets.items():
            self._shed.labels(name)  # present from the first scrape, at 0
            in_flight.labels(name).set_function(budget.count)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        name = budget_of(method)
        task = asyncio.current_task()  # the call's own task, which runs the lookup
        if name is None or task is None:
            return await continuation(handler_call_details)
        budget = self._budgets[name]
        if budget.in_flight >= budget.limit and method in self._refusals:
            # The cheap way out, without building the handler chain inside.
            self._shed.labels(name).inc()
            return self._refusals[method]
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if method not in self._refusals:
            self._refusals[method] = refusing(handler, self._refusal)
        if budget.in_flight >= budget.limit:
            self._shed.labels(name).inc()
            return self._refusals[method]
        budget.in_flight += 1
        task.add_done_callback(budget.release)
        return handler


def _unread(raw: bytes) -> None:
    """The request of a refused call: never parsed."""


def refusing(handler: Handler, status: status_pb2.Status) -> Handler:
    """A handler of the same kind as `handler` that ends every call with `status`."""
    converted = to_grpc_status(status)  # once, not for every refused call

    async def refuse(request: Any, context: Context) -> None:
        await context.abort(converted.code, converted.details, converted.trailing_metadata)

    if handler.request_streaming and handler.response_streaming:
        factory: Any = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    refused: Handler = factory(refuse, _unread, handler.response_serializer)
    return refused
