"""Which vector store a configuration gets: a Qdrant server, or the embedded engine."""

from collections.abc import Callable
from pathlib import Path

from qdrant_client import AsyncQdrantClient

from services.knowledge.local_mode_migration import migrate_local_mode
from services.knowledge.qdrant_edge_store import QdrantEdgeStore, Seed
from services.knowledge.qdrant_server_store import QdrantServerStore
from services.knowledge.reindexing import (
    Reindexed,
    finish_swap,
    reindex_collection,
    reindex_shard,
)
from services.knowledge.vector_copy import Embed
from services.knowledge.vector_store import VectorStore

# The embedded engine's shard, apart from the old local-mode store so neither is mistaken
# for the other.
SHARD_DIR = "vectors"
LOCAL_MODE_DIR = "qdrant"


def connect_vector_store(
    *, url: str | None, api_key: str | None, data_dir: Path, collection: str
) -> VectorStore:
    """A Qdrant server at `url`, or the embedded engine in DATA_DIR/vectors (opened, and an
    old local-mode DATA_DIR/qdrant moved into it, when the knowledge base starts)."""
    if url:
        return QdrantServerStore(
            AsyncQdrantClient(url=url, api_key=api_key), collection, local=False
        )
    return QdrantEdgeStore(data_dir / SHARD_DIR, seed=shard_seed(data_dir, collection))


def shard_seed(data_dir: Path, collection: str) -> Seed:
    """What fills a missing shard: an interrupted re-index's result, else the old index."""

    async def seed(shard_dir: Path) -> None:
        if not finish_swap(shard_dir):
            await migrate_local_mode(data_dir / LOCAL_MODE_DIR, collection, shard_dir)

    return seed


async def reindex_vector_store(
    *,
    url: str | None,
    api_key: str | None,
    data_dir: Path,
    collection: str,
    target_collection: str,
    embed: Embed,
    dimension: int,
    progress: Callable[[int], None] | None = None,
) -> Reindexed:
    """Re-embed every passage: a server's `collection` into `target_collection`, or the
    embedded shard in place (its server stopped: one process owns it)."""
    if not url:
        shard_dir, seed = data_dir / SHARD_DIR, shard_seed(data_dir, collection)
        return await reindex_shard(shard_dir, embed, dimension, seed=seed, progress=progress)
    client = AsyncQdrantClient(url=url, api_key=api_key)
    try:
        source = QdrantServerStore(client, collection, local=False)
        target = QdrantServerStore(client, target_collection, local=False)
        return await reindex_collection(source, target, embed, dimension, progress)
    finally:
        await client.close()
