"""An agent process apart from the knowledge base: it loads no embedding model (nor torch),
classifies questions with the knowledge process's model (IndexingService.EmbedTexts, with
the service credential), and still answers while that process cannot be reached: the LLM
classifies then, and the next question tries the model again."""

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from agentmesh.agent.v1 import agent_service_pb2 as agent_pb

from server.main import Application
from tests.agent import of_kind, stream
from tests.backends import Database
from tests.fake_llm import FakeLlm, Script
from tests.harness import TEST_JWT_SECRET, Stubs, new_user, rpc_count, running_app
from tests.test_lifecycle import cli_env, serving
from tests.test_split_services import INDEX_TOKEN, STATELESS, black_hole, split_apps

MODEL_LIBRARIES = ("torch", "sentence_transformers", "transformers")


def classified(events: list[agent_pb.StreamQueryResponse]) -> agent_pb.StepEvent:
    """The classify step's COMPLETED event of a run."""
    steps: list[agent_pb.StepEvent] = of_kind(events, "step")
    [done] = [
        step
        for step in steps
        if step.step == agent_pb.STEP_CLASSIFY_INTENT
        and step.status == agent_pb.STEP_STATUS_COMPLETED
    ]
    assert len(of_kind(events, "completed")) == 1, "the run did not complete"
    return done


async def embed_calls(app: Application) -> float:
    """EmbedTexts calls the application answered, by its own /metrics."""
    return await rpc_count(app, "grpc_server_handled_total", "EmbedTexts")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_agent_classifies_with_the_knowledge_processs_model(
    database: Database, tmp_path: Path
) -> None:
    async with split_apps(database, tmp_path) as (front, front_stubs, knowledge, _):
        assert front.domain.embedder is None  # no model in the agent's process
        user = await new_user(front_stubs)
        before = await embed_calls(knowledge)
        # Two first questions at once: the examples are embedded once between them.
        greetings = await asyncio.gather(
            stream(front_stubs, user, "hello there!"), stream(front_stubs, user, "thanks a lot")
        )
        asked = await stream(
            front_stubs, user, "what does our employee handbook say about parental leave?"
        )
        for events, intent in [*((g, "greeting") for g in greetings), (asked, "knowledge_base")]:
            step = classified(events)
            assert step.intent == intent
            assert step.detail.startswith(f"{intent} (embedding, similarity "), step.detail
        # The examples (one call), then each question (one call each).
        assert await embed_calls(knowledge) == before + 1 + 3


async def test_an_unreachable_encoder_leaves_the_intent_to_the_llm_until_it_is_back(
    database: Database, tmp_path: Path
) -> None:
    llm = FakeLlm()
    await llm.start()
    llm.reset(Script(intent="greeting", answer="Hello!"))
    port = free_port()  # where the knowledge process will listen, later
    target = f"127.0.0.1:{port}"
    try:
        async with running_app(
            database.url,
            tmp_path / "front",
            services=STATELESS,
            knowledge_target=target,
            index_target=target,
            index_token=INDEX_TOKEN,
            llm_base_url=llm.base_url,
            llm_model="scripted-model",
            llm_max_retries=0,
            intent_confidence=0.0,  # the examples decide whenever they can be compared
        ) as (front, stubs):
            user = await new_user(stubs)
            step = classified(await stream(stubs, user, "hello there!"))
            assert step.detail == "greeting (llm, encoder unavailable)"
            assert len(llm.requests_of("structured")) == 1

            async with running_app(
                database.url,
                tmp_path / "knowledge",
                services=["knowledge"],
                index_token=INDEX_TOKEN,
                grpc_port=port,
            ):
                # The channel reconnects with backoff: a later call finds it up.
                async with asyncio.timeout(30):
                    while True:
                        if await front.domain.agent.intents.guess("hello there!") is not None:
                            break
                        await asyncio.sleep(0.5)
                llm.reset(Script(intent="greeting", answer="Hello!"))
                step = classified(await stream(stubs, user, "hello again!"))
                assert step.detail.startswith("greeting (embedding, similarity "), step.detail
                assert llm.requests_of("structured") == []  # the model was not asked
    finally:
        await llm.stop()


async def test_runs_waiting_on_a_hung_encoder_share_one_attempt(
    database: Database, tmp_path: Path
) -> None:
    """Questions that arrive while the examples are being embedded wait for that attempt,
    not for one attempt each after another: a hung knowledge process holds them all for
    one call's timeout."""
    async with (
        black_hole() as hung,
        running_app(
            database.url,
            tmp_path / "front",
            services=STATELESS,
            knowledge_target=hung,
            index_target=hung,
            index_token=INDEX_TOKEN,
            tool_timeout_seconds=1.0,
        ) as (front, _),
    ):
        intents = front.domain.agent.intents
        started = time.monotonic()
        guesses = await asyncio.gather(*(intents.guess(f"question {i}") for i in range(4)))
        elapsed = time.monotonic() - started
    assert guesses == [None] * 4
    assert 1.0 <= elapsed < 2.5, elapsed


@contextlib.asynccontextmanager
async def agent_process(
    database: Database, data_dir: Path, target: str
) -> AsyncIterator[tuple[int, str]]:
    """`agentmesh serve --services agent` in its own process: (its pid, its gRPC address)."""
    env = cli_env(
        data_dir,
        AGENTMESH_SERVICES="agent",
        AGENTMESH_DATABASE_URL=database.url,
        AGENTMESH_JWT_SECRET=TEST_JWT_SECRET,
        AGENTMESH_KNOWLEDGE_TARGET=target,
        AGENTMESH_INDEX_TARGET=target,
        AGENTMESH_INDEX_TOKEN=INDEX_TOKEN,
        AGENTMESH_ENVOY_ENABLED="false",
    )
    async with serving(env) as served:
        yield served.process.pid, served.addresses["grpc"]


async def test_an_agent_process_loads_no_model(database: Database, tmp_path: Path) -> None:
    """A real `serve --services agent` answers, classifying on the fast path, without
    torch mapped into it; building its application imports none of the model libraries."""
    async with running_app(
        database.url,
        tmp_path / "knowledge",
        services=["knowledge", "auth", "users"],
        index_token=INDEX_TOKEN,
    ) as (knowledge, kb_stubs):
        target = f"127.0.0.1:{knowledge.grpc_port}"
        async with agent_process(database, tmp_path / "agent", target) as (pid, address):
            user = await new_user(kb_stubs)
            agent = Stubs.connect(address)
            try:
                step = classified(await stream(agent, user, "hello there!"))
            finally:
                await agent.channel.close()
            assert step.detail.startswith("greeting (embedding, similarity "), step.detail
            maps = await asyncio.to_thread(Path(f"/proc/{pid}/maps").read_text)
            assert "libtorch" not in maps
        assert "libtorch" in await asyncio.to_thread(Path(f"/proc/{os.getpid()}/maps").read_text)

        # The same process kind, built in a fresh interpreter: which libraries it imported.
        env = cli_env(
            tmp_path / "built",
            AGENTMESH_SERVICES="agent",
            AGENTMESH_DATABASE_URL=database.url,
            AGENTMESH_KNOWLEDGE_TARGET=target,
            AGENTMESH_INDEX_TARGET=target,
            AGENTMESH_INDEX_TOKEN=INDEX_TOKEN,
        )
        probe = (
            "import asyncio, json, sys\n"
            "from server.config import Settings\n"
            "from server.main import build_application\n"
            "async def build():\n"
            "    build_application(Settings(_env_file=None))\n"
            "asyncio.run(build())\n"
            f"print(json.dumps([m for m in {MODEL_LIBRARIES!r} if m in sys.modules]))\n"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", probe, env=env, stdout=asyncio.subprocess.PIPE
        )
        output, _ = await process.communicate()
        assert process.returncode == 0
        assert json.loads(output.decode().strip().splitlines()[-1]) == []
