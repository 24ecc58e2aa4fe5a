"""Moving an index written by qdrant-client's local mode (the old embedded default, in
DATA_DIR/qdrant) into the embedded Qdrant engine, without re-embedding anything."""

import asyncio
import logging
from pathlib import Path

from qdrant_client import AsyncQdrantClient

from services.knowledge.index_dirs import keep_aside, remove_stale
from services.knowledge.qdrant_edge_store import QdrantEdgeStore
from services.knowledge.qdrant_server_store import QdrantServerStore
from services.knowledge.vector_copy import copy_points

log = logging.getLogger(__name__)


async def migrate_local_mode(legacy_dir: Path, collection: str, shard_dir: Path) -> int | None:
    """Copy `collection` from the local-mode store in `legacy_dir` into a new shard at
    `shard_dir`, then rename `legacy_dir` (never deleted); None when there is nothing to move."""
    # Local mode reads every point into memory when it opens: not on the event loop.
    client = await asyncio.to_thread(_open_local_mode, legacy_dir)
    if client is None:
        return None
    source = QdrantServerStore(client, collection, local=True)
    try:
        if not await source.exists():
            return None
        moved = await _copy_into_new_shard(source, shard_dir)
    finally:
        await source.close()
    kept = keep_aside(legacy_dir, "migrated")
    log.warning(
        f"moved {moved} passages from qdrant-client's local mode in {legacy_dir} into the "
        f"embedded Qdrant engine in {shard_dir}; the old copy is kept in {kept}: delete it "
        "once the knowledge base answers as before",
        extra={"passages": moved, "from": str(legacy_dir), "to": str(shard_dir), "kept": str(kept)},
    )
    return moved


async def _copy_into_new_shard(source: QdrantServerStore, shard_dir: Path) -> int:
    """Build the shard beside `shard_dir` and move it in only once complete, so an
    interrupted migration starts again instead of leaving half an index."""
    staging = shard_dir.with_name(f"{shard_dir.name}.migrating")
    remove_stale(staging)  # left by an interrupted migration; the old store is intact
    dimension = await source.dimension()
    if dimension is None:
        raise RuntimeError(f"collection {source.collection!r} has no dense vector to migrate")
    target = QdrantEdgeStore(staging)
    try:
        await target.ensure_collection(dimension)
        moved = await copy_points(source, target)
        stored, expected = await target.count(), await source.count()
    finally:
        await target.close()
    if stored != expected:
        raise RuntimeError(f"migrated {stored} of {expected} passages; the old store is kept")
    staging.rename(shard_dir)
    return moved


def _open_local_mode(legacy_dir: Path) -> AsyncQdrantClient | None:
    """The local-mode store in `legacy_dir`, if there is one."""
    return AsyncQdrantClient(path=str(legacy_dir)) if legacy_dir.is_dir() else None
