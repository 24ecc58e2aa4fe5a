"""A scripted OpenAI-compatible HTTP server: real sockets, real SSE streaming, tool calls.

The one stand-in of the test suite. It answers /v1/chat/completions by the kind of request
the agent makes: `response_format` → intent JSON, `tools` → tool calls, `stream` → the
scripted answer token by token, otherwise a plain completion (summaries). It records every
request and whether a stream was cut off by the client.
"""

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.local_http import LocalHttpServer

JSON = dict[str, Any]
Answer = str | Callable[[JSON], str]


@dataclass
class ToolCallScript:
    name: str
    arguments: str  # raw JSON text, possibly invalid on purpose


@dataclass
class Script:
    intent: str = "knowledge_base"
    tool_calls: list[ToolCallScript] | Callable[[JSON], list[ToolCallScript]] = field(
        default_factory=list
    )
    answer: Answer = "The answer."
    summary: str = "Earlier the user asked about things."
    first_token_delay: float = 0.0  # seconds before the first streamed token
    token_delay: float = 0.0  # seconds between streamed tokens
    completion_delay: float = 0.0  # seconds before a non-streamed reply
    fail_status: int | None = None  # answer every request with this HTTP status
    usage: bool = True  # send a usage chunk when asked to
    gate: asyncio.Event | None = None  # when set, the stream waits for it after one token


@dataclass
class StreamRecord:
    tokens_planned: int
    tokens_sent: int = 0
    cut_off: bool = False  # the client went away before the end
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def _words(text: str) -> list[str]:
    """The answer split into tokens that concatenate back to it exactly."""
    pieces, current = [], ""
    for char in text:
        current += char
        if char == " ":
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def request_kind(body: JSON) -> str:
    """What the agent asked for: structured, tools, stream or complete."""
    if body.get("response_format"):
        return "structured"
    if body.get("tools"):
        return "tools"
    return "stream" if body.get("stream") else "complete"


def _prompt_tokens(body: JSON) -> int:
    return sum(len(str(m.get("content") or "")) for m in body.get("messages", [])) // 4 + 1


class FakeLlm(LocalHttpServer):
    def __init__(self) -> None:
        super().__init__()
        self.script = Script()
        self.requests: list[JSON] = []
        self.streams: list[StreamRecord] = []

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def requests_of(self, kind: str) -> list[JSON]:
        return [r for r in self.requests if request_kind(r) == kind]

    def reset(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.requests.clear()
        self.streams.clear()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._completions)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body: JSON = await request.json()
        self.requests.append(body)
        script = self.script
        if script.fail_status is not None:
            return web.json_response(
                {"error": {"message": "scripted failure", "type": "server_error"}},
                status=script.fail_status,
            )
        kind = request_kind(body)
        if kind == "stream":
            return await self._stream(request, body, script)
        await asyncio.sleep(script.completion_delay)
        message: JSON = {"role": "assistant", "content": None}
        if kind == "structured":
            message["content"] = json.dumps({"intent": script.intent})
        elif kind == "tools":
            calls = script.tool_calls(body) if callable(script.tool_calls) else script.tool_calls
            message["tool_calls"] = [
                {
                    "id": f"call_{uuid.uuid4().hex[:8]}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in calls
            ]
        else:
            message["content"] = script.summary
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "scripted"),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": _prompt_tokens(body),
                    "completion_tokens": 7,
                    "total_tokens": _prompt_tokens(body) + 7,
                },
            }
        )

    async def _stream(self, request: web.Request, body: JSON, script: Script) -> web.StreamResponse:
        answer = script.answer(body) if callable(script.answer) else script.answer
        tokens = _words(answer)
        record = StreamRecord(tokens_planned=len(tokens))
        self.streams.append(record)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "scripted"),
        }

        async def send(payload: JSON) -> None:
            await response.write(f"data: {json.dumps({**base, **payload})}\n\n".encode())

        try:
            await asyncio.sleep(script.first_token_delay)
            for number, token in enumerate(tokens):
                if number:
                    await asyncio.sleep(script.token_delay)
                delta = {"content": token} if number else {"role": "assistant", "content": token}
                await send({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                record.tokens_sent += 1
                if number == 0 and script.gate is not None:
                    await script.gate.wait()
            await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            if script.usage and (body.get("stream_options") or {}).get("include_usage"):
                await send(
                    {
                        "choices": [],
                        "usage": {
                            "prompt_tokens": _prompt_tokens(body),
                            "completion_tokens": len(tokens),
                            "total_tokens": _prompt_tokens(body) + len(tokens),
                        },
                    }
                )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            record.cut_off = True
            raise
        finally:
            record.finished.set()
        return response
