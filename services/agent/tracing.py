"""Tracing of agent runs: one trace per run with its LLM generations and tool spans.

`NoopTracer` is used when Langfuse keys are not set; `LangfuseTracer` (tracing_langfuse.py)
exports to Langfuse. A tracer never raises into a run: tracing is best effort.
"""

from typing import Protocol

from services.agent.llm import LlmCall


class RunTrace(Protocol):
    def generation(self, call: LlmCall) -> None:
        """Record one finished LLM call (model, prompt name, input, output, tokens, latency)."""

    def tool(
        self, *, name: str, arguments: str, outcome: str, latency_ms: int, summary: str, error: str
    ) -> None:
        """Record one finished tool call as a span."""

    def end(self, *, answer: str, intent: str, error: str | None) -> None:
        """Close the run's trace with its answer, or the error it failed with."""


class Tracer(Protocol):
    def start_run(
        self, *, run_id: str, request_id: str, user_id: str, conversation_id: str, query: str
    ) -> RunTrace:
        """Open the trace of one agent run, tagged with the user and conversation."""

    def close(self) -> None:
        """Flush what is buffered and stop exporting (at shutdown)."""


class NoopRunTrace:
    def generation(self, call: LlmCall) -> None:
        pass

    def tool(
        self, *, name: str, arguments: str, outcome: str, latency_ms: int, summary: str, error: str
    ) -> None:
        pass

    def end(self, *, answer: str, intent: str, error: str | None) -> None:
        pass


class NoopTracer:
    def start_run(
        self, *, run_id: str, request_id: str, user_id: str, conversation_id: str, query: str
    ) -> RunTrace:
        return NoopRunTrace()

    def close(self) -> None:
        pass
