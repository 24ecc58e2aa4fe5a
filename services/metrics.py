"""The Prometheus metrics the domain emits, registered on a registry handed in by the
composition root (no module-level collectors).

Labels carry only bounded values (intents, outcomes, tool and model names, stages); never
a user id, e-mail, document id, address or free text, so the number of series does not
grow with users. Active users are counted per process in time windows and exposed as
one gauge per window.
"""

import functools
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets in seconds, from a cache hit to a slow LLM answer.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
HIT_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)
ACTIVE_WINDOWS = {"5m": 300.0, "1h": 3600.0, "24h": 86400.0}
# How an agent run ends, besides `refused` (a query refused before any run started).
RUN_OUTCOMES = ("ok", "error", "cancelled", "timeout")


class ActiveUsers:
    """Distinct users seen by this process within each window (one entry per user)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._last_seen: dict[uuid.UUID, float] = {}
        self._clock = clock

    def saw(self, user_id: uuid.UUID) -> None:
        self._last_seen[user_id] = self._clock()

    def count(self, window: str) -> int:
        now, span = self._clock(), ACTIVE_WINDOWS[window]
        if window == max(ACTIVE_WINDOWS, key=ACTIVE_WINDOWS.__getitem__):
            # The widest window also forgets users past it, bounding the memory.
            self._last_seen = {u: t for u, t in self._last_seen.items() if now - t <= span}
        return sum(1 for seen in self._last_seen.values() if now - seen <= span)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.agent_queries = Counter(
            "agentmesh_agent_queries",
            "Agent runs by intent and outcome (ok, error, cancelled, timeout, refused).",
            ["intent", "outcome"],
            registry=r,
        )
        self.agent_run_seconds = Histogram(
            "agentmesh_agent_run_seconds",
            "Agent run duration by outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.agent_first_token_seconds = Histogram(
            "agentmesh_agent_time_to_first_token_seconds",
            "Time from the start of an agent run to its first answer token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_calls = Counter(
            "agentmesh_llm_calls",
            "LLM endpoint calls by model, purpose and outcome.",
            ["model", "purpose", "outcome"],
            registry=r,
        )
        self.llm_call_seconds = Histogram(
            "agentmesh_llm_call_seconds",
            "LLM call duration by model and purpose.",
            ["model", "purpose"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_first_token_seconds = Histogram(
            "agentmesh_llm_time_to_first_token_seconds",
            "Time to the first streamed token of an LLM call.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_tokens = Counter(
            "agentmesh_llm_tokens",
            "LLM tokens by model and direction (in: prompt, out: completion).",
            ["model", "direction"],
            registry=r,
        )
        self.tool_calls = Counter(
            "agentmesh_tool_calls",
            "Agent tool calls by tool and outcome.",
            ["tool", "outcome"],
            registry=r,
        )
        self.tool_call_seconds = Histogram(
            "agentmesh_tool_call_seconds",
            "Agent tool call duration by tool.",
            ["tool"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retrieval_seconds = Histogram(
            "agentmesh_retrieval_seconds",
            "Knowledge-base search duration.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retrieval_hits = Histogram(
            "agentmesh_retrieval_hits",
            "Passages returned per knowledge-base search.",
            buckets=HIT_BUCKETS,
            registry=r,
        )
        self.ingest_documents = Counter(
            "agentmesh_ingest_documents",
            "Documents through each ingestion stage (parse, chunk, embed, index) by outcome.",
            ["stage", "outcome"],
            registry=r,
        )
        self.ingest_chunks = Counter(
            "agentmesh_ingest_chunks", "Chunks indexed by ingestion.", registry=r
        )
        self.ingest_seconds = Histogram(
            "agentmesh_ingest_seconds",
            "Ingestion duration by stage ('total' for a whole document).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.feedback = Counter(
            "agentmesh_feedback", "Feedback submissions by rating.", ["rating"], registry=r
        )
        self.logins = Counter("agentmesh_logins", "Logins by outcome.", ["outcome"], registry=r)
        self.registrations = Counter(
            "agentmesh_registrations", "Registrations by outcome.", ["outcome"], registry=r
        )
        self.rate_limited = Counter(
            "agentmesh_rate_limited",
            "Calls refused by the rate limiter, by scope (user, ip, credentials, account).",
            ["scope"],
            registry=r,
        )
        self.quota_refused = Counter(
            "agentmesh_quota_refused",
            "Agent queries refused by a quota, by metric and period.",
            ["metric", "period"],
            registry=r,
        )
        self.quota_check_failures = Counter(
            "agentmesh_quota_check_failures",
            "Quota operations the counters (Redis) failed, by operation; each admission was"
            " admitted or refused by QUOTA_FAIL_OPEN.",
            ["operation"],
            registry=r,
        )
        self.active = ActiveUsers()
        active = Gauge(
            "agentmesh_active_users",
            "Distinct users with any recorded request in the window, seen by this process.",
            ["window"],
            registry=r,
        )
        for window in ACTIVE_WINDOWS:
            active.labels(window).set_function(functools.partial(self.active.count, window))
        self._declare_known_series()

    def _declare_known_series(self) -> None:
        """Create the series whose label values are known in advance at 0, so that rate()
        sees their first increment and ratios read 0 rather than "no data"."""
        for outcome in ("ok", "failed"):
            self.logins.labels(outcome)
            self.registrations.labels(outcome)
        for rating in ("thumbs_up", "thumbs_down"):
            self.feedback.labels(rating)
        for scope in ("user", "ip", "credentials", "account"):
            self.rate_limited.labels(scope)
        for metric in ("queries", "tokens"):
            for period in ("day", "month"):
                self.quota_refused.labels(metric, period)
        for operation in ("admit", "take_back", "status", "add_tokens"):
            self.quota_check_failures.labels(operation)
        for stage in ("parse", "chunk", "embed", "index"):
            self.ingest_seconds.labels(stage)
            for outcome in ("ok", "failed"):
                self.ingest_documents.labels(stage, outcome)
        self.ingest_seconds.labels("total")

    def declare_agent_series(
        self,
        intents: Iterable[str],
        unclassified: str,
        tools: Iterable[str],
        tool_outcomes: Iterable[str],
    ) -> None:
        """Create the agent's run and tool series at 0, as the Prometheus instrumentation
        guide advises, so that rate() sees their first increment: every intent, and the
        `unclassified` one of a run that ended before it was classified, by every run
        outcome; every registered tool by every outcome. The agent passes what it knows:
        the metrics cannot depend on it."""
        for intent in [*intents, unclassified]:
            for outcome in RUN_OUTCOMES:
                self.agent_queries.labels(intent, outcome)
        # Only a query that never started a run is refused, and it has no intent yet.
        self.agent_queries.labels(unclassified, "refused")
        for outcome in RUN_OUTCOMES:
            self.agent_run_seconds.labels(outcome)
        for tool in tools:
            self.tool_call_seconds.labels(tool)
            for tool_outcome in tool_outcomes:
                self.tool_calls.labels(tool, tool_outcome)

    def declare_llm_series(self, model: str, purposes: Iterable[str]) -> None:
        """Create the series of the configured `model` at 0: calls and durations for every
        purpose (prompt) by outcome, tokens in and out, and the time to first token. Called
        only when an LLM is configured: an extractive server shows no LLM series at all,
        rather than a made-up model whose zeros would read as an idle LLM."""
        self.llm_first_token_seconds.labels(model)
        for direction in ("in", "out"):
            self.llm_tokens.labels(model, direction)
        for purpose in purposes:
            self.llm_call_seconds.labels(model, purpose)
            for outcome in ("ok", "error"):
                self.llm_calls.labels(model, purpose, outcome)

    def observe_event(self, kind: str, fields: dict[str, Any]) -> None:
        """Count one usage event (the recorder calls this for each)."""
        user_id, data, code = fields.get("user_id"), fields.get("data") or {}, fields.get("code")
        outcome = "ok" if fields.get("success") else "failed"
        # A failed login names the account someone tried, not an active user.
        if user_id is not None and not (kind == "login" and outcome == "failed"):
            self.active.saw(user_id)
        if kind == "login":
            self.logins.labels(outcome).inc()
        elif kind == "registration":
            self.registrations.labels(outcome).inc()
        elif kind == "feedback":
            self.feedback.labels(code or "unknown").inc()
        elif kind == "rate_limited":
            self.rate_limited.labels(data.get("limit", "unknown")).inc()
        elif kind == "quota_refused":
            self.quota_refused.labels(
                data.get("metric", "unknown"), data.get("period", "unknown")
            ).inc()
