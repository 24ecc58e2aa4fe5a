"""Moving existing vector data: an old local-mode data dir into the embedded engine on
start-up, and `agentmesh reindex` re-embedding every passage with the configured model."""

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
import qdrant_edge as qe
from qdrant_client import AsyncQdrantClient

from server import domain_settings as configured
from server.cli import main
from server.config import Settings
from services.knowledge.chunking import Chunk
from services.knowledge.embeddings import Embedder
from services.knowledge.lexical import LexicalEncoder
from services.knowledge.qdrant_edge_store import QdrantEdgeStore
from services.knowledge.qdrant_server_store import QdrantServerStore
from services.knowledge.reindexing import reindex_collection
from services.knowledge.vector_backends import connect_vector_store
from services.knowledge.vector_store import (
    ChunkOwner,
    SearchScope,
    StoredPoint,
    VectorStore,
    chunk_points,
)
from tests.test_vector_store import DIM, TEAM, owner_of, put, unit

COLLECTION = "agentmesh_chunks"


async def every_point(store: VectorStore) -> dict[str, StoredPoint]:
    return {p.point_id: p async for batch in store.scroll_points(100) for p in batch}


async def write_local_mode(data_dir: Path, owners: list[ChunkOwner]) -> dict[str, StoredPoint]:
    """An index as the old embedded default wrote it (qdrant-client local mode in
    DATA_DIR/qdrant); its points."""
    client = AsyncQdrantClient(path=str(data_dir / "qdrant"))
    old = QdrantServerStore(client, COLLECTION, local=True)
    await old.ensure_collection(DIM)
    for n, owner in enumerate(owners):
        await put(old, owner, [f"old passage {n}.{i} about lakes" for i in range(3)], seed=n * 3)
    points = await every_point(old)
    await old.close()
    return points


async def test_an_old_local_mode_index_moves_into_the_embedded_engine_on_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    alice, bob = uuid.uuid4(), uuid.uuid4()
    owners = [owner_of(alice), owner_of(bob), owner_of(bob, collections=(TEAM,))]
    before = await write_local_mode(data_dir, owners)
    (data_dir / "vectors.migrating").mkdir()  # as an interrupted migration leaves it
    (data_dir / "vectors.migrating" / "junk").write_text("half a shard")

    store = connect_vector_store(url=None, api_key=None, data_dir=data_dir, collection=COLLECTION)
    with caplog.at_level(logging.INFO):
        await store.ensure_collection(DIM)
    try:
        assert isinstance(store, QdrantEdgeStore) and store.path == data_dir / "vectors"
        assert not (data_dir / "qdrant").exists() and (data_dir / "qdrant.migrated").is_dir()
        assert not (data_dir / "vectors.migrating").exists()
        told = [r.getMessage() for r in caplog.records if "moved 9 passages" in r.getMessage()]
        assert told and str(data_dir / "qdrant.migrated") in told[0]

        after = await every_point(store)
        assert after.keys() == before.keys()
        for point_id, point in before.items():
            moved = after[point_id]
            assert moved.payload == point.payload
            assert moved.sparse.indices == point.sparse.indices
            assert moved.sparse.values == pytest.approx(point.sparse.values)  # float32 now
            assert moved.dense == pytest.approx(point.dense, abs=1e-6)
        # Every passage is found by its own vector, by whoever may see it, and only them.
        for n, owner in enumerate(owners):
            for i in range(3):
                hits, _ = await store.search(
                    SearchScope(owner.owner_id), dense=unit(n * 3 + i), sparse=None, limit=1
                )
                assert hits[0].payload["text"] == f"old passage {n}.{i} about lakes"
        _, sparse = await store.search(
            SearchScope(alice, (TEAM,)),
            dense=None,
            sparse=LexicalEncoder().encode_query("lakes"),
            limit=20,
        )
        assert {h.payload["document_id"] for h in sparse} == {
            str(owners[0].document_id),
            str(owners[2].document_id),
        }
    finally:
        await store.close()

    again = connect_vector_store(url=None, api_key=None, data_dir=data_dir, collection=COLLECTION)
    await again.ensure_collection(DIM)
    try:
        assert await again.count() == 9
    finally:
        await again.close()


async def test_a_data_dir_without_an_old_index_starts_empty(tmp_path: Path) -> None:
    store = connect_vector_store(url=None, api_key=None, data_dir=tmp_path, collection=COLLECTION)
    await store.ensure_collection(DIM)
    try:
        assert await store.count() == 0
        assert not (tmp_path / "qdrant.migrated").exists()
    finally:
        await store.close()


async def test_a_re_index_stopped_mid_swap_is_finished_on_the_next_start(tmp_path: Path) -> None:
    done = QdrantEdgeStore(tmp_path / "vectors.reindexed")
    await done.ensure_collection(DIM)
    await put(done, owner_of(uuid.uuid4()), ["re-embedded"], seed=1)
    await done.close()

    store = connect_vector_store(url=None, api_key=None, data_dir=tmp_path, collection=COLLECTION)
    await store.ensure_collection(DIM)
    try:
        assert await store.count() == 1
        assert not (tmp_path / "vectors.reindexed").exists()
    finally:
        await store.close()


async def fake_embed(texts: list[str]) -> list[list[float]]:
    """A stand-in model: a text's vector depends on its length only."""
    return [unit(len(text)) for text in texts]


async def test_a_server_collection_is_re_embedded_into_a_new_one(tmp_path: Path) -> None:
    client = AsyncQdrantClient(path=str(tmp_path / "qdrant"))
    source = QdrantServerStore(client, COLLECTION, local=True)
    target = QdrantServerStore(client, f"{COLLECTION}_2", local=True)
    try:
        await source.ensure_collection(DIM)
        alice = uuid.uuid4()
        await put(source, owner_of(alice), ["a" * 5, "b" * 9], seed=100)

        result = await reindex_collection(source, target, fake_embed, DIM)
        assert (result.passages, result.index, result.previous) == (
            2,
            target.collection,
            COLLECTION,
        )
        assert await source.count() == await target.count() == 2
        hits, _ = await target.search(SearchScope(alice), dense=unit(9), sparse=None, limit=1)
        assert hits[0].payload["text"] == "b" * 9 and hits[0].score == pytest.approx(1.0)
        with pytest.raises(FileExistsError):
            await reindex_collection(source, target, fake_embed, DIM)
    finally:
        await client.close()


TEXTS = [
    "The Rhine rises in the Swiss Alps and flows into the North Sea.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "A sourdough starter is a culture of wild yeast and lactic bacteria.",
    "The Treaty of Westphalia ended the Thirty Years' War in 1648.",
]


async def seed_random_shard(shard_dir: Path, dimension: int, owner: ChunkOwner) -> None:
    """Passages with real text but random dense vectors: only a re-embedding finds them."""
    store = QdrantEdgeStore(shard_dir)
    await store.ensure_collection(dimension)
    lexical = LexicalEncoder()
    chunks = [_chunk(i, text) for i, text in enumerate(TEXTS)]
    dense = [[*unit(i), *([0.0] * (dimension - DIM))] for i in range(len(TEXTS))]
    sparse = [lexical.encode_passage(text) for text in TEXTS]
    await store.upsert_points(chunk_points(owner, chunks, dense, sparse))
    await store.close()


def _chunk(index: int, text: str) -> Chunk:
    return Chunk(index, text, 0, len(text), 1, 20)


def test_reindex_re_embeds_every_passage_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setenv("AGENTMESH_DATA_DIR", str(data_dir))
    monkeypatch.delenv("AGENTMESH_QDRANT_URL", raising=False)
    embedder = Embedder.load(configured.embedder_settings(Settings()))
    owner = owner_of(uuid.uuid4())
    asyncio.run(seed_random_shard(data_dir / "vectors", embedder.dimension, owner))

    # While another process owns the shard (here: an open handle), nothing happens.
    held = qe.EdgeShard.load(str(data_dir / "vectors"))
    try:
        assert main(["reindex"]) == 1
        assert "another agentmesh process owns this data directory" in capsys.readouterr().err
    finally:
        held.close()

    assert main(["reindex"]) == 0
    out = capsys.readouterr().out
    assert f"Re-embedded {len(TEXTS)} passages" in out and "vectors.before-reindex" in out
    assert (data_dir / "vectors.before-reindex").is_dir()

    async def search_each() -> list[str]:
        store = QdrantEdgeStore(data_dir / "vectors")
        await store.ensure_collection(embedder.dimension)
        try:
            assert await store.count() == len(TEXTS)
            found = []
            for text in TEXTS:
                query = await embedder.encode_query(text.split(" ", 3)[-1])
                hits, _ = await store.search(
                    SearchScope(owner.owner_id), dense=query, sparse=None, limit=1
                )
                found.append(hits[0].payload["text"])
            return found
        finally:
            await store.close()

    try:
        assert asyncio.run(search_each()) == TEXTS
    finally:
        embedder.close()
