"""The one LLM client path: the official `openai` async client against any OpenAI-compatible
endpoint (OpenAI, vLLM, Ollama, llama.cpp's server), with every call's usage recorded."""

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import openai
from openai import AsyncOpenAI

from services.errors import Unavailable
from services.metrics import Metrics

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class LlmSettings:
    base_url: str | None
    api_key: str | None
    model: str
    timeout: float
    max_retries: int
    temperature: float
    max_tokens: int


@dataclass
class LlmCall:
    """One call to the model, for usage accounting and tracing."""

    prompt_name: str
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: int = 0
    first_token_ms: int | None = None
    finish_reason: str = ""
    input: Messages = field(default_factory=list)
    output: str = ""


@dataclass(frozen=True)
class RawToolCall:
    """A tool call as the model wrote it: arguments not yet parsed or validated."""

    call_id: str
    name: str
    arguments: str


# The metrics' `purpose` label of each prompt; other prompts are named by their file.
PURPOSES = {
    "agent/intent_classification.j2": "classify",
    "agent/tool_selection.j2": "plan",
    "agent/response_synthesis.j2": "synthesize",
    "agent/conversation_summary.j2": "summarize",
}


def purpose_of(prompt_name: str) -> str:
    return PURPOSES.get(prompt_name) or prompt_name.rsplit("/", 1)[-1].removesuffix(".j2")


class LlmUnavailable(Unavailable):
    reason = "LLM_UNAVAILABLE"


def _unavailable(error: openai.OpenAIError) -> LlmUnavailable:
    if isinstance(error, openai.APIStatusError):
        detail = f"the LLM endpoint answered HTTP {error.status_code}"
    elif isinstance(error, openai.APITimeoutError):
        detail = "the LLM endpoint did not answer in time"
    else:
        detail = "the LLM endpoint cannot be reached"
    return LlmUnavailable(detail)


def _elapsed_ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)


class ChatModel:
    """Chat completions with streaming, function calling and structured output."""

    def __init__(self, settings: LlmSettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._client = AsyncOpenAI(
            base_url=settings.base_url,
            # Local endpoints take any key; the client insists on one.
            api_key=settings.api_key or "unused",
            timeout=settings.timeout,
            max_retries=settings.max_retries,
        )

    @property
    def model(self) -> str:
        return self._settings.model

    async def close(self) -> None:
        await self._client.close()

    def _record(self, call: LlmCall, usage: Any, started: float) -> None:
        call.latency_ms = _elapsed_ms(started)
        if usage is not None:
            call.prompt_tokens = usage.prompt_tokens or 0
            call.completion_tokens = usage.completion_tokens or 0

    def _observe(self, call: LlmCall, started: float, *, failed: bool) -> None:
        """The call's metrics: outcome, duration, tokens and time to first token."""
        m, purpose = self._metrics, purpose_of(call.prompt_name)
        m.llm_calls.labels(call.model, purpose, "error" if failed else "ok").inc()
        m.llm_call_seconds.labels(call.model, purpose).observe(time.perf_counter() - started)
        if failed:
            return
        m.llm_tokens.labels(call.model, "in").inc(call.prompt_tokens)
        m.llm_tokens.labels(call.model, "out").inc(call.completion_tokens)
        if call.first_token_ms is not None:
            m.llm_first_token_seconds.labels(call.model).observe(call.first_token_ms / 1000)

    async def _create(self, call: LlmCall, **params: Any) -> Any:
        """One non-streamed completion, timed and with its usage recorded on `call`."""
        started = time.perf_counter()
        try:
            response = await self._client.chat.completions.create(
                model=self.model,
                messages=call.input,  # type: ignore[arg-type]
                **params,
            )
        except openai.OpenAIError as error:
            self._observe(call, started, failed=True)
            raise _unavailable(error) from error
        self._record(call, response.usage, started)
        self._observe(call, started, failed=False)
        return response

    async def structured(
        self, prompt_name: str, messages: Messages, schema: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, LlmCall]:
        """A JSON object following `schema` (None when the reply is not valid JSON)."""
        call = LlmCall(prompt_name, self.model, input=messages)
        response = await self._create(
            call,
            temperature=0,
            max_tokens=64,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            },
        )
        call.output = (response.choices[0].message.content or "") if response.choices else ""
        try:
            value = json.loads(call.output)
        except ValueError:
            return None, call
        return (value if isinstance(value, dict) else None), call

    async def tool_calls(
        self, prompt_name: str, messages: Messages, tools: list[dict[str, Any]]
    ) -> tuple[list[RawToolCall], LlmCall]:
        """The tool calls the model chooses among `tools` (possibly none)."""
        call = LlmCall(prompt_name, self.model, input=messages)
        response = await self._create(
            call, tools=tools, tool_choice="auto", temperature=0, max_tokens=512
        )
        message = response.choices[0].message if response.choices else None
        raw = [
            RawToolCall(c.id, c.function.name, c.function.arguments or "")
            for c in (message.tool_calls or [] if message else [])
            if c.type == "function"
        ]
        call.output = json.dumps([vars(r) for r in raw])
        return raw, call

    async def complete(
        self, prompt_name: str, messages: Messages, max_tokens: int
    ) -> tuple[str, LlmCall]:
        """A whole reply, not streamed (summaries)."""
        call = LlmCall(prompt_name, self.model, input=messages)
        response = await self._create(call, temperature=0, max_tokens=max_tokens)
        call.output = (response.choices[0].message.content or "") if response.choices else ""
        return call.output, call

    async def stream(
        self, prompt_name: str, messages: Messages, call: LlmCall
    ) -> AsyncIterator[str]:
        """The answer's text deltas as the endpoint sends them; `call` receives usage and
        latency. Closing the iterator (or cancelling its task) closes the HTTP stream."""
        call.input = messages
        started = time.perf_counter()
        deltas = 0
        try:
            stream = await self._client.chat.completions.create(  # type: ignore[call-overload]
                model=self.model,
                messages=messages,
                temperature=self._settings.temperature,
                max_tokens=self._settings.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        self._record(call, chunk.usage, started)
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            call.finish_reason = choice.finish_reason
                        text = choice.delta.content if choice.delta else None
                        if text:
                            deltas += 1
                            if call.first_token_ms is None:
                                call.first_token_ms = _elapsed_ms(started)
                            call.output += text
                            yield text
            finally:
                await stream.close()
        except openai.OpenAIError as error:
            self._observe(call, started, failed=True)
            raise _unavailable(error) from error
        call.latency_ms = _elapsed_ms(started)
        if not call.completion_tokens and call.output:
            # Some servers (llama.cpp's) send no usage chunk on streams: count the deltas
            # (about one token each) and estimate the prompt at ~4 characters a token.
            call.completion_tokens = deltas
            call.prompt_tokens = sum(len(str(m.get("content") or "")) for m in messages) // 4
        self._observe(call, started, failed=False)
