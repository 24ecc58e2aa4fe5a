"""Services split over processes (`serve --services`): the agent in one application, the
knowledge base in another, on one database, reaching each other over their gRPC contracts
as the end user, never with more rights than that user has."""

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from grpc_health.v1 import health_pb2

from server.config import Settings
from server.main import Application
from server.remote_knowledge import RemoteKnowledgeBase
from server.request_context import RequestInfo, current_request
from services.auth.principal import Principal, Role
from services.errors import Unauthenticated, Unavailable
from services.knowledge.service import SearchRequest
from tests.agent import of_kind, stream
from tests.backends import Database
from tests.harness import Stubs, new_admin, new_user, running_app, settings_for
from tests.knowledge import ingest
from tests.limited import REDIS_URL, redis_up

STATELESS = ["auth", "users", "agent", "feedback", "analytics", "audit"]
REACTOR = (
    b"The Kestrel research reactor is cooled with molten lead at 480 degrees Celsius.\n\n"
    b"Its vessel was forged in Sheffield and it first ran in 1968."
)
QUESTION = "How is the Kestrel reactor cooled?"
INDEX_TOKEN = "split-services-" + "t" * 32  # the deployment's one service credential


@contextlib.asynccontextmanager
async def split_apps(
    database: Database, tmp_path: Path, **overrides: object
) -> AsyncIterator[tuple[Application, Stubs, Application, Stubs]]:
    """The knowledge base alone in one application; every other service in another."""
    async with running_app(
        database.url,
        tmp_path / "knowledge",
        services=["knowledge"],
        index_token=INDEX_TOKEN,
        **overrides,
    ) as (knowledge, kb_stubs):
        target = f"127.0.0.1:{knowledge.grpc_port}"
        async with running_app(
            database.url,
            tmp_path / "front",
            services=STATELESS,
            knowledge_target=target,
            index_target=target,
            index_token=INDEX_TOKEN,
            **overrides,
        ) as (front, front_stubs):
            yield front, front_stubs, knowledge, kb_stubs


@pytest.fixture
async def split(
    database: Database, tmp_path: Path
) -> AsyncIterator[tuple[Application, Stubs, Application, Stubs]]:
    async with split_apps(database, tmp_path) as apps:
        yield apps


async def test_each_application_serves_only_its_services(
    split: tuple[Application, Stubs, Application, Stubs],
) -> None:
    front, front_stubs, knowledge, kb_stubs = split
    assert front.domain.knowledge_service is None and knowledge.domain.agent_service is None
    assert not (front.settings.data_dir / "vectors").exists()  # the index is not opened here

    async def status(stubs: Stubs, service: str) -> grpc.StatusCode:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            await stubs.health.Check(request)
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    agent, kb_name = (
        "agentmesh.agent.v1.AgentService",
        "agentmesh.knowledge.v1.KnowledgeBaseService",
    )
    assert await status(front_stubs, agent) == grpc.StatusCode.OK
    assert await status(front_stubs, kb_name) == grpc.StatusCode.NOT_FOUND
    assert await status(kb_stubs, kb_name) == grpc.StatusCode.OK
    assert await status(kb_stubs, agent) == grpc.StatusCode.NOT_FOUND
    user = await new_user(front_stubs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await front_stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=user.metadata)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_agent_searches_the_other_process_as_the_user(
    split: tuple[Application, Stubs, Application, Stubs],
) -> None:
    _, front_stubs, _, kb_stubs = split
    owner = await new_user(front_stubs, "owner")
    document = await ingest(kb_stubs, owner, "kestrel.txt", REACTOR)

    events = await stream(front_stubs, owner, QUESTION)
    [completed] = of_kind(events, "completed")
    assert "molten lead" in completed.message.content
    citations = of_kind(events, "citation")
    assert citations and all(c.document_id == document.document_id for c in citations)

    # Another user asks the same: the search ran with their rights, not a service's.
    stranger = await new_user(front_stubs, "stranger")
    events = await stream(front_stubs, stranger, QUESTION)
    assert of_kind(events, "citation") == []
    assert "molten lead" not in of_kind(events, "completed")[0].message.content


async def test_a_deleted_accounts_passages_go_from_the_other_processs_index(
    split: tuple[Application, Stubs, Application, Stubs],
) -> None:
    front, front_stubs, knowledge, kb_stubs = split
    owner = await new_user(front_stubs, "leaving")
    document = await ingest(kb_stubs, owner, "kestrel.txt", REACTOR)
    document_id = uuid.UUID(document.document_id)
    assert await knowledge.domain.knowledge.indexed_chunks(document_id) == document.chunk_count
    admin = await new_admin(front, front_stubs)
    await front_stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=owner.user_id), metadata=admin.metadata
    )
    assert await knowledge.domain.knowledge.indexed_chunks(document_id) == 0


async def test_a_question_is_embedded_once_between_the_processes(
    database: Database, tmp_path: Path
) -> None:
    """The agent's process has no model: the knowledge process embeds the question for it
    (to classify it), and its search for the same text finds that embedding in its cache
    instead of computing it again. With Redis, the embedding is shared there too."""
    await redis_up()
    prefix = f"split-{uuid.uuid4().hex[:8]}:"
    async with split_apps(database, tmp_path, redis_url=REDIS_URL, redis_key_prefix=prefix) as (
        front,
        front_stubs,
        knowledge,
        kb_stubs,
    ):
        owner = await new_user(front_stubs)
        await ingest(kb_stubs, owner, "kestrel.txt", REACTOR)
        embedder = knowledge.domain.embedder
        assert embedder is not None and embedder.shared_cache is not None
        assert front.domain.embedder is None
        computed, found = embedder.misses, embedder.hits
        shared_misses = embedder.shared_cache.misses
        question = f"How is the Kestrel reactor cooled, case {uuid.uuid4().hex[:6]}?"
        events = await stream(front_stubs, owner, question)
        assert of_kind(events, "citation")
        assert embedder.misses == computed + 1  # embedded once, for the classifier
        assert embedder.hits == found + 1  # the search found it
        assert embedder.shared_cache.misses == shared_misses + 1  # and stored it there


async def test_an_unreachable_knowledge_base_fails_the_tool_not_the_run(
    database: Database, tmp_path: Path
) -> None:
    with contextlib.closing(_listening_socket()) as unused:
        closed = f"127.0.0.1:{unused.getsockname()[1]}"
    async with running_app(
        database.url,
        tmp_path / "front",
        services=STATELESS,
        knowledge_target=closed,
        index_target=closed,
    ) as (_, stubs):
        user = await new_user(stubs)
        events = await stream(stubs, user, QUESTION)
    # Nor can the question be embedded there: the intent is the default one.
    [classified] = [
        s.detail
        for s in of_kind(events, "step")
        if s.step == agent_pb.STEP_CLASSIFY_INTENT and s.detail
    ]
    assert classified == "general (default, encoder unavailable)"
    results = {r.tool_name: r for r in of_kind(events, "tool_result")}
    failed = results["knowledge_base_search"]
    assert failed.outcome == agent_pb2.TOOL_OUTCOME_ERROR
    assert "knowledge base" in failed.error_message
    assert "127.0.0.1" not in failed.error_message  # grpc's details stay in the log
    assert len(of_kind(events, "completed")) == 1


def test_a_process_is_told_what_it_lacks() -> None:
    with pytest.raises(ValueError, match="KNOWLEDGE_TARGET"):
        settings_for("sqlite+aiosqlite://", Path("unused"), services=["agent"])
    with pytest.raises(ValueError, match="serving agent without knowledge needs INDEX_TARGET"):
        settings_for(
            "sqlite+aiosqlite://", Path("unused"), services=["agent"], knowledge_target="x:1"
        )
    with pytest.raises(ValueError, match="INDEX_TARGET"):
        settings_for("sqlite+aiosqlite://", Path("unused"), services=["users"])
    with pytest.raises(ValueError, match="services"):
        Settings(_env_file=None, services="auth,search")  # type: ignore[call-arg,arg-type]


async def test_serve_says_what_a_process_lacks_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    env["AGENTMESH_DATA_DIR"] = str(tmp_path)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "serve", "--services", "agent,feedback",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await process.communicate()
    assert process.returncode == 2
    assert "KNOWLEDGE_TARGET" in stderr.decode() and "Traceback" not in stderr.decode()


# --- the remote client's own promises -----------------------------------------------


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()


def _serving(principal: Principal, deadline: float | None) -> None:
    current_request.set(
        RequestInfo(
            request_id="r1",
            rpc="/agentmesh.agent.v1.AgentService/Query",
            principal=principal,
            credential="Bearer not-checked-here",
            deadline=deadline,
        )
    )


async def test_the_callers_deadline_bounds_the_remote_call() -> None:
    principal = Principal(uuid.uuid4(), Role.USER)
    async with black_hole() as target:
        client = RemoteKnowledgeBase(target, timeout=3600)  # only the deadline can end it
        try:
            _serving(principal, time.monotonic() + 0.5)
            with pytest.raises(Unavailable) as caught:
                await client.search(principal, SearchRequest(query="anything"))
            assert caught.value.reason == "UPSTREAM_DEADLINE_EXCEEDED"
            _serving(principal, time.monotonic() - 1)  # already over: no call at all
            with pytest.raises(Unavailable, match="deadline has passed"):
                await client.search(principal, SearchRequest(query="anything"))
        finally:
            await client.close()


async def test_no_remote_call_without_the_users_own_credential() -> None:
    principal = Principal(uuid.uuid4(), Role.USER)
    async with black_hole() as target:
        client = RemoteKnowledgeBase(target, timeout=1)
        try:
            current_request.set(None)
            with pytest.raises(Unauthenticated):
                await client.search(principal, SearchRequest(query="anything"))
            _serving(Principal(uuid.uuid4(), Role.ADMIN), None)  # someone else's call
            with pytest.raises(Unauthenticated):
                await client.search(principal, SearchRequest(query="anything"))
        finally:
            await client.close()
