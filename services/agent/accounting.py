"""What a run leaves behind besides its answer, recorded in one place however it ends:
usage events, metrics, the caller's quota tokens and the end of its trace."""

import time

from services.agent.context import AgentDeps, RunContext
from services.agent.events import StepChanged, TokenDelta
from services.agent.models import Message
from services.auth.principal import Principal
from services.errors import DomainError, ResourceExhausted
from services.usage_events.recorder import EventKind

# The intent label of a run that ended before its question was classified.
UNKNOWN_INTENT = "unknown"


def record_refused(deps: AgentDeps, principal: Principal, refusal: ResourceExhausted) -> None:
    """A query the caller's quota refused before any run started."""
    deps.events.record(
        EventKind.QUOTA_REFUSED,
        user_id=principal.user_id,
        code=refusal.reason,
        data=refusal.metadata,  # which quota: metric and period
    )
    deps.metrics.agent_queries.labels(UNKNOWN_INTENT, "refused").inc()


class RunAccount:
    """The bookkeeping of one run: told what the run reports as it goes, then how it ended
    (exactly one of completed, timed_out, cancelled, failed)."""

    def __init__(self, context: RunContext) -> None:
        self._context = context
        self._deps = context.deps
        self._intent = UNKNOWN_INTENT
        self._first_token = True

    def progress(self, event: object) -> None:
        """Note the run's intent once classified, and the time to its first token."""
        if isinstance(event, StepChanged) and event.intent:
            self._intent = event.intent
        elif isinstance(event, TokenDelta) and self._first_token:
            self._first_token = False
            self._deps.metrics.agent_first_token_seconds.observe(self._seconds())

    async def completed(self, message: Message) -> None:
        """The answer is stored: close the trace, record its usage, charge its tokens."""
        self._context.trace.end(answer=message.content, intent=self._intent, error=None)
        self._record_completed(message)
        self._count("ok")
        await self._deps.quotas.add_tokens(
            self._context.principal, message.prompt_tokens + message.completion_tokens
        )

    def timed_out(self) -> None:
        """The run outlived its time budget."""
        self._ended("AGENT_RUN_TIMEOUT", outcome="timeout", trace_error="run timeout")

    def cancelled(self, error: BaseException) -> None:
        """The caller went away: its RPC was cancelled, or it closed the stream."""
        name = type(error).__name__
        self._ended(name, outcome="cancelled", trace_error=name)

    def failed(self, error: BaseException) -> None:
        """The run raised `error` (a DomainError's reason is recorded, or else its type)."""
        reason = error.reason if isinstance(error, DomainError) else type(error).__name__
        self._ended(reason, outcome="error", trace_error=type(error).__name__)

    def _ended(self, reason: str, *, outcome: str, trace_error: str) -> None:
        self._context.trace.end(answer="", intent="", error=trace_error)
        self._deps.events.record(
            EventKind.AGENT_QUERY,
            user_id=self._context.principal.user_id,
            latency_ms=self._seconds() * 1000,
            success=False,
            code=reason,
        )
        self._count(outcome)

    def _record_completed(self, message: Message) -> None:
        """Usage events of a finished run: each tool call it made, then the query."""
        events, user_id = self._deps.events, self._context.principal.user_id
        for call in message.tool_calls:
            events.record(
                EventKind.TOOL_CALL,
                user_id=user_id,
                tool=call["name"],
                code=call["outcome"],
                latency_ms=call["latency_ms"],
                success=call["outcome"] == "ok",
            )
        events.record(
            EventKind.AGENT_QUERY,
            user_id=user_id,
            model=message.model,
            tokens_in=message.prompt_tokens,
            tokens_out=message.completion_tokens,
            latency_ms=message.latency_ms,
            success=True,
            data={"mode": message.mode, "tools": [c["name"] for c in message.tool_calls]},
        )

    def _count(self, outcome: str) -> None:
        metrics = self._deps.metrics
        metrics.agent_queries.labels(self._intent, outcome).inc()
        metrics.agent_run_seconds.labels(outcome).observe(self._seconds())

    def _seconds(self) -> float:
        return time.perf_counter() - self._context.started
