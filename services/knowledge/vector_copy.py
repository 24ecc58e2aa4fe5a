"""Copying every point of one vector store into another, optionally re-embedded."""

from collections.abc import Awaitable, Callable
from dataclasses import replace

from services.knowledge.vector_store import VectorStore

# Passages read, (re-embedded) and written per step.
COPY_BATCH = 256
# Dense vectors for passage texts, in order.
Embed = Callable[[list[str]], Awaitable[list[list[float]]]]


async def copy_points(
    source: VectorStore,
    target: VectorStore,
    *,
    reembed: Embed | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy every point of `source` into `target` (ids, payloads and sparse vectors as they
    are; the dense vector re-computed from the passage text with `reembed`); the count."""
    copied = 0
    async for points in source.scroll_points(COPY_BATCH):
        if reembed is not None:
            vectors = await reembed([str(point.payload.get("text", "")) for point in points])
            points = [
                replace(point, dense=vector) for point, vector in zip(points, vectors, strict=True)
            ]
        await target.upsert_points(points)
        copied += len(points)
        if progress is not None:
            progress(copied)
    return copied
