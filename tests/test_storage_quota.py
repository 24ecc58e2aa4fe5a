"""The per-user storage quota through the real server, on SQLite and PostgreSQL: uploads
count their size, replacements their new size, deletes give it back, identical content is
free; an upload over the quota is RESOURCE_EXHAUSTED with QuotaFailure and stores nothing;
concurrent uploads cannot pass on the same room; GetUsage reports it."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb

from tests.backends import BACKENDS, Database
from tests.harness import Account, Stubs, new_user, running_app
from tests.knowledge import upload
from tests.rpc_errors import error_info, quota_violations

QUOTA = 1000


def text(size: int, seed: str) -> bytes:
    """A distinct text document of exactly `size` bytes."""
    line = f"Document {seed}: quarterly figures and notes.\n".encode()
    return (line * (size // len(line) + 1))[:size]


@pytest.fixture(scope="module", params=BACKENDS)
async def quota_stubs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stubs]:
    """A server whose users may store QUOTA bytes each, on a database of its own."""
    database = Database(request.param, tmp_path_factory.mktemp("db"))
    await database.create()
    await database.migrate()
    try:
        data = tmp_path_factory.mktemp("data")
        async with running_app(database.url, data, storage_quota_bytes=QUOTA) as (_, stubs):
            yield stubs
    finally:
        await database.drop()


async def over_quota(stubs: Stubs, account: Account, content: bytes, **fields: object) -> str:
    """The message of the STORAGE_QUOTA_EXCEEDED refusal of this upload."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, "over.txt", content, **fields)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    info = error_info(error)
    assert info.reason == "STORAGE_QUOTA_EXCEEDED"
    assert info.metadata["limit_bytes"] == str(QUOTA)
    assert quota_violations(error) == [
        (f"user:{account.user_id}", f"{QUOTA} bytes of stored documents")
    ]
    return error.details() or ""


async def sizes(stubs: Stubs, account: Account) -> list[int]:
    listed = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=account.metadata)
    return sorted(document.size_bytes for document in listed.documents)


async def storage(stubs: Stubs, account: Account) -> tuple[int, int, int, bool]:
    analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
    usage = await analytics.GetUsage(analytics_pb.GetUsageRequest(), metadata=account.metadata)
    s = usage.storage
    return s.limit_bytes, s.used_bytes, s.remaining_bytes, s.unlimited


async def test_uploads_count_until_the_quota_and_deletes_give_room_back(
    quota_stubs: Stubs,
) -> None:
    stubs = quota_stubs
    user, other = await new_user(stubs), await new_user(stubs)
    first = await upload(stubs, user, "a.txt", text(600, "a"))
    await upload(stubs, user, "b.txt", text(400, "b"))  # exactly the quota
    assert await storage(stubs, user) == (QUOTA, 1000, 0, False)

    message = await over_quota(stubs, user, text(1, "c"))
    assert "1 bytes" in message and "leave 0 of 1000 bytes" in message
    assert await sizes(stubs, user) == [400, 600]  # the refused upload stored nothing
    # Identical content is the same document again: it takes no more room.
    again = await upload(stubs, user, "again.txt", text(600, "a"))
    assert again.deduplicated and again.document.document_id == first.document.document_id
    # Another user's quota is their own.
    await upload(stubs, other, "c.txt", text(900, "c"))

    await stubs.kb.DeleteDocument(
        kb.DeleteDocumentRequest(document_id=first.document.document_id), metadata=user.metadata
    )
    assert await storage(stubs, user) == (QUOTA, 400, 600, False)
    await upload(stubs, user, "d.txt", text(600, "d"))
    assert await sizes(stubs, user) == [400, 600]


async def test_a_replacement_counts_its_new_size_instead_of_the_old(quota_stubs: Stubs) -> None:
    stubs = quota_stubs
    user = await new_user(stubs)
    kept = await upload(stubs, user, "kept.txt", text(300, "kept"))
    replaced = await upload(stubs, user, "r.txt", text(500, "r1"))
    document_id = replaced.document.document_id
    # 300 + 700 = 1000: fits, because the old 500 bytes no longer count.
    await upload(stubs, user, "r.txt", text(700, "r2"), document_id=document_id)
    assert await sizes(stubs, user) == [300, 700]
    message = await over_quota(stubs, user, text(701, "r3"), document_id=document_id)
    assert "leave 700 of 1000 bytes" in message
    assert await sizes(stubs, user) == [300, 700]  # the refused replacement changed nothing
    assert kept.document.size_bytes == 300


async def test_concurrent_uploads_never_exceed_the_quota(quota_stubs: Stubs) -> None:
    stubs = quota_stubs
    user = await new_user(stubs)
    results = await asyncio.gather(
        *(upload(stubs, user, f"{n}.txt", text(300, str(n))) for n in range(10)),
        return_exceptions=True,
    )
    stored = [r for r in results if isinstance(r, kb.UploadDocumentResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(stored) == 3 and len(refused) == 7, results
    assert {error_info(e).reason for e in refused} == {"STORAGE_QUOTA_EXCEEDED"}
    assert await sizes(stubs, user) == [300, 300, 300]


async def test_usage_reports_an_unlimited_quota(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    database = Database("sqlite", tmp_path)
    database.url = url
    await database.migrate()
    async with running_app(url, tmp_path / "data", storage_quota_bytes=0) as (_, stubs):
        user = await new_user(stubs)
        await upload(stubs, user, "a.txt", text(5000, "a"))
        assert await storage(stubs, user) == (0, 5000, 0, True)
