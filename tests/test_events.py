"""Usage events: what the RPCs record, written in batches by the background recorder, and
what happens to them while the database is unreachable."""

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from sqlalchemy import select

from server import migrations
from server.main import Application
from services.db import create_engine, create_sessionmaker
from services.usage_events.models import Event
from services.usage_events.recorder import EventKind, EventRecorder, RecorderSettings
from tests.harness import Stubs, new_user
from tests.knowledge import upload


async def events_of(app: Application, user_id: str, expected: int) -> list[Event]:
    """The user's events once at least `expected` have been written (the recorder flushes
    every second)."""
    async with asyncio.timeout(30):
        while True:
            async with app.domain.sessions() as s:
                rows = list(
                    (
                        await s.scalars(
                            select(Event)
                            .where(Event.user_id == uuid.UUID(user_id))
                            .order_by(Event.id)
                        )
                    ).all()
                )
            if len(rows) >= expected:
                return rows
            await asyncio.sleep(0.2)


async def test_rpcs_record_usage_events(app: Application, stubs: Stubs) -> None:
    user = await new_user(stubs)  # a registration and a login
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password="wrong " * 3))
    await upload(stubs, user, "note.txt", b"The quarterly numbers are in the appendix.")
    await stubs.agent.Query(agent_pb.QueryRequest(query="hello"), metadata=user.metadata)
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.agent.GetConversation(
            agent_pb.GetConversationRequest(conversation_id=str(uuid.uuid4())),
            metadata=user.metadata,
        )
    rows = await events_of(app, user.user_id, 8)

    def fields(event: Event) -> tuple[Any, ...]:
        return (event.kind, event.success, event.code)

    kinds = [fields(e) for e in rows]
    assert kinds[:3] == [
        ("registration", True, None),
        ("login", True, None),
        ("login", False, None),
    ]
    assert ("document_upload", True, None) in kinds
    [query] = [e for e in rows if e.kind == "agent_query"]
    assert query.success and query.data == {"mode": "extractive", "tools": []}
    assert query.tokens_in == query.tokens_out == 0 and query.latency_ms is not None
    [uploaded] = [e for e in rows if e.kind == "document_upload"]
    assert uploaded.data == {"format": "text", "bytes": 42, "deduplicated": False}
    # Every finished call is an rpc event with its code (the error rate's denominator).
    # Register and Login carry no token, so their rpc events have no user; the failed
    # login's user is known only to the domain's login event.
    rpcs = [(e.rpc, e.code, e.success) for e in rows if e.kind == "rpc"]
    assert rpcs == [
        ("/agentmesh.knowledge.v1.KnowledgeBaseService/UploadDocument", "OK", True),
        ("/agentmesh.agent.v1.AgentService/Query", "OK", True),
        ("/agentmesh.agent.v1.AgentService/GetConversation", "NOT_FOUND", False),
    ]
    assert all(e.latency_ms is not None for e in rows if e.kind == "rpc")


async def test_events_survive_a_database_outage_up_to_the_capacity(tmp_path: Any) -> None:
    # A database that cannot be opened: every write fails until it exists.
    path = tmp_path / "missing" / "events.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    recorder = EventRecorder(
        create_sessionmaker(engine), RecorderSettings(flush_interval=60, capacity=3)
    )
    for n in range(5):
        recorder.record(EventKind.LOGIN, success=True, data={"n": n})
    assert recorder.dropped == 2  # the buffer keeps the newest 3
    assert await recorder.flush() == 0  # the write fails; the events are kept
    assert recorder.dropped == 2
    path.parent.mkdir()
    await asyncio.to_thread(migrations.upgrade, f"sqlite+aiosqlite:///{path}")
    assert await recorder.flush() == 3
    async with create_sessionmaker(engine)() as s:
        written = [e.data for e in (await s.scalars(select(Event).order_by(Event.id))).all()]
    assert written == [{"n": 2}, {"n": 3}, {"n": 4}]
    await engine.dispose()


async def test_stopping_writes_what_is_buffered(tmp_path: Any) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'events.db'}"
    await asyncio.to_thread(migrations.upgrade, url)
    engine = create_engine(url)
    recorder = EventRecorder(create_sessionmaker(engine), RecorderSettings(flush_interval=3600))
    await recorder.start()
    recorder.record(EventKind.FEEDBACK, success=True)
    recorder.record(EventKind.TOOL_CALL, tool="web_search", success=False, code="timeout")
    await recorder.stop()
    async with create_sessionmaker(engine)() as s:
        rows = (await s.scalars(select(Event).order_by(Event.id))).all()
    assert [(e.kind, e.tool, e.code) for e in rows] == [
        ("feedback", None, None),
        ("tool_call", "web_search", "timeout"),
    ]
    recorder.record(EventKind.LOGIN, nonsense=1)  # a bad event is logged, never raised
    assert recorder.written == 2
    await engine.dispose()
