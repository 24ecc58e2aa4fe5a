"""Load shedding: a bound on the RPCs in flight, so that excess load fails at once with
RESOURCE_EXHAUSTED (ErrorInfo reason OVERLOADED, RetryInfo) and what is admitted keeps
near-unloaded latency, instead of every call slowing down together with nothing refused.

Calls count against one of two budgets:

- runs: the agent's runs (Query, StreamQuery, AttachRun, and A2A's SendMessage,
  SendStreamingMessage, SubscribeToTask). A run holds its slot for its whole
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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from server.errors import rich_status
from services.errors import ResourceExhausted

CALLS = "calls"
RUNS = "runs"
RUN_METHODS = frozenset(
    {
        "/agentmesh.agent.v1.AgentService/Query",
        "/agentmesh.agent.v1.AgentService/StreamQuery",
        "/agentmesh.agent.v1.AgentService/AttachRun",
        # The same runs over A2A (issue 22); a blocking SendMessage lasts its run.
        "/lf.a2a.v1.A2AService/SendMessage",
        "/lf.a2a.v1.A2AService/SendStreamingMessage",
        "/lf.a2a.v1.A2AService/SubscribeToTask",
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
    name: str
    limit: int
    in_flight: int = 0

    def count(self) -> float:
        return self.in_flight

    def release(self, _task: "asyncio.Task[Any]") -> None:
        self.in_flight -= 1


class Admission:
    """Admits a call while its budget has room; otherwise the call pipeline answers it
    with OVERLOADED without parsing its request (`refusing`), counted in
    `agentmesh_rpcs_shed_total{budget}`."""

    def __init__(
        self, limits: Mapping[str, int], retry_after: float, registry: CollectorRegistry
    ) -> None:
        self._budgets = {name: Budget(name, limit) for name, limit in limits.items()}
        overloaded = ResourceExhausted(
            "the server is overloaded; try again shortly",
            retry_after=retry_after,
            reason="OVERLOADED",
        )
        self.refusal = rich_status(overloaded)
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
        self._shed_by_budget = {name: self._shed.labels(name) for name in self._budgets}
        for name, budget in self._budgets.items():
            in_flight.labels(name).set_function(budget.count)

    def budget(self, method: str) -> Budget | None:
        """The budget `method` counts against; None for the exempt ones."""
        name = budget_of(method)
        return None if name is None else self._budgets[name]

    def admit(self, budget: Budget | None) -> bool:
        """Whether a call on `budget` may run now; called from the lookup of its handler,
        which runs in the call's own task: an admitted call holds its slot until that task
        ends, however it ends."""
        task = asyncio.current_task()
        if budget is None or task is None:
            return True
        if budget.in_flight >= budget.limit:
            self._shed_by_budget[budget.name].inc()
            return False
        budget.in_flight += 1
        task.add_done_callback(budget.release)
        return True
