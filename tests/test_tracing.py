"""LangfuseTracer against a real local HTTP endpoint that records what the Langfuse SDK sends
(OTLP protobuf on POST /api/public/otel/v1/traces), decoded with opentelemetry-proto."""

import base64
import json
import logging
import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

from services.agent import tracing_langfuse
from services.agent.llm import LlmCall
from services.agent.tracing import NoopRunTrace, Tracer
from services.agent.tracing_langfuse import LangfuseTracer
from tests.langfuse_recorder import Recorder, serving, span_attributes


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with serving() as started:
        yield started


@pytest.fixture(params=[500, 503])
def failing_recorder(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """An endpoint that fails every export: 500 is final for the exporter, 503 is retried."""
    with serving(status=request.param) as started:
        yield started


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _calls() -> tuple[LlmCall, LlmCall]:
    first = LlmCall(
        "agent/intent.j2",
        "gemma-3-270m",
        prompt_tokens=123,
        completion_tokens=7,
        latency_ms=250,
        first_token_ms=40,
        finish_reason="stop",
        input=[{"role": "system", "content": "classify"}, {"role": "user", "content": "hi"}],
        output='{"intent": "search"}',
    )
    second = LlmCall(
        "agent/answer.j2",
        "gemma-3-270m-answer",
        prompt_tokens=900,
        completion_tokens=321,
        latency_ms=1500,
        input=[{"role": "user", "content": "answer please"}],
        output="The answer is 42.",
    )
    return first, second


def _run(tracer: Tracer, *, run_id: str = "run-1") -> None:
    trace = tracer.start_run(
        run_id=run_id,
        request_id="req-abc",
        user_id="user-17",
        conversation_id="conv-99",
        query="what is the answer?",
    )
    for call in _calls():
        trace.generation(call)
    trace.tool(
        name="search_docs",
        arguments='{"q": "answer"}',
        outcome="ok",
        latency_ms=30,
        summary="3 passages",
        error="",
    )
    trace.tool(
        name="fetch_page",
        arguments='{"url": "http://x"}',
        outcome="error",
        latency_ms=12,
        summary="",
        error="fetch timed out",
    )
    trace.end(answer="42", intent="search", error=None)


def test_a_run_is_exported_as_one_trace(recorder: Recorder) -> None:
    global_provider = otel_trace.get_tracer_provider()
    threads = set(threading.enumerate())
    tracer = LangfuseTracer(
        host=recorder.url, public_key="pk-lf-one", secret_key="sk-lf-one", environment="test"
    )
    # The tracer has its own provider: the process-wide OpenTelemetry one is left alone.
    assert otel_trace.get_tracer_provider() is global_provider
    # A span the caller is in (other instrumentation) neither parents nor receives the run.
    with TracerProvider().get_tracer("other").start_as_current_span("outer") as outer:
        _run(tracer)
    tracer.close()
    assert set(threading.enumerate()) <= threads  # close() stopped the SDK's threads
    assert isinstance(outer, ReadableSpan)
    assert "user.id" not in (outer.attributes or {})

    spans = recorder.spans()
    assert len(spans) == 5, [s.name for s in spans]
    assert len({s.trace_id for s in spans}) == 1
    assert spans[0].trace_id != outer.get_span_context().trace_id.to_bytes(16, "big")
    by_name = {s.name: s for s in spans}
    root = by_name["agent-run"]
    assert root.parent_span_id == b""
    children = [s for s in spans if s is not root]
    assert all(s.parent_span_id == root.span_id for s in children)

    # Trace-level attributes are propagated to every span of the run.
    for span in spans:
        attributes = span_attributes(span)
        assert attributes["user.id"] == "user-17"
        assert attributes["session.id"] == "conv-99"
        assert json.loads(attributes["langfuse.trace.metadata.run_id"]) == "run-1"
        assert json.loads(attributes["langfuse.trace.metadata.request_id"]) == "req-abc"
        assert attributes["langfuse.trace.name"] == "agent-run"
        assert attributes["langfuse.environment"] == "test"

    root_attributes = span_attributes(root)
    assert root_attributes["langfuse.observation.type"] == "span"
    assert root_attributes["langfuse.observation.input"] == "what is the answer?"
    assert root_attributes["langfuse.observation.output"] == "42"
    assert json.loads(root_attributes["langfuse.observation.metadata.intent"]) == "search"
    assert "langfuse.observation.level" not in root_attributes
    assert root.end_time_unix_nano >= max(s.end_time_unix_nano for s in children)

    for call in _calls():
        generation = by_name[call.prompt_name]
        attributes = span_attributes(generation)
        assert attributes["langfuse.observation.type"] == "generation"
        assert attributes["langfuse.observation.model.name"] == call.model
        assert json.loads(attributes["langfuse.observation.usage_details"]) == {
            "input": call.prompt_tokens,
            "output": call.completion_tokens,
            "total": call.prompt_tokens + call.completion_tokens,
        }
        assert json.loads(attributes["langfuse.observation.input"]) == call.input
        assert attributes["langfuse.observation.output"] == call.output
        duration = generation.end_time_unix_nano - generation.start_time_unix_nano
        assert duration == call.latency_ms * 1_000_000
        if call.first_token_ms is None:
            assert "langfuse.observation.completion_start_time" not in attributes
        else:
            first_token = datetime.fromisoformat(
                json.loads(attributes["langfuse.observation.completion_start_time"])
            )
            started = first_token.timestamp() * 1e9 - generation.start_time_unix_nano
            assert abs(started - call.first_token_ms * 1_000_000) < 1_000_000
    assert json.loads(
        span_attributes(by_name["agent/intent.j2"])["langfuse.observation.metadata.finish_reason"]
    ) == ("stop")

    ok, failed = by_name["tool:search_docs"], by_name["tool:fetch_page"]
    ok_attributes, failed_attributes = span_attributes(ok), span_attributes(failed)
    assert ok_attributes["langfuse.observation.input"] == '{"q": "answer"}'
    assert ok_attributes["langfuse.observation.output"] == "3 passages"
    assert "langfuse.observation.level" not in ok_attributes
    assert ok.status.code != Status.STATUS_CODE_ERROR
    assert ok.end_time_unix_nano - ok.start_time_unix_nano == 30 * 1_000_000
    assert failed_attributes["langfuse.observation.input"] == '{"url": "http://x"}'
    assert failed_attributes["langfuse.observation.level"] == "ERROR"
    assert failed_attributes["langfuse.observation.status_message"] == "fetch timed out"
    assert json.loads(failed_attributes["langfuse.observation.metadata.outcome"]) == "error"
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert failed.status.message == "fetch timed out"

    for export in recorder.exports:
        scheme, _, credentials = export.headers["authorization"].partition(" ")
        assert scheme == "Basic"
        assert base64.b64decode(credentials).decode() == "pk-lf-one:sk-lf-one"
        assert export.headers["x-langfuse-public-key"] == "pk-lf-one"


def test_a_failed_run_marks_the_root_span_as_error(recorder: Recorder) -> None:
    tracer = LangfuseTracer(host=recorder.url, public_key="pk-lf-err", secret_key="sk")
    trace = tracer.start_run(
        run_id="run-x", request_id="", user_id="u", conversation_id="c", query="q"
    )
    trace.end(answer="", intent="", error="CancelledError")
    trace.end(answer="late", intent="other", error=None)  # a second end changes nothing
    tracer.close()

    (root,) = recorder.spans()
    attributes = span_attributes(root)
    assert attributes["langfuse.observation.level"] == "ERROR"
    assert attributes["langfuse.observation.status_message"] == "CancelledError"
    assert "langfuse.observation.metadata.intent" not in attributes
    assert root.status.code == Status.STATUS_CODE_ERROR


def test_a_second_tracer_with_the_same_key_uses_its_own_host(recorder: Recorder) -> None:
    # The SDK keeps one client per public key; close() must release it.
    with serving() as first:
        tracer = LangfuseTracer(host=first.url, public_key="pk-lf-same", secret_key="sk")
        _run(tracer, run_id="first")
        tracer.close()
    tracer = LangfuseTracer(host=recorder.url, public_key="pk-lf-same", secret_key="sk")
    _run(tracer, run_id="second")
    tracer.close()

    run_ids = {
        json.loads(span_attributes(s)["langfuse.trace.metadata.run_id"]) for s in recorder.spans()
    }
    assert run_ids == {"second"}
    assert len(recorder.spans()) == 5
    assert first.spans() and all(
        json.loads(span_attributes(s)["langfuse.trace.metadata.run_id"]) == "first"
        for s in first.spans()
    )


def test_a_failing_endpoint_fails_nothing(failing_recorder: Recorder) -> None:
    tracer = LangfuseTracer(
        host=failing_recorder.url,
        public_key=f"pk-lf-{failing_recorder.status}",
        secret_key="sk",
    )
    _run(tracer)
    tracer.close()
    # The SDK did send (and retried a 503 within its timeout), and nothing was raised.
    assert failing_recorder.spans()
    if failing_recorder.status == 503:
        assert len(failing_recorder.exports) > 1
    assert {s.name for s in failing_recorder.spans()} >= {"agent-run", "tool:fetch_page"}
    # After close: a late run neither raises nor exports.
    exported = len(failing_recorder.exports)
    _run(tracer, run_id="late")
    tracer.close()
    assert len(failing_recorder.exports) == exported


def test_an_unreachable_endpoint_fails_nothing() -> None:
    tracer = LangfuseTracer(
        host=f"http://127.0.0.1:{_free_port()}", public_key="pk-lf-down", secret_key="sk"
    )
    _run(tracer)
    tracer.close()


def test_an_endpoint_that_never_answers_fails_nothing() -> None:
    # Accepts connections (the kernel's backlog) but never reads or answers: a hung server.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        tracer = LangfuseTracer(
            host=f"http://127.0.0.1:{silent.getsockname()[1]}",
            public_key="pk-lf-hung",
            secret_key="sk",
        )
        _run(tracer)
        tracer.close()


def test_sdk_errors_are_logged_not_raised(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("sdk bug")

    tracer = LangfuseTracer(host=recorder.url, public_key="pk-lf-bug", secret_key="sk")
    monkeypatch.setattr(tracing_langfuse, "LangfuseGeneration", broken)
    with caplog.at_level(logging.WARNING, logger="agentmesh.tracing"):
        _run(tracer)
        monkeypatch.setattr(tracing_langfuse, "LangfuseSpan", broken)
        assert isinstance(
            tracer.start_run(
                run_id="r", request_id="q", user_id="u", conversation_id="c", query="x"
            ),
            NoopRunTrace,
        )
    tracer.close()

    warnings = [r for r in caplog.records if r.name == "agentmesh.tracing"]
    assert len(warnings) == 3  # two generations, then the start of the second run
    assert all(r.levelno == logging.WARNING and "sdk bug" in r.getMessage() for r in warnings)
    # What did not fail was still exported: the run with its tool spans.
    assert sorted(s.name for s in recorder.spans()) == [
        "agent-run",
        "tool:fetch_page",
        "tool:search_docs",
    ]


def test_an_invalid_environment_is_dropped(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="agentmesh.tracing"):
        tracer = LangfuseTracer(
            host=recorder.url, public_key="pk-lf-env", secret_key="sk", environment="Prod EU"
        )
    _run(tracer)
    tracer.close()
    assert any("environment" in r.getMessage() for r in caplog.records)
    assert recorder.spans()
    assert all(
        span_attributes(s).get("langfuse.environment") != "Prod EU" for s in recorder.spans()
    )
