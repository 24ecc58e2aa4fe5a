"""KnowledgeBaseService end to end: real server, real model, real Qdrant (embedded), on
SQLite and PostgreSQL."""

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from sqlalchemy import select

from server.main import Application
from services.db import create_engine
from services.knowledge.embeddings import packaged_model_path
from services.knowledge.models import Document
from services.knowledge.qdrant_edge_store import QdrantEdgeStore
from services.knowledge.vector_store import StoredPoint
from tests.backends import Database
from tests.documents import make_docx, make_pdf, make_zip_bomb
from tests.harness import Account, Stubs, new_admin, new_user, running_app
from tests.knowledge import get_document, ingest, search, upload, wait_settled
from tests.rpc_errors import error_info, field_violations

HYBRID, DENSE, SPARSE = kb.SEARCH_MODE_HYBRID, kb.SEARCH_MODE_DENSE, kb.SEARCH_MODE_SPARSE
ALL_MODES = (HYBRID, DENSE, SPARSE)


def filler(topic: str, paragraphs: int) -> str:
    """Many distinct paragraphs about `topic` (distinct, so chunks are not duplicates)."""
    return "\n\n".join(
        f"Paragraph {i} about {topic}: observation number {i} records how the {topic} "
        f"behaved on day {i} of the study, with measurements and notes from the field team."
        for i in range(paragraphs)
    )


async def list_ids(stubs: Stubs, account: Account) -> list[str]:
    response = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=account.metadata)
    return [d.document_id for d in response.documents]


# --- each format ingests and is found ------------------------------------------------


async def test_text_document_is_ingested_and_found(stubs: Stubs) -> None:
    account = await new_user(stubs)
    text = (
        "Quarterly report\n\nThe heliotrope turbine reached 94 percent efficiency in trials.\n\n"
        + filler("weather", 30)
    )
    document = await ingest(stubs, account, "report.txt", text.encode())
    assert document.document_type == kb_pb.DOCUMENT_TYPE_TEXT
    assert document.chunk_count > 1 and document.page_count == 1
    results = await search(stubs, account, "heliotrope turbine efficiency")
    assert results[0].document_id == document.document_id
    top = results[0]
    assert "heliotrope turbine" in top.text
    # Offsets cite the exact passage in the document's text.
    assert text[top.start_offset : top.end_offset] == top.text
    assert set(top.legs) <= {kb_pb.RETRIEVAL_LEG_DENSE, kb_pb.RETRIEVAL_LEG_SPARSE}
    assert top.document_title == "report"


async def test_markdown_document_is_ingested_and_found(stubs: Stubs) -> None:
    account = await new_user(stubs)
    text = "# Field guide\n\n## Axolotls\n\nAxolotls regenerate entire limbs within weeks.\n"
    document = await ingest(stubs, account, "guide.md", text.encode())
    assert document.document_type == kb_pb.DOCUMENT_TYPE_MARKDOWN
    results = await search(stubs, account, "which animal regrows its limbs?", mode=DENSE)
    assert results and "Axolotls regenerate" in results[0].text


async def test_pdf_pages_are_cited(stubs: Stubs) -> None:
    account = await new_user(stubs)
    pages = [
        "Introduction. This manual describes the reactor cooling loop.",
        "Maintenance. Replace the vermilion gasket every 400 operating hours.",
        "Appendix. Contact details for the service team.",
    ]
    document = await ingest(stubs, account, "manual.bin", make_pdf(pages))
    assert document.document_type == kb_pb.DOCUMENT_TYPE_PDF
    assert document.page_count == 3
    results = await search(stubs, account, "how often to replace the vermilion gasket", top_k=1)
    assert results[0].page == 2
    assert "vermilion gasket" in results[0].text


async def test_docx_paragraphs_and_tables_are_found(stubs: Stubs) -> None:
    account = await new_user(stubs)
    content = make_docx(
        ["Onboarding", "New staff receive a cobalt badge on their first day."],
        table=[["Room", "Purpose"], ["Marigold", "quarterly planning sessions"]],
    )
    document = await ingest(stubs, account, "handbook.docx", content)
    assert document.document_type == kb_pb.DOCUMENT_TYPE_DOCX
    results = await search(stubs, account, "cobalt badge", mode=SPARSE)
    assert results and "cobalt badge" in results[0].text
    results = await search(stubs, account, "Marigold room purpose", mode=SPARSE)
    assert results and "quarterly planning" in results[0].text


async def test_each_mode_reports_its_legs(stubs: Stubs) -> None:
    account = await new_user(stubs)
    await ingest(stubs, account, "a.txt", b"Saffron is harvested by hand from crocus flowers.")
    for mode, legs in (
        (DENSE, {kb_pb.RETRIEVAL_LEG_DENSE}),
        (SPARSE, {kb_pb.RETRIEVAL_LEG_SPARSE}),
    ):
        response = await stubs.kb.SearchKnowledgeBase(
            kb.SearchKnowledgeBaseRequest(query="saffron crocus", mode=mode),
            metadata=account.metadata,
        )
        assert response.mode == mode
        assert response.results and set(response.results[0].legs) == legs
    hybrid = await search(stubs, account, "saffron crocus")
    assert set(hybrid[0].legs) == {kb_pb.RETRIEVAL_LEG_DENSE, kb_pb.RETRIEVAL_LEG_SPARSE}
    assert 0 < hybrid[0].score <= 1.0


async def test_min_score_and_top_k_bound_results(stubs: Stubs) -> None:
    account = await new_user(stubs)
    await ingest(stubs, account, "f.txt", filler("glaciers", 60).encode())
    results = await search(stubs, account, "glaciers", top_k=3)
    assert len(results) == 3
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    cut = results[1].score
    kept = await search(stubs, account, "glaciers", top_k=3, min_score=cut)
    assert kept and all(r.score >= cut for r in kept) and len(kept) <= 2


async def test_mmr_rerank_prefers_diverse_passages(stubs: Stubs) -> None:
    account = await new_user(stubs)
    repeated = "\n\n".join(["Basalt columns form when lava cools slowly and contracts."] * 1)
    for i in range(4):  # four documents saying the same thing, one saying something else
        await ingest(stubs, account, f"same{i}.txt", f"{repeated} (copy {i})".encode())
    await ingest(stubs, account, "other.txt", b"Basalt is quarried for road gravel and tiles.")
    plain = await search(stubs, account, "basalt columns lava", top_k=2, mode=DENSE)
    diverse = await search(
        stubs, account, "basalt columns lava", top_k=2, mode=DENSE, rerank=kb.RERANK_MODE_MMR
    )
    assert all("columns" in r.text for r in plain)
    assert plain[0].chunk_id == diverse[0].chunk_id
    assert "quarried" in diverse[1].text


async def test_configured_limits_and_cross_encoder(database: Database, tmp_path: Path) -> None:
    """A server with a cross-encoder (a freshly initialised head on the packaged model: the
    scores are arbitrary, the path is real) and a three-passage limit per document."""
    private = Database(database.backend, tmp_path / "db")
    await private.create()
    await private.migrate()
    overrides = {"reranker_model": packaged_model_path(), "max_chunks_per_document": 3}
    try:
        async with running_app(private.url, tmp_path / "data", **overrides) as (app, stubs):
            account = await new_user(stubs)
            response = await upload(stubs, account, "long.txt", filler("lichens", 60).encode())
            document = await wait_settled(stubs, account, response.document.document_id)
            assert document.status == kb_pb.DOCUMENT_STATUS_FAILED
            assert "too long" in document.failure_reason and "limit is 3" in document.failure_reason
            assert await app.domain.knowledge.indexed_chunks(uuid.UUID(document.document_id)) == 0

            for plant in ("mosses", "ferns", "liverworts"):
                await ingest(stubs, account, f"{plant}.txt", filler(plant, 3).encode())
            fused = await search(stubs, account, "mosses and ferns", top_k=3)
            reranked = await search(
                stubs, account, "mosses and ferns", top_k=3, rerank=kb.RERANK_MODE_CROSS_ENCODER
            )
            assert len(fused) == len(reranked) == 3
            assert {r.chunk_id for r in reranked} == {r.chunk_id for r in fused}
            assert [r.score for r in reranked] == sorted((r.score for r in reranked), reverse=True)
            assert {r.score for r in reranked}.isdisjoint({r.score for r in fused})
    finally:
        await private.drop()


async def test_cross_encoder_without_model_is_failed_precondition(stubs: Stubs) -> None:
    account = await new_user(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(stubs, account, "anything", rerank=kb.RERANK_MODE_CROSS_ENCODER)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "RERANKER_NOT_CONFIGURED"


# --- bad input: the documented error, nothing left behind -----------------------------


@pytest.mark.parametrize(
    ("filename", "content", "needle"),
    [
        ("photo.pdf", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "PDF, DOCX, TXT or Markdown"),
        ("notes.txt", "caf\xe9".encode("latin-1") + b" au lait", "UTF-8"),
        ("notes.txt", b"text with a \x00 NUL byte", "PDF, DOCX, TXT or Markdown"),
        ("empty.txt", b"", "empty"),
        ("blank.md", b"  \n\n \t ", "empty"),
    ],
    ids=["renamed-binary", "invalid-utf8", "nul-byte", "empty", "whitespace"],
)
async def test_bad_content_is_invalid_argument_and_leaves_nothing(
    stubs: Stubs, filename: str, content: bytes, needle: str
) -> None:
    account = await new_user(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, filename, content)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert needle in " ".join(violations["content"])
    assert await list_ids(stubs, account) == []


async def test_zip_bomb_is_rejected_before_extraction(stubs: Stubs) -> None:
    account = await new_user(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, "bomb.docx", make_zip_bomb())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "content" in field_violations(caught.value)
    assert await list_ids(stubs, account) == []


async def test_oversized_upload_is_resource_exhausted(app: Application, stubs: Stubs) -> None:
    account = await new_user(stubs)
    limit = app.settings.max_upload_bytes
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, "big.txt", b"a" * (limit + 1))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "DOCUMENT_TOO_LARGE"
    # Far over the cap, gRPC's own receive limit answers, with the same code.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, "huge.txt", b"a" * (limit + 2 * 1024 * 1024))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await list_ids(stubs, account) == []


async def test_exactly_the_cap_is_accepted(app: Application, stubs: Stubs) -> None:
    account = await new_user(stubs)
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n"
    content = (line * (app.settings.max_upload_bytes // len(line) + 1))[
        : app.settings.max_upload_bytes
    ]
    response = await upload(stubs, account, "cap.txt", content)
    assert response.document.size_bytes == app.settings.max_upload_bytes
    await stubs.kb.DeleteDocument(
        kb.DeleteDocumentRequest(document_id=response.document.document_id),
        metadata=account.metadata,
    )


async def test_unreadable_pdf_fails_with_reason_and_no_passages(
    app: Application, stubs: Stubs
) -> None:
    account = await new_user(stubs)
    broken = make_pdf(["A page that will be cut off."])[:200]
    response = await upload(stubs, account, "broken.pdf", broken)
    assert response.document.status == kb_pb.DOCUMENT_STATUS_PROCESSING
    document = await wait_settled(stubs, account, response.document.document_id)
    assert document.status == kb_pb.DOCUMENT_STATUS_FAILED
    assert document.failure_reason
    assert document.stage == kb_pb.INGESTION_STAGE_PARSING
    assert document.chunk_count == 0
    assert await app.domain.knowledge.indexed_chunks(uuid.UUID(document.document_id)) == 0


async def test_invalid_fields_name_each_violation(stubs: Stubs) -> None:
    account = await new_user(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, "", b"hello", title="t" * 301, document_id="not-a-uuid")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"filename", "title", "document_id"} <= set(field_violations(caught.value))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(stubs, account, "", top_k=101, document_ids=["nope"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {"query", "top_k", "document_ids[0]"} <= set(field_violations(caught.value))


async def test_a_search_narrowed_to_too_many_documents_is_refused(stubs: Stubs) -> None:
    account = await new_user(stubs)
    ids = [str(uuid.uuid4()) for _ in range(101)]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(stubs, account, "anything", document_ids=ids)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(caught.value)) == ["document_ids"]
    assert await search(stubs, account, "anything", document_ids=ids[:100]) == []


async def test_sharing_needs_an_administrator(stubs: Stubs) -> None:
    account = await new_user(stubs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, account, "s.txt", b"shared notes", shared=True)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await list_ids(stubs, account) == []


# --- isolation ----------------------------------------------------------------------


async def test_users_never_see_each_others_passages(app: Application, stubs: Stubs) -> None:
    alice, bob = await new_user(stubs, "alice"), await new_user(stubs, "bob")
    secret = "The launch code for project nightjar is tangerine-4471."
    alices = await ingest(
        stubs, alice, "secret.txt", f"{secret}\n\n{filler('nightjar', 5)}".encode()
    )
    await ingest(stubs, bob, "mine.txt", b"Bob's grocery list: apples, bread, tangerines.")
    queries = [
        secret,
        "nightjar launch code",
        "tangerine-4471",
        "*",
        "' OR 1=1 --",
        f'owner_id:"{alice.user_id}"',
        alice.user_id,
        alices.document_id,
    ]
    for query in queries:
        for mode in ALL_MODES:
            results = await search(stubs, bob, query, mode=mode, top_k=100)
            assert all(r.document_id != alices.document_id for r in results), (query, mode)
            filtered = await search(
                stubs, bob, query, mode=mode, top_k=100, document_ids=[alices.document_id]
            )
            assert filtered == [], (query, mode)
    # Alice still finds it, so the searches above could have found it.
    assert (await search(stubs, alice, "nightjar launch code"))[0].document_id == alices.document_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_document(stubs, bob, alices.document_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.kb.DeleteDocument(
            kb.DeleteDocumentRequest(document_id=alices.document_id), metadata=bob.metadata
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    # Replacing someone else's document is NOT_FOUND too, and changes nothing.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upload(stubs, bob, "x.txt", b"overwrite", document_id=alices.document_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await get_document(stubs, alice, alices.document_id)).content_sha256 == (
        alices.content_sha256
    )
    assert alices.document_id not in await list_ids(stubs, bob)


async def test_shared_documents_are_searchable_by_everyone(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs)
    response = await upload(
        stubs,
        admin,
        "policy.txt",
        b"Company policy: expense reports are due by the fifth.",
        shared=True,
    )
    document = await wait_settled(stubs, admin, response.document.document_id)
    assert document.shared
    results = await search(stubs, user, "when are expense reports due")
    assert results and results[0].document_id == document.document_id
    assert (await get_document(stubs, user, document.document_id)).title == "policy"
    # Visible is not owned: only the owner deletes, and only the owner lists it.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.kb.DeleteDocument(
            kb.DeleteDocumentRequest(document_id=document.document_id), metadata=user.metadata
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert document.document_id not in await list_ids(stubs, user)
    await stubs.kb.DeleteDocument(
        kb.DeleteDocumentRequest(document_id=document.document_id), metadata=admin.metadata
    )


# --- lifecycle: delete, idempotency, replace, listing ---------------------------------


async def test_delete_removes_rows_and_passages(app: Application, stubs: Stubs) -> None:
    account = await new_user(stubs)
    document = await ingest(stubs, account, "d.txt", b"Ostriches can run at seventy km per hour.")
    assert (await search(stubs, account, "ostrich speed"))[0].document_id == document.document_id
    await stubs.kb.DeleteDocument(
        kb.DeleteDocumentRequest(document_id=document.document_id), metadata=account.metadata
    )
    assert await search(stubs, account, "ostrich speed") == []
    assert await app.domain.knowledge.indexed_chunks(uuid.UUID(document.document_id)) == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_document(stubs, account, document.document_id)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_same_content_twice_is_one_document(stubs: Stubs) -> None:
    account = await new_user(stubs)
    content = b"Idempotent uploads keep a single copy of identical content."
    first = await upload(stubs, account, "one.txt", content)
    second = await upload(stubs, account, "two.txt", content)
    assert not first.deduplicated and second.deduplicated
    assert second.document.document_id == first.document.document_id
    await wait_settled(stubs, account, first.document.document_id)
    third = await upload(stubs, account, "three.txt", content)
    assert third.deduplicated and third.document.document_id == first.document.document_id
    assert await list_ids(stubs, account) == [first.document.document_id]
    # Another user uploading the same bytes gets their own document.
    other = await new_user(stubs)
    assert not (await upload(stubs, other, "one.txt", content)).deduplicated


async def test_replacing_content_swaps_passages_atomically(app: Application, stubs: Stubs) -> None:
    account = await new_user(stubs)
    old = filler("zebra", 80)
    new = filler("giraffe", 80)
    document = await ingest(stubs, account, "animals.txt", old.encode())
    assert document.chunk_count > 5
    response = await upload(
        stubs, account, "animals-v2.txt", new.encode(), document_id=document.document_id
    )
    assert response.document.document_id == document.document_id
    assert response.document.status == kb_pb.DOCUMENT_STATUS_PROCESSING
    seen: list[str] = []
    while True:
        status = (await get_document(stubs, account, document.document_id)).status
        results = await search(
            stubs,
            account,
            "observation measurements field team",
            top_k=100,
            document_ids=[document.document_id],
        )
        versions = {"zebra" if "zebra" in r.text else "giraffe" for r in results}
        assert len(versions) == 1, "a search saw both versions"
        seen.append(versions.pop())
        if status != kb_pb.DOCUMENT_STATUS_PROCESSING:
            break
    assert status == kb_pb.DOCUMENT_STATUS_READY
    assert seen[0] == "zebra" and seen[-1] == "giraffe"
    assert seen == sorted(seen, key=lambda v: v == "giraffe"), "went back to the old version"
    final = await get_document(stubs, account, document.document_id)
    assert final.title == "animals" and final.content_sha256 != document.content_sha256
    assert await app.domain.knowledge.indexed_chunks(uuid.UUID(document.document_id)) == (
        final.chunk_count
    )


async def test_stale_passages_in_the_index_never_crowd_out_served_ones(
    app: Application, stubs: Stubs
) -> None:
    """Passages of a generation the database does not serve (left by a crash, or in the
    moment between a swap and the old generation's deletion) rank like the real ones:
    a search reads documents window by window until it has top_k servable passages."""
    account = await new_user(stubs)
    document = await ingest(stubs, account, "herons.txt", filler("heron", 100).encode())
    index = app.domain.knowledge.index
    assert isinstance(index, QdrantEdgeStore)  # the tests' default: the embedded engine
    served = [
        point
        async for batch in index.scroll_points(256)
        for point in batch
        if point.payload["document_id"] == document.document_id
    ]
    assert len(served) == document.chunk_count > 10
    stale = [
        StoredPoint(str(uuid.uuid4()), p.dense, p.sparse, {**p.payload, "generation": "stale"})
        for p in served
        for _ in range(3)  # three stale twins per passage: most of every window is stale
    ]
    await index.upsert_points(stale)

    for mode in ALL_MODES:
        results = await search(stubs, account, "heron observation", top_k=8, mode=mode)
        ids = [r.chunk_id for r in results]
        assert len(ids) == len(set(ids)) == 8
        assert set(ids) <= {p.point_id for p in served}
        assert all("heron" in r.text for r in results)


async def test_failed_replacement_keeps_the_previous_version(stubs: Stubs) -> None:
    account = await new_user(stubs)
    document = await ingest(stubs, account, "v1.txt", b"Version one mentions pelicans.")
    broken = make_pdf(["cut"])[:150]
    await upload(stubs, account, "v2.pdf", broken, document_id=document.document_id)
    settled = await wait_settled(stubs, account, document.document_id)
    assert settled.status == kb_pb.DOCUMENT_STATUS_FAILED and settled.failure_reason
    results = await search(stubs, account, "pelicans")
    assert results and results[0].document_id == document.document_id


async def test_list_documents_pages_newest_first(stubs: Stubs) -> None:
    account = await new_user(stubs)
    ids = [
        (
            await upload(stubs, account, f"n{i}.txt", f"note number {i}".encode())
        ).document.document_id
        for i in range(5)
    ]
    pages: list[list[str]] = []
    token = ""
    while True:
        response = await stubs.kb.ListDocuments(
            kb.ListDocumentsRequest(page_size=2, page_token=token), metadata=account.metadata
        )
        pages.append([d.document_id for d in response.documents])
        token = response.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [2, 2, 1]
    assert [i for p in pages for i in p] == list(reversed(ids))
    for document_id in ids:
        await wait_settled(stubs, account, document_id)
    ready = await stubs.kb.ListDocuments(
        kb.ListDocumentsRequest(status=kb_pb.DOCUMENT_STATUS_READY), metadata=account.metadata
    )
    assert len(ready.documents) == 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.kb.ListDocuments(
            kb.ListDocumentsRequest(page_token="garbage"), metadata=account.metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deleting_a_user_removes_their_passages(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    account = await new_user(stubs)
    document = await ingest(stubs, account, "p.txt", b"Private notes about kumquat farming.")
    from agentmesh.auth.v1 import user_service_pb2 as users_pb

    await stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=account.user_id), metadata=admin.metadata
    )
    assert await app.domain.knowledge.indexed_chunks(uuid.UUID(document.document_id)) == 0


# --- responsiveness and restarts ------------------------------------------------------


async def test_ingestion_does_not_block_other_rpcs(stubs: Stubs) -> None:
    account = await new_user(stubs)
    response = await upload(stubs, account, "long.txt", filler("comets", 800).encode())
    document_id = response.document.document_id
    answered = 0
    for _ in range(5):
        await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=account.metadata)
        await search(stubs, account, "anything at all")
        answered += 1
    # All of those were answered while the long document was still being ingested.
    still = await get_document(stubs, account, document_id)
    assert answered == 5
    assert still.status == kb_pb.DOCUMENT_STATUS_PROCESSING
    assert (await wait_settled(stubs, account, document_id)).status == kb_pb.DOCUMENT_STATUS_READY


async def stored_status(database_url: str, document_id: str) -> str:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            query = select(Document.status).where(Document.id == uuid.UUID(document_id))
            return str((await connection.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def test_restart_resumes_interrupted_ingestion(database: Database, tmp_path: Path) -> None:
    private = Database(database.backend, tmp_path / "db")
    await private.create()
    await private.migrate()
    try:
        async with running_app(private.url, tmp_path / "data") as (_, stubs):
            account = await new_user(stubs)
            response = await upload(stubs, account, "long.txt", filler("asteroids", 300).encode())
            document_id = response.document.document_id
        # Stopped mid-ingestion: the next start picks the document up again.
        assert await stored_status(private.url, document_id) == "processing"
        async with running_app(private.url, tmp_path / "data") as (app, stubs):
            document = await wait_settled(
                stubs,
                account,
                document_id,  # access tokens stay valid across restarts
            )
            assert document.status == kb_pb.DOCUMENT_STATUS_READY
            assert document.chunk_count > 10
            indexed = await app.domain.knowledge.indexed_chunks(uuid.UUID(document_id))
            assert indexed == document.chunk_count
            results = await search(stubs, account, "asteroids observation")
            assert results and results[0].document_id == document_id
    finally:
        await private.drop()


async def test_rest_upload_and_search_through_envoy(rest: object, stubs: Stubs) -> None:
    import base64

    import aiohttp

    assert isinstance(rest, aiohttp.ClientSession)
    account = await new_user(stubs)
    headers = {"authorization": f"Bearer {account.access_token}"}
    body = {
        "filename": "rest.md",
        "content": base64.b64encode(b"# REST\n\nPlatypuses lay eggs.").decode(),
    }
    async with rest.post("/v1/kb/documents", json=body, headers=headers) as response:
        assert response.status == 200, await response.text()
        document_id = (await response.json())["document"]["document_id"]
    await wait_settled(stubs, account, document_id)
    async with rest.post(
        "/v1/kb/search", json={"query": "which mammal lays eggs", "top_k": 1}, headers=headers
    ) as response:
        assert response.status == 200
        results = (await response.json())["results"]
    assert results[0]["document_id"] == document_id
    assert results[0]["legs"]
    async with rest.post(
        "/v1/kb/documents", json={"filename": "x.txt", "content": ""}, headers=headers
    ) as response:
        assert response.status == 400


async def test_concurrent_uploads_all_settle(stubs: Stubs) -> None:
    account = await new_user(stubs)
    responses = await asyncio.gather(
        *(upload(stubs, account, f"c{i}.txt", f"Concurrent note {i}.".encode()) for i in range(8))
    )
    settled = [await wait_settled(stubs, account, r.document.document_id) for r in responses]
    assert all(d.status == kb_pb.DOCUMENT_STATUS_READY for d in settled)
