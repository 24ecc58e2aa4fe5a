"""Streaming overhead of the agent: time to first token (TTFT) and delivered tokens/s of
StreamQuery, against calling the same scripted OpenAI-compatible endpoint directly, in the
same run. The endpoint waits a fixed delay before the first token and between tokens, so
the only difference between the paths is agentmesh (and Envoy for REST/SSE).

  direct       openai client → scripted endpoint                          (the baseline)
  grpc         StreamQuery over gRPC → agentmesh → scripted endpoint
  rest_sse     POST /v1/agent/query:stream → Envoy (SSE) → agentmesh → endpoint

The question is a greeting the embedding classifier recognises, so the run makes exactly
one LLM call (the streamed answer) and TTFT compares like with like. A second table shows
a knowledge-base question, whose run first asks the endpoint for the intent (structured
output) and the tools (function calling), then searches; its baseline makes the same three
endpoint calls directly. The report lists the endpoint calls each agent run made, so a
mismatch between baseline and run shows.
Targets: TTFT <= 1.10 x direct, tokens/s >= 0.95 x direct.

    python -m bench.agent_stream [--runs N] [--first-token-ms MS] [--token-ms MS] [--tokens T]
"""

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc
from openai import AsyncOpenAI

from bench.rest_tax import access_token, start_server
from tests.fake_llm import FakeLlm, Script, ToolCallScript, request_kind

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "bench" / "agent_stream.json"
TARGET_TTFT = 1.10
TARGET_TPS = 0.95
GREETING = "hello"
KB_QUESTION = "What does the handbook I uploaded say about the remote work allowance?"

# (seconds to first token, seconds from first to last token, tokens)
Sample = tuple[float, float, int]
Path_ = Callable[[str], Awaitable[Sample]]


def direct_path(llm: FakeLlm, first_calls: tuple[str, ...]) -> Path_:
    client = AsyncOpenAI(base_url=llm.base_url, api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "hello"}]
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "knowledge_base_search",
                "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
            },
        }
    ]

    async def run(_: str) -> Sample:
        started = time.perf_counter()
        for kind in first_calls:
            if kind == "structured":
                await client.chat.completions.create(
                    model="m", messages=messages, response_format={"type": "json_object"}
                )
            else:
                await client.chat.completions.create(model="m", messages=messages, tools=tools)
        stream = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        first = last = 0.0
        tokens = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                tokens += 1
        return first - started, last - first, tokens

    return run


def grpc_path(target: str, token: str) -> Path_:
    stub = agent_grpc.AgentServiceStub(grpc.aio.insecure_channel(target))
    metadata = (("authorization", f"Bearer {token}"),)

    async def run(question: str) -> Sample:
        started = time.perf_counter()
        first = last = 0.0
        tokens = 0
        request = agent_pb.StreamQueryRequest(query=question)
        async for event in stub.StreamQuery(request, metadata=metadata):
            if event.WhichOneof("event") == "token":
                last = time.perf_counter()
                first = first or last
                tokens += 1
        return first - started, last - first, tokens

    return run


def rest_path(session: aiohttp.ClientSession, token: str) -> Path_:
    headers = {"authorization": f"Bearer {token}"}

    async def run(question: str) -> Sample:
        started = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async with session.post(
            "/v1/agent/query:stream", json={"query": question}, headers=headers
        ) as response:
            async for line in response.content:
                if line.startswith(b"data:") and b'"token"' in line:
                    last = time.perf_counter()
                    first = first or last
                    tokens += 1
        return first - started, last - first, tokens

    return run


def summarise(samples: list[Sample]) -> dict[str, float]:
    ttft = statistics.median(s[0] for s in samples)
    rates = [(s[2] - 1) / s[1] for s in samples if s[1] > 0]
    return {
        "ttft_ms": ttft * 1000,
        "tokens_per_s": statistics.median(rates),
        "tokens": statistics.median(s[2] for s in samples),
    }


async def measure(
    llm: FakeLlm, paths: dict[str, Path_], question: str, runs: int
) -> dict[str, Any]:
    for path in paths.values():  # warm up connections and caches alike
        await path(question)
    samples: dict[str, list[Sample]] = {name: [] for name in paths}
    calls: dict[str, set[tuple[str, ...]]] = {name: set() for name in paths}
    for _ in range(runs):  # interleaved, so drift hits every path alike
        for name, path in paths.items():
            before = len(llm.requests)
            samples[name].append(await path(question))
            calls[name].add(tuple(request_kind(r) for r in llm.requests[before:]))
    result: dict[str, Any] = {name: summarise(rows) for name, rows in samples.items()}
    for name in paths:
        result[name]["endpoint_calls"] = [list(c) for c in sorted(calls[name])]
    base = result["direct"]
    for name in paths:
        if name != "direct":
            result[name]["ttft_ratio"] = result[name]["ttft_ms"] / base["ttft_ms"]
            result[name]["tps_ratio"] = result[name]["tokens_per_s"] / base["tokens_per_s"]
    return result


async def run(runs: int, first_token_ms: float, token_ms: float, tokens: int) -> dict[str, Any]:
    llm = FakeLlm()
    await llm.start()
    answer = " ".join(f"word{n}" for n in range(tokens))
    llm.script = Script(
        intent="knowledge_base",
        tool_calls=[ToolCallScript("knowledge_base_search", '{"query": "remote work allowance"}')],
        answer=answer,
        first_token_delay=first_token_ms / 1000,
        token_delay=token_ms / 1000,
        completion_delay=first_token_ms / 1000,
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = await start_server(
            Path(tmp),
            {
                "AGENTMESH_LLM_BASE_URL": llm.base_url,
                "AGENTMESH_LLM_MAX_RETRIES": "0",
            },
        )
        try:
            token = await access_token(server.grpc, "agent-bench@example.com")
            async with aiohttp.ClientSession(base_url=f"http://{server.http}") as rest:
                served = {"grpc": grpc_path(server.grpc, token), "rest_sse": rest_path(rest, token)}
                results["greeting"] = await measure(
                    llm, {"direct": direct_path(llm, ()), **served}, GREETING, runs
                )
                results["knowledge_base"] = await measure(
                    llm,
                    {"direct": direct_path(llm, ("structured", "tools")), **served},
                    KB_QUESTION,
                    runs,
                )
        finally:
            server.process.terminate()
            await server.process.wait()
            await llm.stop()
    return {
        "benchmark": "agent_stream",
        "runs": runs,
        "endpoint": {"first_token_ms": first_token_ms, "token_ms": token_ms, "tokens": tokens},
        "cpus": os.cpu_count(),
        "targets": {"ttft_ratio_max": TARGET_TTFT, "tps_ratio_min": TARGET_TPS},
        "results": results,
    }


def print_report(report: dict[str, Any]) -> None:
    endpoint = report["endpoint"]
    print(
        f"scripted endpoint: first token after {endpoint['first_token_ms']} ms, "
        f"then one token every {endpoint['token_ms']} ms, {endpoint['tokens']} tokens; "
        f"{report['runs']} runs per path"
    )
    for route, block in report["results"].items():
        print(f"\n{route}")
        header = f"{'TTFT ÷ direct':>14} {'tok/s ÷ direct':>15}"
        print(f"  {'path':<10} {'TTFT ms':>9} {'tokens/s':>9} {header}")
        for name, row in block.items():
            ttft_ratio = row.get("ttft_ratio")
            tps_ratio = row.get("tps_ratio")
            ratios = (
                f"{ttft_ratio:14.3f} {tps_ratio:15.3f}"
                if ttft_ratio is not None and tps_ratio is not None
                else f"{'(baseline)':>14} {'':>15}"
            )
            print(f"  {name:<10} {row['ttft_ms']:9.1f} {row['tokens_per_s']:9.1f} {ratios}")
        for name, row in block.items():
            print(f"  {name} endpoint calls per run: {row['endpoint_calls']}")
        for name, row in block.items():
            if name == "direct":
                continue
            ttft_ok = "ok" if row["ttft_ratio"] <= TARGET_TTFT else "MISSED"
            tps_ok = "ok" if row["tps_ratio"] >= TARGET_TPS else "MISSED"
            print(
                f"  {name}: TTFT {row['ttft_ratio']:.3f} (≤ {TARGET_TTFT}: {ttft_ok}), "
                f"tokens/s {row['tps_ratio']:.3f} (≥ {TARGET_TPS}: {tps_ok})"
            )
    print(f"\nreport: {REPORT}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20, help="runs per path and route")
    parser.add_argument("--first-token-ms", type=float, default=300.0)
    parser.add_argument("--token-ms", type=float, default=20.0)
    parser.add_argument("--tokens", type=int, default=60)
    args = parser.parse_args()
    report = asyncio.run(run(args.runs, args.first_token_ms, args.token_ms, args.tokens))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2))
    print_report(report)


if __name__ == "__main__":
    main()
