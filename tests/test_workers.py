"""Ingestion workers (`agentmesh worker`) on the durable PostgreSQL queue, as real processes:
a server that only queues and owns the embedded index, two workers that parse, chunk and
embed and hand their passages to it; one worker killed with SIGKILL mid-job and the
server restarted while they run. Every document must end READY with exactly its passages,
none lost, none doubled, and nothing may wait for a restart."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb

from server.main import Application
from services.knowledge.chunking import ChunkingPolicy, chunk_document
from services.knowledge.parsing import DocumentFormat, ParseLimits, parse_document
from tests.backends import Database
from tests.harness import Account, Stubs, new_user, running_app
from tests.knowledge import search, upload, wait_settled

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# Short enough that a killed worker's job runs again within seconds.
QUEUE_SETTINGS = {
    "AGENTMESH_INGEST_STALLED_SECONDS": "3",
    "AGENTMESH_INGEST_SWEEP_SECONDS": "1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _text(topic: str, paragraphs: int) -> bytes:
    return "\n\n".join(
        f"Paragraph {i} on {topic}: entry {i} of the {topic} survey notes how it changed on "
        f"day {i}, with readings, weather and the observer's remarks for the archive."
        for i in range(paragraphs)
    ).encode()


def _expected_passages(app: Application, content: bytes) -> int:
    """What the server's own chunking makes of `content` (the count a worker must index)."""
    embedder, settings = app.domain.knowledge.embedder, app.settings
    policy = ChunkingPolicy(
        embedder.max_tokens, settings.chunk_overlap_tokens, settings.max_chunks_per_document
    )
    parsed = parse_document(content, DocumentFormat.TEXT, ParseLimits())
    return len(chunk_document(parsed, embedder.tokenizer, policy))


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    private = Database("postgres", tmp_path / "db")
    await private.create()
    await private.migrate()
    try:
        yield private
    finally:
        await private.drop()


def _worker(
    database_url: str, data_dir: Path, grpc_port: int, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "AGENTMESH_DATABASE_URL": database_url,
        "AGENTMESH_DATA_DIR": str(data_dir),  # the index token is read from here
        "AGENTMESH_GRPC_PORT": str(grpc_port),  # the index owner
        "AGENTMESH_INGEST_WORKERS": "1",
        "AGENTMESH_LOG_FORMAT": "text",
        "HF_HUB_OFFLINE": "1",
        **QUEUE_SETTINGS,
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(BIN / "agentmesh"), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


async def _sql(database_url: str, statement: str, *args: object) -> int:
    """The first value `statement` returns, or the rows it changed."""
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    connection = await asyncpg.connect(dsn)
    try:
        if statement.startswith("SELECT"):
            return int(await connection.fetchval(statement, *args))
        return int((await connection.execute(statement, *args)).rsplit(" ", 1)[-1])
    finally:
        await connection.close()


async def _jobs(database_url: str, status: str) -> int:
    query = "SELECT count(*) FROM procrastinate_jobs WHERE status = $1"
    return await _sql(database_url, query, status)


async def _wait_for_jobs(database_url: str, status: str, count: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await _jobs(database_url, status) >= count:
                return
            await asyncio.sleep(0.05)


async def _upload_all(
    stubs: Stubs, account: Account, topics: list[str], paragraphs: int
) -> dict[str, bytes]:
    contents = {}
    for topic in topics:
        content = _text(topic, paragraphs)
        response = await upload(stubs, account, f"{topic}.txt", content)
        contents[response.document.document_id] = content
    return contents


async def _check_settled(
    app: Application, stubs: Stubs, account: Account, contents: dict[str, bytes]
) -> None:
    """Every document READY with exactly the passages its text makes, each indexed once."""
    for document_id, content in contents.items():
        document = await wait_settled(stubs, account, document_id, timeout=240)
        assert document.status == kb_pb.DOCUMENT_STATUS_READY, document.failure_reason
        expected = _expected_passages(app, content)
        assert document.chunk_count == expected
        indexed = await app.domain.knowledge.indexed_chunks(uuid.UUID(document_id))
        assert indexed == expected


async def test_workers_survive_a_killed_worker_and_a_server_restart(
    database: Database, tmp_path: Path, workers: list[subprocess.Popen[bytes]]
) -> None:
    data_dir, port = tmp_path / "data", _free_port()
    overrides = {"grpc_port": port, "ingest_workers": 0}  # the server only queues
    topics = [f"glacier{i}" for i in range(10)]
    async with running_app(database.url, data_dir, **overrides) as (app, stubs):
        account = await new_user(stubs)
        first = await _upload_all(stubs, account, topics, paragraphs=120)
        # An upload whose job never reached the queue (say, its server died right after
        # the commit): the workers' sweep must queue one for it.
        assert await _sql(database.url, "DELETE FROM procrastinate_jobs WHERE id = 1") == 1
        for name in ("a", "b"):
            workers.append(_worker(database.url, data_dir, port, tmp_path / f"worker-{name}.log"))
        # Both workers mid-job: one of them dies without a word.
        await _wait_for_jobs(database.url, "doing", 2, timeout=120)
        workers[0].send_signal(signal.SIGKILL)
        assert workers[0].wait(timeout=10) == -signal.SIGKILL
        await _check_settled(app, stubs, account, first)
        second = await _upload_all(stubs, account, [f"moraine{i}" for i in range(6)], 120)
        await _wait_for_jobs(database.url, "doing", 1, timeout=60)
    # The server restarts while the surviving worker runs (its writes wait and retry).
    async with running_app(database.url, data_dir, **overrides) as (app, stubs):
        await _check_settled(app, stubs, account, {**first, **second})
        results = await search(stubs, account, "glacier3 survey readings")
        assert results and results[0].document_id in first
    assert await _jobs(database.url, "todo") == 0
    assert workers[1].poll() is None, (tmp_path / "worker-b.log").read_text()[-3000:]
