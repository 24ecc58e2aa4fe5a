"""Resumable, cancellable agent runs: a run outlives the stream that started it, its owner
re-attaches from the last seq seen (gRPC, and REST/SSE through Envoy) on any replica and gets
every later event exactly once, CancelRun stops it (and the LLM's stream) from any replica,
nobody else sees it, and a run whose server died or shut down ends interrupted.

Each test runs on two replicas: with the in-process run log both are one application; with
Redis they are two applications sharing Redis and the database, the run started on the first
and followed, cancelled and counted on the second."""

import asyncio
import contextlib
import json
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from google.rpc import code_pb2

from server.main import Application
from tests.backends import Database
from tests.fake_llm import JSON, FakeLlm, Script
from tests.harness import TEST_JWT_SECRET, Account, Stubs, envoy_for, new_user, running_app
from tests.limited import REDIS_URL, redis_up
from tests.rpc_errors import error_info, field_violations
from tests.test_lifecycle import cli_env, serving

ANSWER = "Resumed runs lose nothing and repeat nothing, whatever the network does."
RunEvent = agent_pb.StreamQueryResponse


def llm_settings(llm: FakeLlm) -> dict[str, Any]:
    return {
        "llm_base_url": llm.base_url,
        "llm_model": "scripted-model",
        "llm_max_retries": 0,
        "intent_confidence": 1.01,  # the (scripted) LLM classifies every question
    }


def redis_settings(prefix: str = "") -> dict[str, Any]:
    return {
        "redis_url": REDIS_URL,
        "redis_key_prefix": prefix or f"agentmesh-test-{uuid.uuid4().hex}:",
    }


@dataclass
class Replicas:
    """Where runs start, and where they are followed, cancelled and counted from."""

    store: str
    starting_app: Application
    starting: Stubs
    other_app: Application
    other: Stubs
    prefix: str  # the Redis key prefix both use ("" in process)


@pytest.fixture(scope="module", params=["in_process", "redis"])
async def replicas(
    request: pytest.FixtureRequest,
    database: Database,
    llm: FakeLlm,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Replicas]:
    settings = llm_settings(llm)
    if request.param == "in_process":
        async with running_app(database.url, tmp_path_factory.mktemp("runs"), **settings) as one:
            yield Replicas("in_process", *one, *one, "")
        return
    await redis_up()
    settings |= redis_settings()
    async with (
        running_app(database.url, tmp_path_factory.mktemp("runs-a"), **settings) as first,
        running_app(database.url, tmp_path_factory.mktemp("runs-b"), **settings) as second,
    ):
        yield Replicas("redis", *first, *second, settings["redis_key_prefix"])


@dataclass
class Rest:
    """HTTP clients through a real Envoy in front of each replica."""

    starting: aiohttp.ClientSession
    other: aiohttp.ClientSession


@pytest.fixture(scope="module")
async def rest(replicas: Replicas, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rest]:
    async with contextlib.AsyncExitStack() as stack:
        sessions = []
        for app in (replicas.starting_app, replicas.other_app):
            sidecar = envoy_for(app, tmp_path_factory.mktemp("runs-envoy"))
            await sidecar.start()
            stack.push_async_callback(sidecar.stop)
            session = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{sidecar.port}")
            sessions.append(await stack.enter_async_context(session))
        yield Rest(*sessions)


@pytest.fixture
async def gate(llm: FakeLlm) -> AsyncIterator[asyncio.Event]:
    """A fresh script whose answer stops after its first token until the gate opens."""
    opened = asyncio.Event()
    llm.reset(Script(intent="greeting", answer=ANSWER, gate=opened))
    yield opened
    opened.set()  # nothing stays blocked in the scripted model after the test


def start(stubs: Stubs, account: Account, query: str = "hello") -> Any:
    request = agent_pb.StreamQueryRequest(query=query)
    return stubs.agent.StreamQuery(request, metadata=account.metadata)


def attach(stubs: Stubs, account: Account, run_id: str, after_seq: int = 0) -> Any:
    request = agent_pb.AttachRunRequest(run_id=run_id, after_seq=after_seq)
    return stubs.agent.AttachRun(request, metadata=account.metadata)


async def cancel(stubs: Stubs, account: Account, run_id: str) -> None:
    request = agent_pb.CancelRunRequest(run_id=run_id)
    await stubs.agent.CancelRun(request, metadata=account.metadata)


async def until_first_token(call: Any) -> list[Any]:
    """The events of a stream up to its first token (the scripted model then waits)."""
    events = []
    async for event in call:
        events.append(event)
        if event.WhichOneof("event") == "token":
            return events
    raise AssertionError(f"the stream ended before a token: {events}")


async def collect(call: Any) -> list[Any]:
    return [event async for event in call]


async def failure(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError]:
    """The (further) events of a stream that ends with an error, and the error."""
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in call:
            events.append(event)
    return events, caught.value


def as_stream_events(events: list[Any]) -> list[RunEvent]:
    """AttachRun's messages read as StreamQuery's (the same envelope, field for field)."""
    return [RunEvent.FromString(event.SerializeToString()) for event in events]


def answer_of(events: list[RunEvent]) -> str:
    return "".join(e.token.text for e in events if e.WhichOneof("event") == "token")


def assert_numbered(events: list[Any], run_id: str) -> None:
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.run_id for e in events} == {run_id}


async def test_a_dropped_stream_leaves_the_run_running_and_reattaching_misses_nothing(
    replicas: Replicas, gate: asyncio.Event
) -> None:
    user = await new_user(replicas.starting)
    call = start(replicas.starting, user)
    seen = await until_first_token(call)
    call.cancel()  # the connection drops mid-answer
    run_id = seen[0].run_id
    # Another client of the same user follows the whole run from its start, uninterrupted.
    whole = asyncio.create_task(collect(attach(replicas.other, user, run_id)))
    gate.set()
    rest = await collect(attach(replicas.other, user, run_id, seen[-1].seq))

    resumed = seen + as_stream_events(rest)
    assert_numbered(resumed, run_id)
    assert resumed == as_stream_events(await whole)
    assert resumed[-1].WhichOneof("event") == "completed"
    assert answer_of(resumed) == resumed[-1].completed.message.content == ANSWER
    # The run completed although its stream was gone: the answer is stored.
    stored = await replicas.other.agent.GetConversation(
        agent_pb.GetConversationRequest(conversation_id=seen[0].run_started.conversation_id),
        metadata=user.metadata,
    )
    assert stored.messages[-1] == resumed[-1].completed.message


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[JSON]:
    """The `data:` events of a server-sent event stream."""
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data:"):
            yield json.loads(text[len("data:") :])


async def test_reattaching_over_rest_resumes_the_server_sent_events(
    replicas: Replicas, rest: Rest, gate: asyncio.Event
) -> None:
    user = await new_user(replicas.starting)
    headers = {"authorization": f"Bearer {user.access_token}"}
    seen: list[JSON] = []
    query = {"query": "hello"}
    async with rest.starting.post("/v1/agent/query:stream", json=query, headers=headers) as sse:
        assert sse.status == 200
        async for event in sse_events(sse):
            seen.append(event)
            if "token" in event:
                break
    # The response is closed: the connection to Envoy is gone mid-answer.
    run_id, last = seen[0]["run_id"], seen[-1]["seq"]
    gate.set()
    path = f"/v1/agent/runs/{run_id}:attach"
    async with rest.other.post(path, json={"after_seq": last}, headers=headers) as sse:
        assert sse.status == 200
        assert sse.headers["content-type"].startswith("text/event-stream")
        resumed = seen + [event async for event in sse_events(sse)]
    assert [e["seq"] for e in resumed] == list(range(1, len(resumed) + 1))
    assert {e["run_id"] for e in resumed} == {run_id}
    tokens = "".join(e["token"]["text"] for e in resumed if "token" in e)
    assert tokens == resumed[-1]["completed"]["message"]["content"] == ANSWER
    # An uninterrupted replay of the whole run over gRPC holds exactly the same events.
    whole = as_stream_events(await collect(attach(replicas.other, user, run_id)))
    assert [e.seq for e in whole] == [e["seq"] for e in resumed]
    assert [e.WhichOneof("event") for e in whole] == [
        next(k for k in e if k not in ("run_id", "seq")) for e in resumed
    ]
    assert answer_of(whole) == ANSWER


async def test_cancel_run_stops_the_run_and_the_llm_stream(
    replicas: Replicas, llm: FakeLlm
) -> None:
    opened = asyncio.Event()
    # Tokens keep coming once the gate opens, paced, so the closed connection is noticed.
    llm.reset(Script(intent="greeting", answer="word " * 200, gate=opened, token_delay=0.01))
    user = await new_user(replicas.starting)
    call = start(replicas.starting, user)
    seen = await until_first_token(call)
    run_id = seen[0].run_id
    await cancel(replicas.other, user, run_id)  # from the other replica, with Redis

    rest, error = await failure(call)  # the stream that started the run is still attached
    assert error.code() == grpc.StatusCode.CANCELLED
    assert error_info(error).reason == "RUN_CANCELLED"
    assert rest[-1].WhichOneof("event") == "error"
    assert rest[-1].error.code == code_pb2.CANCELLED
    assert_numbered(seen + rest, run_id)
    opened.set()  # only the cancellation can stop the scripted model now
    [record] = llm.streams
    await asyncio.wait_for(record.finished.wait(), timeout=30)
    assert record.cut_off and record.tokens_sent < record.tokens_planned

    # Re-attaching says the same; the run stored nothing; cancelling again does nothing.
    replay, again = await failure(attach(replicas.other, user, run_id))
    assert again.code() == grpc.StatusCode.CANCELLED
    assert as_stream_events(replay) == seen + rest
    listed = await replicas.other.agent.ListConversations(
        agent_pb.ListConversationsRequest(), metadata=user.metadata
    )
    assert list(listed.conversations) == []
    await cancel(replicas.other, user, run_id)


async def test_only_the_owner_sees_or_cancels_a_run(
    replicas: Replicas, rest: Rest, gate: asyncio.Event
) -> None:
    owner, other = await new_user(replicas.starting), await new_user(replicas.starting)
    call = start(replicas.starting, owner)
    run_id = (await until_first_token(call))[0].run_id
    for run in (run_id, "0" * 32):  # another user's run is as unknown as a missing one
        events, error = await failure(attach(replicas.other, other, run))
        assert events == [] and error.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(error).reason == "RUN_NOT_FOUND"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await cancel(replicas.other, other, run)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    headers = {"authorization": f"Bearer {other.access_token}"}
    path = f"/v1/agent/runs/{run_id}:cancel"
    async with rest.other.post(path, json={}, headers=headers) as reply:
        assert reply.status == 404
        assert (await reply.json())["details"][0]["reason"] == "RUN_NOT_FOUND"
    # A stream refused before its first event: Envoy has sent the response headers (200,
    # with the request id) already, so the status comes as the body.
    path = f"/v1/agent/runs/{run_id}:attach"
    async with rest.other.post(path, json={}, headers=headers) as reply:
        status = await reply.json(content_type=None)
        assert status["code"] == code_pb2.NOT_FOUND
        assert status["details"][0]["reason"] == "RUN_NOT_FOUND"

    _, malformed = await failure(attach(replicas.other, owner, "not-a-run"))
    assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(malformed) == {"run_id": ["must be a run id (32 hexadecimal digits)"]}
    _, negative = await failure(attach(replicas.other, owner, run_id, after_seq=-1))
    assert field_violations(negative) == {"after_seq": ["must not be negative"]}
    gate.set()
    # The owner's run was never disturbed.
    assert (await collect(call))[-1].WhichOneof("event") == "completed"


async def test_attaching_past_the_last_event_waits_for_the_later_ones(
    replicas: Replicas, gate: asyncio.Event
) -> None:
    user = await new_user(replicas.starting)
    call = start(replicas.starting, user)
    seen = await until_first_token(call)
    run_id, beyond = seen[0].run_id, seen[-1].seq + 2
    later = asyncio.create_task(collect(attach(replicas.other, user, run_id, beyond)))
    gate.set()
    whole = seen + await collect(call)
    events = as_stream_events(await later)
    assert events == whole[beyond:]  # exactly the events after `beyond`, once each
    assert events[-1].WhichOneof("event") == "completed"
    # Once the run ended: from its last event nothing is left; from 0 it all comes back.
    assert await collect(attach(replicas.other, user, run_id, whole[-1].seq)) == []
    assert await collect(attach(replicas.other, user, run_id, 10_000)) == []
    assert as_stream_events(await collect(attach(replicas.other, user, run_id))) == whole


async def test_the_concurrent_run_cap_holds_across_replicas(
    replicas: Replicas, gate: asyncio.Event
) -> None:
    limit = replicas.other_app.settings.max_concurrent_runs_per_user
    user, other = await new_user(replicas.starting), await new_user(replicas.starting)
    calls = [start(replicas.starting if i % 2 else replicas.other, user) for i in range(limit)]
    for call in calls:  # every run is waiting inside the scripted model, half on each replica
        await until_first_token(call)
    for stubs in (replicas.starting, replicas.other):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.agent.Query(agent_pb.QueryRequest(query="hello"), metadata=user.metadata)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused.value).reason == "TOO_MANY_CONCURRENT_RUNS"
    extra = start(replicas.other, other)  # another user is not affected
    await until_first_token(extra)
    gate.set()
    for call in [*calls, extra]:
        assert (await collect(call))[-1].WhichOneof("event") == "completed"
    reply = await replicas.other.agent.Query(
        agent_pb.QueryRequest(query="hello"), metadata=user.metadata
    )
    assert reply.message.content == ANSWER  # the slots are free again


@pytest.mark.parametrize("store", ["in_process", "redis"])
async def test_an_expired_run_is_not_found(
    store: str, database: Database, llm: FakeLlm, tmp_path: Path
) -> None:
    llm.reset(Script(intent="greeting", answer=ANSWER))
    settings = {"agent_run_log_ttl_seconds": 0.5, **llm_settings(llm)}
    if store == "redis":
        await redis_up()
        settings |= redis_settings()
    async with running_app(database.url, tmp_path, **settings) as (_, stubs):
        user = await new_user(stubs)
        run_id = (await collect(start(stubs, user)))[0].run_id
        async with asyncio.timeout(30):
            while True:  # kept for half a second after its last write, then gone
                try:
                    await collect(attach(stubs, user, run_id))
                except grpc.aio.AioRpcError as error:
                    gone = error
                    break
                await asyncio.sleep(0.1)
    assert gone.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(gone).reason == "RUN_NOT_FOUND"


# With the in-process log, the followers of a run stop with its process: Redis only.
@pytest.mark.parametrize("replicas", ["redis"], indirect=True)
async def test_stopping_a_server_interrupts_its_runs_for_followers_elsewhere(
    replicas: Replicas, database: Database, llm: FakeLlm, tmp_path: Path, gate: asyncio.Event
) -> None:
    settings = {**redis_settings(replicas.prefix), **llm_settings(llm)}
    async with running_app(database.url, tmp_path, **settings) as (_, doomed):
        user = await new_user(doomed)
        run_id = (await until_first_token(start(doomed, user)))[0].run_id
        follower = attach(replicas.other, user, run_id)
        seen = await until_first_token(follower)
    # That server stopped (gracefully, grace 0) with the run waiting inside the model.
    rest, error = await failure(follower)
    assert error.code() == grpc.StatusCode.ABORTED
    assert error_info(error).reason == "RUN_INTERRUPTED"
    assert [e.WhichOneof("event") for e in rest] == ["error"]
    assert rest[0].error.code == code_pb2.ABORTED
    assert_numbered(seen + rest, run_id)


@pytest.mark.slow
@pytest.mark.parametrize("replicas", ["redis"], indirect=True)
async def test_a_run_whose_server_died_ends_interrupted_and_frees_its_slot(
    replicas: Replicas, database: Database, llm: FakeLlm, tmp_path: Path, gate: asyncio.Event
) -> None:
    """`agentmesh serve` killed with SIGKILL mid-run: followers on another replica learn it
    within seconds (its lease in Redis expires), and its run stops counting for the cap."""
    env = cli_env(
        tmp_path / "data",
        AGENTMESH_ENVOY_ENABLED="false",
        AGENTMESH_DATABASE_URL=database.url,
        AGENTMESH_JWT_SECRET=TEST_JWT_SECRET,
        AGENTMESH_REDIS_URL=REDIS_URL,
        AGENTMESH_REDIS_KEY_PREFIX=replicas.prefix,
        AGENTMESH_LLM_BASE_URL=llm.base_url,
        AGENTMESH_LLM_MAX_RETRIES="0",
        AGENTMESH_INTENT_CONFIDENCE="1.01",
    )
    async with serving(env) as doomed:
        stubs = Stubs.connect(doomed.addresses["grpc"])
        user = await new_user(stubs)
        seen = await until_first_token(start(stubs, user))
        # Followed from the other replica: there, the events come through Redis.
        follower = attach(replicas.other, user, seen[0].run_id)
        assert as_stream_events(await until_first_token(follower)) == seen
        doomed.process.send_signal(signal.SIGKILL)
        assert await doomed.process.wait() == -signal.SIGKILL
        await stubs.channel.close()

    rest, error = await failure(follower)
    late, again = await failure(attach(replicas.other, user, seen[0].run_id))
    assert as_stream_events(late[: len(seen)]) == seen
    for events, ended in ((rest, error), (late[len(seen) :], again)):
        assert ended.code() == grpc.StatusCode.ABORTED
        assert error_info(ended).reason == "RUN_INTERRUPTED"
        [interrupted] = events
        assert interrupted.seq == seen[-1].seq + 1
        assert interrupted.error.code == code_pb2.ABORTED

    # The dead run's slot frees itself: the user gets every slot back.
    limit = replicas.other_app.settings.max_concurrent_runs_per_user
    running = [start(replicas.other, user) for _ in range(limit - 1)]
    for call in running:
        await until_first_token(call)
    async with asyncio.timeout(60):
        while True:
            last = start(replicas.other, user)
            try:
                await until_first_token(last)
                break
            except grpc.aio.AioRpcError as refused:
                assert error_info(refused).reason == "TOO_MANY_CONCURRENT_RUNS"
                await asyncio.sleep(0.5)
    gate.set()
    for call in [*running, last]:
        assert (await collect(call))[-1].WhichOneof("event") == "completed"
