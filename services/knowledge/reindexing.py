"""Re-embedding every stored passage with the configured model, for a changed embedding
model: from the passage text in each point's payload, into a fresh index that replaces the
old one. Point ids, payloads and the (model-independent) sparse vectors are kept, so the
database's documents stay as they are; passages keep the boundaries the old model's window
gave them (to re-chunk, upload the documents again)."""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.knowledge.embeddings import MERGE_LIMIT, Embedder
from services.knowledge.index_dirs import keep_aside, remove_stale
from services.knowledge.qdrant_edge_store import QdrantEdgeStore, Seed, shard_exists
from services.knowledge.qdrant_server_store import QdrantServerStore
from services.knowledge.vector_copy import Embed, copy_points
from services.knowledge.vector_store import VectorStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reindexed:
    passages: int
    index: str
    """Where the re-embedded passages are (a shard directory or a collection)."""
    previous: str
    """Where the old index is kept (never deleted here)."""


def passage_encoder(embedder: Embedder) -> Embed:
    """Embeds texts on every embedding worker at once, as ingestion does."""

    async def embed(texts: list[str]) -> list[list[float]]:
        parts = [texts[i : i + MERGE_LIMIT] for i in range(0, len(texts), MERGE_LIMIT)]
        encoded = await asyncio.gather(*(embedder.encode_passages(part) for part in parts))
        return [vector for part in encoded for vector in part]

    return embed


async def reindex_into(
    source: VectorStore,
    target: VectorStore,
    embed: Embed,
    dimension: int,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Create `target` for `dimension` and copy the open `source`'s points, re-embedded."""
    await target.ensure_collection(dimension)
    return await copy_points(source, target, reembed=embed, progress=progress)


async def reindex_collection(
    source: QdrantServerStore,
    target: QdrantServerStore,
    embed: Embed,
    dimension: int,
    progress: Callable[[int], None] | None = None,
) -> Reindexed:
    """Re-embed a Qdrant server's collection into a new one beside it (the server keeps
    serving the old one until it is configured to use the new)."""
    if await target.exists():
        raise FileExistsError(f"Qdrant collection {target.collection!r} exists; name another")
    await source.open_existing()
    passages = await reindex_into(source, target, embed, dimension, progress)
    return Reindexed(passages, target.collection, source.collection)


async def reindex_shard(
    shard_dir: Path,
    embed: Embed,
    dimension: int,
    *,
    seed: Seed | None = None,
    progress: Callable[[int], None] | None = None,
) -> Reindexed:
    """Re-embed the shard at `shard_dir` into a fresh one, then swap it in (the old one is
    kept beside it). Its process must be stopped: a shard has one owner."""
    source = QdrantEdgeStore(shard_dir, seed=seed)
    fresh, done = _fresh(shard_dir), _done(shard_dir)
    try:
        await source.open_existing()  # fails while the server holds the shard
        for stale in (fresh, done):  # an interrupted run's; the index in use is intact
            remove_stale(stale)
        target = QdrantEdgeStore(fresh)
        try:
            passages = await reindex_into(source, target, embed, dimension, progress)
        finally:
            await target.close()
    finally:
        await source.close()
    previous = _swap_in(shard_dir, fresh)
    return Reindexed(passages, str(shard_dir), str(previous))


def _swap_in(shard_dir: Path, fresh: Path) -> Path:
    """Put the complete shard `fresh` in place of `shard_dir`; where the old one went."""
    done = _done(shard_dir)
    fresh.rename(done)  # complete: from here an interrupted swap is finished on the next open
    previous = keep_aside(shard_dir, "before-reindex")
    done.rename(shard_dir)
    return previous


def finish_swap(shard_dir: Path) -> bool:
    """Move a complete re-embedded shard into place if a re-index stopped mid-swap."""
    done = _done(shard_dir)
    if not done.is_dir() or shard_exists(shard_dir):
        return False
    done.rename(shard_dir)
    log.warning(f"finished an interrupted re-index: {done} is now {shard_dir}")
    return True


def _fresh(shard_dir: Path) -> Path:
    return shard_dir.with_name(f"{shard_dir.name}.reindexing")


def _done(shard_dir: Path) -> Path:
    return shard_dir.with_name(f"{shard_dir.name}.reindexed")
