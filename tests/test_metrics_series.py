"""/metrics as users grow: the same workload by 3 users and then by 10 more leaves the
number of series unchanged, and no label (nor any other part of the scrape) carries a
user's id, e-mail or address, or the id of anything they made."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.feedback.v1 import feedback_pb2 as fb
from agentmesh.feedback.v1 import feedback_service_pb2 as fb_service
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from prometheus_client.parser import text_string_to_metric_families

from server import migrations
from server.main import Application
from tests.agent import stream
from tests.harness import PASSWORD, Account, Stubs, running_app, unique_email
from tests.knowledge import ingest, search
from tests.limited import exhausted

# Every user reaches both limits: a credentials rate limit (register, login, one failed
# login, then refused) and the daily query quota (one answer, then refused).
CREDENTIALS_PER_IP = 3
DAILY_QUERIES = 1
FIRST_USERS, MORE_USERS = 3, 10
NOTE = b"The Zephyr research reactor is cooled with liquid sodium at 550 degrees Celsius."


@dataclass
class Acted:
    """The scrapes after the first users and after the others, and what they must not show."""

    scrapes: list[str] = field(default_factory=list)
    secrets: set[str] = field(default_factory=lambda: {"127.0.0.1"})


def address(n: int) -> str:
    """A documentation-range client address claimed in x-forwarded-for by user `n`."""
    return f"203.0.113.{n}"


def series(scrape: str) -> int:
    return sum(1 for line in scrape.splitlines() if line.strip() and not line.startswith("#"))


async def act(stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub, n: int) -> set[str]:
    """One user's workload; returns what identifies the user and what they made."""
    ip, email = address(n), unique_email("series")
    claimed = (("x-forwarded-for", ip),)
    await stubs.auth.Register(
        auth_pb.RegisterRequest(email=email, password=PASSWORD, full_name="Series"),
        metadata=claimed,
    )
    tokens = await stubs.auth.Login(
        auth_pb.LoginRequest(email=email, password=PASSWORD), metadata=claimed
    )
    user = Account(tokens.user.user_id, email, PASSWORD, tokens.access_token, "")
    wrong = auth_pb.LoginRequest(email=email, password="not the password at all")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.auth.Login(wrong, metadata=claimed)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await exhausted(stubs.auth.Login(wrong, metadata=claimed), "RATE_LIMITED")

    document = await ingest(stubs, user, "note.txt", NOTE)
    assert await search(stubs, user, "How is the Zephyr reactor cooled?")
    reply = await stubs.agent.Query(
        agent_pb.QueryRequest(query="How is the Zephyr reactor cooled?"), metadata=user.metadata
    )
    await feedback.SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=reply.message.message_id, rating=fb.RATING_THUMBS_UP
        ),
        metadata=user.metadata,
    )
    await exhausted(stream(stubs, user, "And one more question?"), "QUOTA_EXCEEDED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.agent.GetConversation(
            agent_pb.GetConversationRequest(conversation_id=str(uuid.uuid4())),
            metadata=user.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    return {
        ip,
        email,
        user.user_id,
        document.document_id,
        reply.conversation_id,
        reply.message.message_id,
    }


async def scrape(app: Application) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


@pytest.fixture(scope="module")
async def acted(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Acted]:
    directory = tmp_path_factory.mktemp("series")
    url = f"sqlite+aiosqlite:///{directory / 'db.sqlite'}"
    await asyncio.to_thread(migrations.upgrade, url)
    result = Acted()
    async with running_app(
        url,
        directory / "data",
        rate_limit_credentials_per_ip=CREDENTIALS_PER_IP,
        quota_user_daily_queries=DAILY_QUERIES,
    ) as (app, stubs):
        feedback = fb_grpc.FeedbackServiceStub(stubs.channel)
        for n in range(1, FIRST_USERS + 1):
            result.secrets |= await act(stubs, feedback, n)
        result.scrapes.append(await scrape(app))
        more = range(FIRST_USERS + 1, FIRST_USERS + MORE_USERS + 1)
        for found in await asyncio.gather(*(act(stubs, feedback, n) for n in more)):
            result.secrets |= found
        result.scrapes.append(await scrape(app))
        yield result


def test_series_stay_flat_as_users_grow(acted: Acted) -> None:
    first, later = acted.scrapes
    assert series(later) == series(first)
    # Not flat by accident: the later users' activity is in the scrape.
    logins = {
        sample.labels["outcome"]: sample.value
        for family in text_string_to_metric_families(later)
        for sample in family.samples
        if sample.name == "agentmesh_logins_total"
    }
    assert logins == {"ok": FIRST_USERS + MORE_USERS, "failed": FIRST_USERS + MORE_USERS}


def test_no_user_data_in_the_scrape(acted: Acted) -> None:
    labels = {
        value
        for scrape in acted.scrapes
        for family in text_string_to_metric_families(scrape)
        for sample in family.samples
        for value in sample.labels.values()
    }
    assert labels & acted.secrets == set()
    # Nor anywhere else in the text (a name, a help string, part of a label value).
    assert [s for s in sorted(acted.secrets) if any(s in text for text in acted.scrapes)] == []
