"""`Tracer` that exports agent runs to Langfuse (SDK 5.x, OpenTelemetry based).

One trace per run: a root span "agent-run" (input = the query, output = the answer) with a
generation per LLM call and a span per tool call. The trace carries the user id, the
conversation id (as Langfuse session) and the run and request ids as metadata, so a log
line, a dashboard panel and a trace join on the request id.

The SDK batches spans in a background thread and POSTs them as OTLP protobuf to
`{host}/api/public/otel/v1/traces`; nothing here does I/O on the caller's thread except
`close()`, which is bounded. Every method swallows and logs its errors: tracing never fails
a query.

SDK details this module relies on (langfuse 5.0):
- `Langfuse(...)` is a per-public-key singleton (`LangfuseResourceManager._instances`): a
  second client with the same key silently reuses the first one's host, exporter and tracer
  provider. `close()` therefore removes this tracer's entry, so a later tracer with the same
  key gets its own settings.
- Without `tracer_provider=` the SDK installs its provider as the global OpenTelemetry one;
  this tracer passes its own provider so nothing global changes.
- The public `start_observation` API has no start time; generations and tool spans are
  started on the client's OpenTelemetry tracer with an explicit start time (computed from the
  recorded latency) and wrapped in the SDK's observation classes, as the SDK itself does.
- Trace-level attributes (user, session, metadata, trace name) go through the SDK's
  `propagate_attributes`, captured once into a context that every span of the run starts in,
  so they land on every span as Langfuse recommends.
"""

import contextlib
import logging
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any

from langfuse import Langfuse, LangfuseGeneration, LangfuseSpan, propagate_attributes
from langfuse._client.resource_manager import LangfuseResourceManager
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from services.agent.llm import LlmCall
from services.agent.tracing import NoopRunTrace, RunTrace

logger = logging.getLogger("agentmesh.tracing")

ROOT_SPAN_NAME = "agent-run"
# Seconds one OTLP export (with its retries) or one Langfuse API call may take.
EXPORT_TIMEOUT_SECONDS = 3
# Upper bound on close(): flush + shutdown run in a helper thread joined this long.
CLOSE_TIMEOUT_SECONDS = 5.0
# What the Langfuse server accepts as an environment name.
_ENVIRONMENT = re.compile(r"^(?!langfuse)[a-z0-9_-]{1,40}$")


def _ns(milliseconds: int) -> int:
    return max(milliseconds, 0) * 1_000_000


def _utc(nanoseconds: int) -> datetime:
    return datetime.fromtimestamp(nanoseconds / 1e9, tz=UTC)


class LangfuseRunTrace:
    """The trace of one run; every method is best effort."""

    def __init__(
        self,
        client: Langfuse,
        tracer: otel_trace.Tracer,
        context: otel_context.Context,
        root: LangfuseSpan,
        root_otel: otel_trace.Span,
    ) -> None:
        self._client = client
        self._tracer = tracer
        # Children start in the propagated context with the root span as parent.
        self._child_context = otel_trace.set_span_in_context(root_otel, context)
        self._root = root
        self._ended = False
        self._lock = threading.Lock()

    def _start_child(self, name: str, latency_ms: int) -> tuple[otel_trace.Span, int, int]:
        end = time.time_ns()
        start = end - _ns(latency_ms)
        span = self._tracer.start_span(name, context=self._child_context, start_time=start)
        return span, start, end

    def generation(self, call: LlmCall) -> None:
        try:
            span, start, end = self._start_child(call.prompt_name, call.latency_ms)
            first_token = (
                _utc(start + _ns(call.first_token_ms)) if call.first_token_ms is not None else None
            )
            metadata = {"finish_reason": call.finish_reason} if call.finish_reason else None
            LangfuseGeneration(
                otel_span=span,
                langfuse_client=self._client,
                input=call.input,
                output=call.output,
                metadata=metadata,
                model=call.model,
                usage_details={
                    "input": call.prompt_tokens,
                    "output": call.completion_tokens,
                    "total": call.prompt_tokens + call.completion_tokens,
                },
                completion_start_time=first_token,
            ).end(end_time=end)
        except Exception as error:
            logger.warning("Langfuse: recording generation failed: %r", error, exc_info=True)

    def tool(
        self, *, name: str, arguments: str, outcome: str, latency_ms: int, summary: str, error: str
    ) -> None:
        try:
            failed = outcome != "ok"
            span, _, end = self._start_child(f"tool:{name}", latency_ms)
            LangfuseSpan(
                otel_span=span,
                langfuse_client=self._client,
                input=arguments,
                output=summary,
                metadata={"outcome": outcome},
                level="ERROR" if failed else None,
                status_message=(error or outcome) if failed else None,
            ).end(end_time=end)
        except Exception as exc:
            logger.warning("Langfuse: recording tool %s failed: %r", name, exc, exc_info=True)

    def end(self, *, answer: str, intent: str, error: str | None) -> None:
        try:
            with self._lock:
                if self._ended:
                    return
                self._ended = True
            self._root.update(
                output=answer,
                metadata={"intent": intent} if intent else None,
                level="ERROR" if error else None,
                status_message=error or None,
            )
            self._root.end()
        except Exception as exc:
            logger.warning("Langfuse: ending the run's trace failed: %r", exc, exc_info=True)


class LangfuseTracer:
    """Exports each run's trace to the Langfuse server at `host`.

    The client gets its own OpenTelemetry tracer provider (no global provider is set), keys
    and host are explicit (no LANGFUSE_* variables consulted for them), and network time is
    bounded: EXPORT_TIMEOUT_SECONDS per export, CLOSE_TIMEOUT_SECONDS for close().
    """

    def __init__(
        self, *, host: str, public_key: str, secret_key: str, environment: str | None = None
    ) -> None:
        self._public_key = public_key
        self._client: Langfuse | None = None
        self._provider: TracerProvider | None = None
        self._owns_client = False
        self._closed = False
        try:
            if environment is not None and not _ENVIRONMENT.match(environment):
                logger.warning(
                    "Langfuse: environment %r is not a valid Langfuse environment name "
                    "(lowercase letters, digits, '-', '_'; not starting with 'langfuse'); "
                    "spans are sent without it",
                    environment,
                )
                environment = None
            self._provider = TracerProvider(
                resource=Resource.create({"service.name": "agentmesh"}),
                shutdown_on_exit=False,  # close() shuts it down; the SDK flushes at exit
            )
            self._client = Langfuse(
                public_key=public_key,
                secret_key=secret_key,
                # base_url, not the deprecated host=: LANGFUSE_BASE_URL would override host=.
                base_url=host.rstrip("/"),
                timeout=EXPORT_TIMEOUT_SECONDS,
                environment=environment,
                tracing_enabled=True,
                tracer_provider=self._provider,
            )
            resources = self._client._resources
            self._owns_client = (
                resources is not None and resources.tracer_provider is self._provider
            )
            if not self._owns_client:
                logger.warning(
                    "Langfuse: another Langfuse client with public key %s is open in this "
                    "process; the SDK shares it, so its host and settings are used",
                    public_key,
                )
        except Exception as error:
            logger.warning(
                "Langfuse: client set-up failed, tracing is off: %r", error, exc_info=True
            )
            self._client = None

    def start_run(
        self, *, run_id: str, request_id: str, user_id: str, conversation_id: str, query: str
    ) -> RunTrace:
        client = self._client
        if client is None or self._closed:
            return NoopRunTrace()
        try:
            tracer = client._otel_tracer
            metadata = {"run_id": run_id, "request_id": request_id}
            context = self._run_context(
                user_id=user_id, conversation_id=conversation_id, metadata=metadata
            )
            root_otel = tracer.start_span(ROOT_SPAN_NAME, context=context)
            root = LangfuseSpan(
                otel_span=root_otel, langfuse_client=client, input=query, metadata=metadata
            )
            return LangfuseRunTrace(client, tracer, context, root, root_otel)
        except Exception as error:
            logger.warning(
                "Langfuse: starting run %s's trace failed: %r", run_id, error, exc_info=True
            )
            return NoopRunTrace()

    @staticmethod
    def _run_context(
        *, user_id: str, conversation_id: str, metadata: dict[str, Any]
    ) -> otel_context.Context:
        """A context with no parent span (each run is its own trace, whatever span the caller
        is in) that carries the run's trace-level attributes for the SDK's span processor."""
        token = otel_context.attach(otel_context.Context())
        try:
            with propagate_attributes(
                user_id=user_id or None,
                session_id=conversation_id or None,
                metadata=metadata,
                trace_name=ROOT_SPAN_NAME,
            ):
                return otel_context.get_current()
        finally:
            otel_context.detach(token)

    def close(self) -> None:
        client, provider = self._client, self._provider
        if client is None or self._closed:
            return
        self._closed = True
        try:
            worker = threading.Thread(
                target=self._shutdown, args=(client, provider), name="langfuse-close", daemon=True
            )
            worker.start()
            worker.join(CLOSE_TIMEOUT_SECONDS)
            if worker.is_alive():
                logger.warning(
                    "Langfuse: flush did not finish in %.0f s; unsent spans are dropped",
                    CLOSE_TIMEOUT_SECONDS,
                )
        except Exception as error:
            logger.warning("Langfuse: closing the client failed: %r", error)
        finally:
            self._forget(client)

    def _shutdown(self, client: Langfuse, provider: TracerProvider | None) -> None:
        try:
            if not self._owns_client:
                client.flush()  # shared with another client: leave it running
                return
            client.shutdown()  # flushes spans, scores and media, stops its threads
            if provider is not None:
                provider.shutdown()  # stops the batch worker thread and the exporter
            # The SDK's shutdown leaves its (unused here) prompt-cache refresh thread running.
            with contextlib.suppress(Exception):
                client._resources.prompt_cache._task_manager.shutdown()  # type: ignore[union-attr]
        except Exception as error:
            logger.warning("Langfuse: flush at close failed: %r", error)

    def _forget(self, client: Langfuse) -> None:
        """Drop this client from the SDK's per-public-key registry, so that a later tracer
        with the same key does not get this closed one back."""
        if not self._owns_client:
            return
        with contextlib.suppress(Exception), LangfuseResourceManager._lock:
            instances = LangfuseResourceManager._instances
            if instances.get(self._public_key) is client._resources:
                del instances[self._public_key]
