"""Both vector store backends against the same tests: the embedded Qdrant engine
(qdrant-edge) and the Qdrant server backend, run on qdrant-client's local mode (no Qdrant
server can run here), plus the embedded shard's own promises: one owner, crash safety."""

import asyncio
import os
import signal
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient

from server.config import ROOT
from services.errors import Unavailable
from services.knowledge.chunking import Chunk
from services.knowledge.lexical import LexicalEncoder
from services.knowledge.qdrant_edge_store import QdrantEdgeStore, ShardInUse
from services.knowledge.qdrant_server_store import QdrantServerStore
from services.knowledge.vector_copy import copy_points
from services.knowledge.vector_store import (
    ChunkOwner,
    CollectionMismatch,
    SearchScope,
    VectorStore,
    point_id,
)

DIM = 16
LEXICAL = LexicalEncoder()
Opener = Callable[[], VectorStore]


def opener(kind: str, root: Path) -> Opener:
    """Opens the same index afresh on each call (to test what survives a close)."""

    def open_store() -> VectorStore:
        if kind == "edge":
            return QdrantEdgeStore(root / "vectors")
        client = AsyncQdrantClient(path=str(root / "qdrant"))
        return QdrantServerStore(client, "chunks", local=True)

    return open_store


@pytest.fixture(params=["edge", "server-local-mode"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    return opener(request.param, tmp_path)


@pytest.fixture
async def store(open_store: Opener) -> AsyncIterator[VectorStore]:
    opened = open_store()
    await opened.ensure_collection(DIM)
    yield opened
    await opened.close()


def unit(seed: int) -> list[float]:
    vector = np.random.default_rng(seed).standard_normal(DIM)
    return [float(x) for x in vector / np.linalg.norm(vector)]


TEAM = uuid.uuid4()  # a collection some tests put documents in


def owner_of(
    owner_id: uuid.UUID, *, collections: tuple[uuid.UUID, ...] = (), generation: str = "g1"
) -> ChunkOwner:
    return ChunkOwner(uuid.uuid4(), generation, owner_id, tuple(str(c) for c in collections))


async def put(store: VectorStore, owner: ChunkOwner, texts: list[str], seed: int) -> list[str]:
    """Store one chunk per text (dense vectors `unit(seed + i)`); their point ids."""
    chunks = [Chunk(i, text, 0, len(text), 1, 10) for i, text in enumerate(texts)]
    dense = [unit(seed + i) for i in range(len(texts))]
    sparse = [LEXICAL.encode_passage(text) for text in texts]
    await store.upsert(owner, chunks, dense, sparse)
    return [point_id(owner, i) for i in range(len(texts))]


async def both_legs(
    store: VectorStore, scope: SearchScope, dense: list[float], words: str
) -> tuple[set[str], set[str]]:
    dense_hits, sparse_hits = await store.search(
        scope, dense=dense, sparse=LEXICAL.encode_query(words), limit=50
    )
    return {h.point_id for h in dense_hits}, {h.point_id for h in sparse_hits}


async def test_a_search_sees_own_and_readable_collections_passages_never_another_owners(
    store: VectorStore,
) -> None:
    alice, bob, carol = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    other_team = uuid.uuid4()
    mine = await put(store, owner_of(alice), ["alpine glaciers retreat"], seed=1)
    theirs = await put(store, owner_of(bob), ["alpine glaciers advance"], seed=2)
    team = await put(
        store, owner_of(carol, collections=(other_team, TEAM)), ["alpine glaciers melt"], seed=3
    )

    # Bob's own vector as the query: the nearest passage exists, but is not Alice's to see.
    dense, sparse = await both_legs(store, SearchScope(alice, (TEAM,)), unit(2), "alpine glaciers")
    assert dense == sparse == {*mine, *team}
    dense, sparse = await both_legs(store, SearchScope(bob), unit(1), "alpine glaciers")
    assert dense == sparse == set(theirs)
    # Only the collections named: not even the caller's own passages.
    dense, sparse = await both_legs(store, SearchScope(None, (TEAM,)), unit(1), "alpine glaciers")
    assert dense == sparse == set(team)
    dense, sparse = await both_legs(store, SearchScope(None), unit(1), "alpine glaciers")
    assert dense == sparse == set()

    hits, _ = await store.search(SearchScope(alice, (TEAM,)), dense=unit(1), sparse=None, limit=5)
    assert hits[0].point_id == mine[0] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].payload["collections"] == []
    assert hits[0].payload["text"] == "alpine glaciers retreat"
    team_hit = next(h for h in hits if h.point_id == team[0])
    assert team_hit.payload["collections"] == sorted([str(other_team), str(TEAM)])
    assert team_hit.payload["owner_id"] == str(carol)


async def test_a_documents_collections_change_on_its_points_without_re_indexing(
    store: VectorStore,
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    owner = owner_of(alice, collections=(TEAM,))
    ids = await put(store, owner, ["basalt columns cool", "basalt columns crack"], seed=60)
    before = await store.dense_vectors(ids)
    assert await both_legs(store, SearchScope(bob, (TEAM,)), unit(60), "basalt") == (
        set(ids),
        set(ids),
    )

    moved = uuid.uuid4()
    await store.set_collections(owner.document_id, [str(moved)])
    assert await both_legs(store, SearchScope(bob, (TEAM,)), unit(60), "basalt") == (set(), set())
    assert await both_legs(store, SearchScope(bob, (moved,)), unit(60), "basalt") == (
        set(ids),
        set(ids),
    )
    await store.set_collections(owner.document_id, [])
    assert await both_legs(store, SearchScope(bob, (moved,)), unit(60), "basalt") == (set(), set())
    assert await both_legs(store, SearchScope(alice), unit(60), "basalt") == (set(ids), set(ids))
    # The same points: vectors and the rest of the payload untouched.
    after = await store.dense_vectors(ids)
    assert all(after[i] == pytest.approx(before[i], abs=1e-6) for i in ids)
    assert (await store.payloads(ids))[ids[1]]["text"] == "basalt columns crack"


async def test_a_search_can_return_only_named_payload_fields_and_fetch_the_rest(
    store: VectorStore,
) -> None:
    alice = uuid.uuid4()
    owner = owner_of(alice, generation="g7")
    ids = await put(store, owner, ["coral reefs bleach", "coral reefs recover"], seed=50)
    dense_hits, sparse_hits = await store.search(
        SearchScope(alice),
        dense=unit(50),
        sparse=LEXICAL.encode_query("coral reefs"),
        limit=5,
        fields=("document_id", "generation"),
    )
    expected = {"document_id": str(owner.document_id), "generation": "g7"}
    assert {h.point_id for h in dense_hits} == {h.point_id for h in sparse_hits} == set(ids)
    assert all(h.payload == expected for h in [*dense_hits, *sparse_hits])

    payloads = await store.payloads([ids[1], point_id(owner_of(alice), 0)])  # one unknown id
    assert list(payloads) == [ids[1]]
    assert payloads[ids[1]]["text"] == "coral reefs recover"
    assert payloads[ids[1]]["collections"] == [] and payloads[ids[1]]["chunk_index"] == 1
    assert payloads[ids[1]]["generation"] == "g7"


async def test_document_ids_narrow_a_search_within_what_the_caller_may_see(
    store: VectorStore,
) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    first, second, foreign = owner_of(alice), owner_of(alice), owner_of(bob)
    wanted = await put(store, first, ["tidal energy", "tidal power"], seed=10)
    await put(store, second, ["tidal energy too"], seed=20)
    await put(store, foreign, ["tidal energy again"], seed=30)

    scope = SearchScope(alice, document_ids=(first.document_id, foreign.document_id))
    dense, sparse = await both_legs(store, scope, unit(20), "tidal energy")
    assert dense == sparse == set(wanted)


async def test_a_leg_not_asked_for_is_empty(store: VectorStore) -> None:
    alice = uuid.uuid4()
    await put(store, owner_of(alice), ["wind farms offshore"], seed=40)
    scope = SearchScope(alice)
    dense_hits, sparse_hits = await store.search(scope, dense=None, sparse=None, limit=5)
    assert dense_hits == [] and sparse_hits == []
    query = LEXICAL.encode_query("offshore")
    dense_hits, sparse_hits = await store.search(scope, dense=None, sparse=query, limit=5)
    assert dense_hits == [] and len(sparse_hits) == 1 and sparse_hits[0].score > 0


async def test_delete_document_keeps_the_named_generation(store: VectorStore) -> None:
    alice = uuid.uuid4()
    old = owner_of(alice, generation="g1")
    new = ChunkOwner(old.document_id, "g2", alice)
    await put(store, old, ["first draft", "second paragraph"], seed=50)
    kept = await put(store, new, ["final text"], seed=60)
    assert await store.count(old.document_id) == 3

    await store.delete_document(old.document_id, keep="g2")
    assert await store.count(old.document_id) == 1
    dense, _ = await both_legs(store, SearchScope(alice), unit(50), "draft")
    assert dense == set(kept)

    await store.delete_document(old.document_id)
    assert await store.count(old.document_id) == 0


async def test_delete_generation_removes_that_generation_only(store: VectorStore) -> None:
    alice = uuid.uuid4()
    done = owner_of(alice, generation="g1")
    stale = ChunkOwner(done.document_id, "g2", alice)
    other = owner_of(alice, generation="g2")
    await put(store, done, ["published"], seed=70)
    await put(store, stale, ["abandoned", "abandoned too"], seed=71)
    await put(store, other, ["another document"], seed=72)

    await store.delete_generation(done.document_id, "g2")
    assert await store.count(done.document_id) == 1
    assert await store.count(other.document_id) == 1


async def test_delete_owner_removes_every_passage_of_that_owner(store: VectorStore) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    await put(store, owner_of(alice), ["a", "b"], seed=80)
    await put(store, owner_of(alice, collections=(TEAM,)), ["c"], seed=82)
    bobs = owner_of(bob)
    await put(store, bobs, ["d"], seed=83)

    await store.delete_owner(alice)
    assert await store.count() == 1
    assert await store.count(bobs.document_id) == 1


async def test_dense_vectors_of_the_points_that_exist(store: VectorStore) -> None:
    alice = uuid.uuid4()
    ids = await put(store, owner_of(alice), ["one", "two"], seed=90)
    missing = str(uuid.uuid4())
    vectors = await store.dense_vectors([*ids, missing])
    assert set(vectors) == set(ids)
    assert vectors[ids[1]] == pytest.approx(unit(91), abs=1e-5)


async def test_a_collection_of_another_dimension_is_refused(open_store: Opener) -> None:
    first = open_store()
    await first.ensure_collection(DIM)
    await first.close()
    second = open_store()
    try:
        with pytest.raises(CollectionMismatch, match="reindex"):
            await second.ensure_collection(DIM * 2)
    finally:
        await second.close()


async def test_passages_survive_a_close_and_reopen(open_store: Opener) -> None:
    alice = uuid.uuid4()
    first = open_store()
    await first.ensure_collection(DIM)
    owner = owner_of(alice)
    ids = await put(first, owner, ["kept across restarts", "also kept"], seed=100)
    await first.close()

    reopened = open_store()
    await reopened.ensure_collection(DIM)
    try:
        assert await reopened.count() == 2
        hits, _ = await reopened.search(SearchScope(alice), dense=unit(101), sparse=None, limit=1)
        assert hits[0].point_id == ids[1]
    finally:
        await reopened.close()


async def test_every_point_copies_with_its_ids_vectors_and_payload(
    store: VectorStore, tmp_path: Path
) -> None:
    alice = uuid.uuid4()
    owner = owner_of(alice, collections=(TEAM,))
    texts = [f"passage number {i} about rivers" for i in range(300)]  # more than one page
    ids = await put(store, owner, texts, seed=1000)
    other = "server-local-mode" if isinstance(store, QdrantEdgeStore) else "edge"
    target = opener(other, tmp_path / "copy")()
    await target.ensure_collection(DIM)
    try:
        assert await copy_points(store, target) == 300
        assert await target.count(owner.document_id) == 300
        original = [p for batch in [b async for b in store.scroll_points(128)] for p in batch]
        copied = [p for batch in [b async for b in target.scroll_points(1000)] for p in batch]
        assert sorted(p.point_id for p in copied) == sorted(ids)
        by_id = {p.point_id: p for p in copied}
        for point in original:
            twin = by_id[point.point_id]
            assert twin.payload == point.payload and twin.payload["collections"] == [str(TEAM)]
            assert twin.sparse.indices == point.sparse.indices
            assert twin.sparse.values == pytest.approx(point.sparse.values)
            assert twin.dense == pytest.approx(point.dense, abs=1e-6)
        scope = SearchScope(uuid.uuid4(), (TEAM,))
        dense, sparse = await both_legs(target, scope, unit(1007), "rivers")
        assert ids[7] in dense and len(sparse) == 50
    finally:
        await target.close()


async def test_an_embedded_store_not_open_answers_unavailable(tmp_path: Path) -> None:
    store = QdrantEdgeStore(tmp_path / "vectors")
    with pytest.raises(Unavailable):  # not opened yet
        await store.count()
    await store.ensure_collection(DIM)
    await store.close()
    with pytest.raises(Unavailable):
        await store.search(SearchScope(uuid.uuid4()), dense=unit(1), sparse=None, limit=1)


async def test_a_second_owner_of_a_shard_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    first = QdrantEdgeStore(tmp_path / "vectors")
    await first.ensure_collection(DIM)
    second = QdrantEdgeStore(tmp_path / "vectors")
    try:
        with pytest.raises(ShardInUse, match="another agentmesh process owns this data directory"):
            await second.ensure_collection(DIM)
    finally:
        await second.close()
        await first.close()


async def test_the_payload_indexes_exist_in_the_embedded_shard(tmp_path: Path) -> None:
    import qdrant_edge as qe

    store = QdrantEdgeStore(tmp_path / "vectors")
    await store.ensure_collection(DIM)
    await store.close()
    shard = qe.EdgeShard.load(str(tmp_path / "vectors"))
    try:
        schema = shard.info().payload_schema
    finally:
        shard.close()
    assert {k: v.data_type for k, v in schema.items()} == {
        "owner_id": qe.PayloadSchemaType.Keyword,
        "document_id": qe.PayloadSchemaType.Keyword,
        "collections": qe.PayloadSchemaType.Keyword,
        "generation": qe.PayloadSchemaType.Keyword,
    }
    owner_index = schema["owner_id"].params
    assert isinstance(owner_index, qe.KeywordIndexParams) and owner_index.is_tenant


CHILD = textwrap.dedent(
    """
    import asyncio, sys, time, uuid
    from pathlib import Path
    from tests.test_vector_store import DIM, owner_of, put
    from services.knowledge.qdrant_edge_store import QdrantEdgeStore

    async def main() -> None:
        store = QdrantEdgeStore(Path(sys.argv[1]))
        await store.ensure_collection(DIM)
        alice = uuid.UUID(sys.argv[2])
        for n in range(20):
            await put(store, owner_of(alice), [f"passage {n}.{i}" for i in range(25)], seed=n * 25)
        gone = owner_of(alice)
        await put(store, gone, ["deleted before the crash"], seed=9999)
        await store.delete_document(gone.document_id)
        print("done", flush=True)
        time.sleep(600)  # killed here, the shard still open

    asyncio.run(main())
    """
)


async def test_an_embedded_shard_keeps_every_acknowledged_write_through_kill_9(
    tmp_path: Path,
) -> None:
    alice = uuid.uuid4()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(tmp_path / "vectors"),
        str(alice),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), timeout=120)
        assert line.strip() == b"done"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    store = QdrantEdgeStore(tmp_path / "vectors")
    await store.ensure_collection(DIM)
    try:
        assert await store.count() == 500
        hits, _ = await store.search(SearchScope(alice), dense=unit(321), sparse=None, limit=1)
        assert hits[0].payload["text"] == "passage 12.21"
        _, sparse = await store.search(
            SearchScope(alice), dense=None, sparse=LEXICAL.encode_query("deleted"), limit=5
        )
        assert sparse == []
    finally:
        await store.close()
