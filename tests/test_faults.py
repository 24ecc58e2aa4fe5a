"""Faults under load, on the real `agentmesh serve` process (issue 16; RELIABILITY.md items
3, 4, 16, 37): PostgreSQL cut, Redis cut, and the server killed with SIGKILL, each while a
steady mix of calls runs (register, upload, list, search, query, read back).

PostgreSQL and Redis are the machine's shared servers; a TCP proxy (tests/tcp_proxy.py)
stands between them and the server, and cutting it is the outage. What must hold:

- no call ever ends UNKNOWN or INTERNAL, before, during or after a fault, and the server
  logs no unhandled error;
- while PostgreSQL is away calls are UNAVAILABLE (or still OK when they need no database)
  and every service's health is NOT_SERVING; once it is back calls succeed and health is
  SERVING again, without a restart;
- while Redis is away the limiter fails open (the default): auth, users, knowledge and
  feedback keep answering OK, the agent is UNAVAILABLE or OK and its health NOT_SERVING;
  everything comes back on its own;
- after SIGKILL and a restart on the same database and data directory, every account,
  document and conversation acknowledged OK is there, and every acknowledged upload's
  ingestion finishes (READY, its passages searchable): the queue is durable.

Timeouts are generous and nothing measures latency.
"""

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from server.config import Settings
from server.served import SERVICES
from tests.backends import Database
from tests.harness import (
    PASSWORD,
    TEST_JWT_SECRET,
    Account,
    Stubs,
    login,
    new_user,
    running_app,
    unique_email,
)
from tests.limited import REDIS_URL, redis_up
from tests.tcp_proxy import TcpProxy
from tests.test_lifecycle import AGENTMESH, cli_env

pytestmark = pytest.mark.slow

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
CALL_TIMEOUT = 30.0
PROBE_WAIT = 90.0  # the monitor probes every 10 s; health follows
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NEEDS_REDIS = {s.name for s in SERVICES if "redis" in s.needs}
CREDENTIAL_KINDS = {"register"}  # the load's calls of credential RPCs (server/rate_limits.py)
SERVICE_OF = {
    "register": "agentmesh.auth.v1.AuthService",
    "me": "agentmesh.auth.v1.UserService",
    "upload": "agentmesh.knowledge.v1.KnowledgeBaseService",
    "list": "agentmesh.knowledge.v1.KnowledgeBaseService",
    "search": "agentmesh.knowledge.v1.KnowledgeBaseService",
    "query": "agentmesh.agent.v1.AgentService",
    "conversation": "agentmesh.agent.v1.AgentService",
}


def default_setting(name: str, missing: Any) -> Any:
    """A setting's default (the servers here leave the limiter's modes at theirs)."""
    info = Settings.model_fields.get(name)
    return missing if info is None else info.default


def paragraphs(topic: str, count: int) -> bytes:
    return "\n\n".join(
        f"Entry {i} of the {topic} log: the {topic} crew measured the tide, the wind and "
        f"the salinity at station {i} and wrote down what changed since the day before."
        for i in range(count)
    ).encode()


@dataclass
class Record:
    phase: str  # the phase the call started and ended in ("a->b" when it spanned two)
    kind: str
    code: grpc.StatusCode
    details: str
    reason: str = ""  # ErrorInfo.reason
    retry: bool = False  # whether a RetryInfo came with it


def error_record(phase: str, kind: str, error: grpc.aio.AioRpcError) -> Record:
    record = Record(phase, kind, error.code(), error.details() or "")
    with contextlib.suppress(ValueError):
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else []:
            info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                record.reason = info.reason
            elif detail.Unpack(retry):
                record.retry = True
    return record


@dataclass
class Ledger:
    """What the server acknowledged OK: it must all be there afterwards."""

    accounts: dict[str, str] = field(default_factory=dict)  # email -> password
    documents: dict[str, tuple[Account, int]] = field(default_factory=dict)  # id -> owner, size
    conversations: dict[str, Account] = field(default_factory=dict)


class Load:
    """A steady mix of calls from a few concurrent workers, each call's status recorded
    under the phase the test is in."""

    def __init__(self, stubs: Stubs, accounts: list[Account], paragraphs_per_upload: int = 8):
        self.stubs = stubs
        self.accounts = accounts
        self.phase = "before"
        self.records: list[Record] = []
        self.ledger = Ledger({a.email: a.password for a in accounts})
        self._paragraphs = paragraphs_per_upload
        self._counter = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, workers: int = 4) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def reconnect(self, stubs: Stubs) -> None:
        self.stubs = stubs

    async def _worker(self, index: int) -> None:
        kinds = ["upload", "me", "query", "list", "register", "search", "conversation"]
        for step in itertools.count(index):
            if self._stop.is_set():
                return
            kind = kinds[step % len(kinds)]
            account = self.accounts[step % len(self.accounts)]
            started = self.phase
            try:
                await self._call(kind, account)
                error = None
            except grpc.aio.AioRpcError as failed:
                error = failed
            ended = self.phase
            phase = started if started == ended else f"{started}->{ended}"
            record = (
                Record(phase, kind, OK, "") if error is None else error_record(phase, kind, error)
            )
            self.records.append(record)
            await asyncio.sleep(0.05 if record.code == OK else 0.2)

    async def _call(self, kind: str, account: Account) -> None:
        md, stubs, n = account.metadata, self.stubs, next(self._counter)
        timeout = CALL_TIMEOUT
        if kind == "register":
            email = unique_email("load")
            await stubs.auth.Register(
                auth_pb.RegisterRequest(email=email, password=PASSWORD), timeout=timeout
            )
            self.ledger.accounts[email] = PASSWORD
        elif kind == "me":
            await stubs.users.GetCurrentUser(
                users_pb.GetCurrentUserRequest(), metadata=md, timeout=timeout
            )
        elif kind == "upload":
            content = paragraphs(f"topic{n}x{uuid.uuid4().hex[:6]}", self._paragraphs)
            response = await stubs.kb.UploadDocument(
                kb.UploadDocumentRequest(filename=f"log-{n}.txt", content=content),
                metadata=md,
                timeout=timeout,
            )
            self.ledger.documents[response.document.document_id] = (account, len(content))
        elif kind == "list":
            await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=md, timeout=timeout)
        elif kind == "search":
            await stubs.kb.SearchKnowledgeBase(
                kb.SearchKnowledgeBaseRequest(query="tide and salinity"),
                metadata=md,
                timeout=timeout,
            )
        elif kind == "query":
            reply = await stubs.agent.Query(
                agent_pb.QueryRequest(query=f"What changed at station {n}?"),
                metadata=md,
                timeout=timeout,
            )
            self.ledger.conversations[reply.conversation_id] = account
        elif kind == "conversation":
            mine = [c for c, owner in self.ledger.conversations.items() if owner is account]
            request = agent_pb.GetConversationRequest(conversation_id=mine[-1] if mine else "")
            if mine:
                await stubs.agent.GetConversation(request, metadata=md, timeout=timeout)
            else:
                await stubs.agent.ListConversations(
                    agent_pb.ListConversationsRequest(), metadata=md, timeout=timeout
                )

    def codes(self, phase: str) -> collections.Counter[tuple[str, str]]:
        return collections.Counter((r.kind, r.code.name) for r in self.records if r.phase == phase)

    def faults(self) -> list[Record]:
        return [r for r in self.records if r.code in FAULTS]

    def summary(self) -> str:
        phases = sorted({r.phase for r in self.records})
        return "\n".join(f"{p}: {dict(self.codes(p))}" for p in phases)


async def health(stubs: Stubs, service: str) -> int:
    try:
        response = await stubs.health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    except grpc.aio.AioRpcError:
        return -1
    return int(response.status)


async def health_is(stubs: Stubs, service: str, wanted: int) -> bool:
    return await health(stubs, service) == wanted


async def answers(call: Callable[[], Awaitable[Any]]) -> bool:
    try:
        await call()
    except grpc.aio.AioRpcError:
        return False
    return True


# --- checking what was acknowledged -----------------------------------------------------


async def check_ledger(stubs: Stubs, ledger: Ledger, timeout: float = 240.0) -> None:
    """Every acknowledged account logs in, every acknowledged conversation is there with
    its question and answer, every acknowledged document is READY with its passages."""
    assert ledger.documents and ledger.conversations, "the load acknowledged nothing"
    for email, password in ledger.accounts.items():
        await login(stubs, email, password)
    for conversation_id, owner in ledger.conversations.items():
        detail = await stubs.agent.GetConversation(
            agent_pb.GetConversationRequest(conversation_id=conversation_id),
            metadata=owner.metadata,
        )
        assert len(detail.messages) >= 2, (conversation_id, detail)
    deadline = time.monotonic() + timeout
    for document_id, (owner, _) in ledger.documents.items():
        while True:
            reply = await stubs.kb.GetDocument(
                kb.GetDocumentRequest(document_id=document_id), metadata=owner.metadata
            )
            document = reply.document
            if document.status != kb_pb.DOCUMENT_STATUS_PROCESSING:
                break
            assert time.monotonic() < deadline, f"{document_id} still PROCESSING: {document}"
            await asyncio.sleep(0.5)
        assert document.status == kb_pb.DOCUMENT_STATUS_READY, (document_id, document)
        found = await stubs.kb.SearchKnowledgeBase(
            kb.SearchKnowledgeBaseRequest(
                query="tide wind salinity station", top_k=100, document_ids=[document_id]
            ),
            metadata=owner.metadata,
        )
        assert len(found.results) == document.chunk_count > 0, (document_id, document)


# --- the server process ------------------------------------------------------------------

START_TIMEOUT = 180.0  # model loading on a busy 2-core machine


@dataclass
class Served:
    """A running `agentmesh serve`: its process, JSON log lines, other output, addresses."""

    process: asyncio.subprocess.Process
    logs: list[dict[str, Any]] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)


async def _collect(stream: asyncio.StreamReader, served: Served) -> None:
    async for raw in stream:
        try:
            served.logs.append(json.loads(raw))
        except ValueError:
            served.other.append(raw.decode(errors="replace").rstrip())


@contextlib.asynccontextmanager
async def serving(env: dict[str, str]) -> AsyncIterator[Served]:
    """`agentmesh serve` until it logs that it serves; killed on exit if still running."""
    process = await asyncio.create_subprocess_exec(
        *AGENTMESH, "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    served = Served(process)
    collector = asyncio.create_task(_collect(process.stderr, served))
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (ready := [r for r in served.logs if r.get("message") == "agentmesh serving"]):
            assert process.returncode is None and time.monotonic() < deadline, (
                f"agentmesh serve did not start (exit {process.returncode}): "
                f"{[r.get('message') for r in served.logs][-10:]} {served.other[-20:]}"
            )
            await asyncio.sleep(0.1)
        served.addresses = {key: ready[0][key] for key in ("grpc", "http", "ops")}
        yield served
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        collector.cancel()


def server_errors(served: Served) -> list[str]:
    """ERROR lines of the server's log (an unhandled error, a run that failed unexpectedly),
    with the last line of their traceback."""
    return [
        f"{line.get('message')} | {str(line.get('exc_info', '')).strip().splitlines()[-1:]}"
        for line in served.logs
        if line.get("level") in {"ERROR", "CRITICAL"}
    ]


def server_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    return cli_env(
        data_dir,
        AGENTMESH_DATABASE_URL=database_url,
        AGENTMESH_ENVOY_ENABLED="false",
        AGENTMESH_JWT_SECRET=TEST_JWT_SECRET,
        AGENTMESH_SHUTDOWN_GRACE_SECONDS="1",
        # Every call comes from 127.0.0.1: limits out of the load's reach.
        AGENTMESH_RATE_LIMIT_PER_USER="1000000",
        AGENTMESH_RATE_LIMIT_PER_IP="1000000",
        AGENTMESH_RATE_LIMIT_CREDENTIALS_PER_IP="1000000",
        AGENTMESH_QUOTA_USER_DAILY_QUERIES="0",
        AGENTMESH_QUOTA_USER_MONTHLY_QUERIES="0",
        # A killed server's jobs run again within seconds.
        AGENTMESH_INGEST_STALLED_SECONDS="3",
        AGENTMESH_INGEST_SWEEP_SECONDS="1",
        **extra,
    )


def through(proxy: TcpProxy, url: str) -> str:
    """`url` with its host and port replaced by the proxy's."""
    parts = urlsplit(url)
    credentials, _, _ = parts.netloc.rpartition("@")
    host = f"127.0.0.1:{proxy.port}"
    return parts._replace(netloc=f"{credentials}@{host}" if credentials else host).geturl()


@contextlib.asynccontextmanager
async def proxied(url: str, default_port: int) -> AsyncIterator[tuple[TcpProxy, str]]:
    parts = urlsplit(url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or default_port)
    await proxy.start()
    try:
        yield proxy, through(proxy, url)
    finally:
        with contextlib.suppress(AssertionError):  # already stopped
            await proxy.stop()


@contextlib.asynccontextmanager
async def loaded(served: Served, users: int = 3) -> AsyncIterator[tuple[Stubs, Load]]:
    stubs = Stubs.connect(served.addresses["grpc"])
    accounts = [await new_user(stubs, "loaded") for _ in range(users)]
    load = Load(stubs, accounts)
    load.start()
    try:
        yield stubs, load
    finally:
        await load.stop()
        await load.stubs.channel.close()


# --- the faults --------------------------------------------------------------------------
# Each fault runs once, in a class-scoped fixture that keeps the server up for the class's
# tests; each test checks one property, so a failure names the property that broke.


@dataclass
class Scenario:
    served: Served
    stubs: Stubs
    load: Load
    # What the test saw happen, by step ("NOT_SERVING agent", "recovered", ...): True when
    # it happened within PROBE_WAIT.
    seen: dict[str, bool] = field(default_factory=dict)

    async def wait(self, step: str, check: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + PROBE_WAIT
        while True:
            ok = await check()
            if ok or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        self.seen[step] = ok

    def missed(self) -> list[str]:
        return [step for step, ok in self.seen.items() if not ok]


@contextlib.asynccontextmanager
async def database(factory: pytest.TempPathFactory) -> AsyncIterator[Database]:
    db = Database("postgres", factory.mktemp("db"))
    await db.create()
    await db.migrate()
    try:
        yield db
    finally:
        await db.drop()


async def unfinished_jobs(database_url: str) -> int:
    """Ingestion jobs queued or running (the durable queue's table)."""
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    connection = await asyncpg.connect(dsn)
    try:
        query = "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')"
        return int(await connection.fetchval(query))
    finally:
        await connection.close()


def run_failures(served: Served) -> list[str]:
    """Server log lines of errors a client got as INTERNAL: unhandled errors in handlers
    and agent runs that failed unexpectedly."""
    return [
        line
        for line in server_errors(served)
        if line.startswith("unhandled error") or line.startswith("agent run ")
    ]


def no_server_faults(scenario: Scenario) -> None:
    load, served = scenario.load, scenario.served
    faults = load.faults()
    assert not faults, (
        f"{len(faults)} calls ended UNKNOWN/INTERNAL, e.g. {faults[:3]}\n{load.summary()}\n"
        f"server log: {server_errors(served)[:5]}"
    )
    assert not run_failures(served), run_failures(served)[:5]


def clean_phases(load: Load, *phases: str) -> None:
    for phase in phases:
        codes = {code for _, code in load.codes(phase)}
        assert codes == {"OK"}, f"{phase}: {dict(load.codes(phase))}"


@pytest.fixture(scope="class")
async def postgres_cut(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scenario]:
    """Load; PostgreSQL cut until every service reports NOT_SERVING; restored; load again."""
    async with (
        database(tmp_path_factory) as db,
        proxied(db.url, 5432) as (proxy, url),
        serving(server_env(tmp_path_factory.mktemp("data"), url)) as served,
        loaded(served) as (stubs, load),
    ):
        scenario = Scenario(served, stubs, load)
        everything = ["", *(s.name for s in SERVICES)]
        await asyncio.sleep(3)
        load.phase = "outage"
        await proxy.stop()
        for service in everything:
            await scenario.wait(
                f"{service or 'server'} NOT_SERVING",
                functools.partial(health_is, stubs, service, NOT_SERVING),
            )
        await asyncio.sleep(2)
        load.phase = "recovery"
        await proxy.start()
        account = load.accounts[0]
        me = functools.partial(
            stubs.users.GetCurrentUser,
            users_pb.GetCurrentUserRequest(),
            metadata=account.metadata,
            timeout=5,
        )
        await scenario.wait("calls answer again", functools.partial(answers, me))
        for service in everything:
            await scenario.wait(
                f"{service or 'server'} SERVING again",
                functools.partial(health_is, stubs, service, SERVING),
            )
        load.phase = "after"
        await asyncio.sleep(3)
        await load.stop()
        scenario.seen["no restart"] = served.process.returncode is None
        yield scenario


class TestPostgresCutUnderLoad:
    async def test_no_call_ends_internal_or_unknown(self, postgres_cut: Scenario) -> None:
        no_server_faults(postgres_cut)

    async def test_calls_are_unavailable_while_it_is_away(self, postgres_cut: Scenario) -> None:
        load = postgres_cut.load
        clean_phases(load, "before", "after")
        outage = {code for _, code in load.codes("outage")} - {f.name for f in FAULTS}
        assert outage <= {"OK", "UNAVAILABLE"}, load.summary()
        assert "UNAVAILABLE" in outage, load.summary()

    async def test_health_follows_and_it_recovers_without_restart(
        self, postgres_cut: Scenario
    ) -> None:
        assert not postgres_cut.missed(), postgres_cut.seen

    async def test_every_acknowledged_write_is_there(self, postgres_cut: Scenario) -> None:
        await check_ledger(postgres_cut.stubs, postgres_cut.load.ledger)


@pytest.fixture(scope="class")
async def redis_cut(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scenario]:
    """Load; Redis cut until the services that need it report NOT_SERVING; restored."""
    await redis_up()
    async with (
        database(tmp_path_factory) as db,
        proxied(REDIS_URL, 6379) as (proxy, url),
        serving(
            server_env(
                tmp_path_factory.mktemp("data"),
                db.url,
                AGENTMESH_REDIS_URL=url,
                AGENTMESH_REDIS_KEY_PREFIX=f"agentmesh-faults-{uuid.uuid4().hex}:",
            )
        ) as served,
        loaded(served) as (stubs, load),
    ):
        scenario = Scenario(served, stubs, load)
        await asyncio.sleep(3)
        load.phase = "outage"
        await proxy.stop()
        for service in sorted(NEEDS_REDIS):
            await scenario.wait(
                f"{service} NOT_SERVING", functools.partial(health_is, stubs, service, NOT_SERVING)
            )
        for service in sorted({s.name for s in SERVICES} - NEEDS_REDIS):
            scenario.seen[f"{service} still SERVING"] = await health_is(stubs, service, SERVING)
        await asyncio.sleep(3)
        load.phase = "recovery"
        await proxy.start()
        query = functools.partial(
            stubs.agent.Query,
            agent_pb.QueryRequest(query="back?"),
            metadata=load.accounts[0].metadata,
            timeout=10,
        )
        await scenario.wait("queries answer again", functools.partial(answers, query))
        for service in sorted(NEEDS_REDIS):
            await scenario.wait(
                f"{service} SERVING again", functools.partial(health_is, stubs, service, SERVING)
            )
        load.phase = "after"
        await asyncio.sleep(3)
        await load.stop()
        yield scenario


class TestRedisCutUnderLoad:
    async def test_no_call_ends_internal_or_unknown(self, redis_cut: Scenario) -> None:
        no_server_faults(redis_cut)

    async def test_statuses_follow_the_configured_modes(self, redis_cut: Scenario) -> None:
        """The limiter's modes at their defaults: ordinary calls fail open; credential RPCs
        (Register here) fail closed, RESOURCE_EXHAUSTED RATE_LIMITER_UNAVAILABLE with
        RetryInfo, unless RATE_LIMIT_CREDENTIALS_FAIL_OPEN; the agent, which keeps runs and
        quotas in Redis, is UNAVAILABLE or still answers; nothing else needs Redis."""
        load = redis_cut.load
        clean_phases(load, "before", "after")
        credentials_open = default_setting("rate_limit_credentials_fail_open", True)
        assert default_setting("rate_limit_fail_open", True), "the fail-open default changed"
        for record in (r for r in load.records if r.phase == "outage"):
            where = f"{record}\n{load.summary()}"
            if record.code in FAULTS:
                continue  # test_no_call_ends_internal_or_unknown
            if record.kind in CREDENTIAL_KINDS and not credentials_open:
                assert record.code == grpc.StatusCode.RESOURCE_EXHAUSTED, where
                assert record.reason == "RATE_LIMITER_UNAVAILABLE" and record.retry, where
            elif SERVICE_OF[record.kind] in NEEDS_REDIS:
                assert record.code in {OK, UNAVAILABLE}, where
            else:
                assert record.code == OK, where

    async def test_health_follows_and_it_recovers_on_its_own(self, redis_cut: Scenario) -> None:
        assert not redis_cut.missed(), redis_cut.seen

    async def test_every_acknowledged_write_is_there(self, redis_cut: Scenario) -> None:
        await check_ledger(redis_cut.stubs, redis_cut.load.ledger)


@pytest.fixture(scope="class")
async def killed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scenario]:
    """Load with uploads large enough to be mid-ingestion; SIGKILL; the server started again
    on the same database and data directory; load again."""
    async with database(tmp_path_factory) as db:
        env = server_env(tmp_path_factory.mktemp("data"), db.url)
        async with serving(env) as first:
            stubs = Stubs.connect(first.addresses["grpc"])
            accounts = [await new_user(stubs, "killed") for _ in range(3)]
            load = Load(stubs, accounts, paragraphs_per_upload=40)
            load.start()
            await asyncio.sleep(5)
            pending = await unfinished_jobs(db.url)
            load.phase = "killed"
            first.process.send_signal(signal.SIGKILL)
            assert await first.process.wait() == -signal.SIGKILL
        async with serving(env) as second:
            old, load.stubs = load.stubs, Stubs.connect(second.addresses["grpc"])
            await old.channel.close()
            load.phase = "restarted"
            await asyncio.sleep(3)
            await load.stop()
            scenario = Scenario(second, load.stubs, load)
            scenario.seen["ingestion jobs in flight at the kill"] = pending > 0
            try:
                yield scenario
            finally:
                await load.stubs.channel.close()


class TestKill9UnderLoad:
    async def test_no_call_ends_internal_or_unknown(self, killed: Scenario) -> None:
        no_server_faults(killed)
        clean_phases(killed.load, "before", "restarted")

    async def test_every_acknowledged_write_survives_and_ingestion_finishes(
        self, killed: Scenario
    ) -> None:
        assert killed.load.ledger.documents, "no upload was acknowledged before the kill"
        assert not killed.missed(), killed.seen  # else the kill proved nothing about the queue
        await check_ledger(killed.stubs, killed.load.ledger)


# --- what the load found, pinned -----------------------------------------------------------


async def test_a_query_while_postgres_is_away_is_unavailable_not_internal(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Found under load: an agent run that meets the database outage (its persist step)
    ends RunFailed, INTERNAL, where every other call says UNAVAILABLE."""
    async with (
        database(tmp_path_factory) as db,
        proxied(db.url, 5432) as (proxy, url),
        running_app(url, tmp_path_factory.mktemp("data")) as (_, stubs),
    ):
        user = await new_user(stubs)
        await stubs.agent.Query(agent_pb.QueryRequest(query="hello"), metadata=user.metadata)
        await proxy.stop()
        try:
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "Query": lambda: stubs.agent.Query(
                    agent_pb.QueryRequest(query="hello"), metadata=user.metadata
                ),
                "StreamQuery": lambda: _drain(
                    stubs.agent.StreamQuery(
                        agent_pb.StreamQueryRequest(query="hello"), metadata=user.metadata
                    )
                ),
            }
            seen = {}
            for name, call in calls.items():
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call()
                record = error_record("outage", name, caught.value)
                seen[name] = (record.code.name, record.reason, record.details)
            expected = ("UNAVAILABLE", "DATABASE_UNAVAILABLE")
            assert all(got[:2] == expected for got in seen.values()), seen
        finally:
            await proxy.start()  # the server shuts down quickly with its database back


async def _drain(stream: Any) -> list[Any]:
    return [event async for event in stream]
