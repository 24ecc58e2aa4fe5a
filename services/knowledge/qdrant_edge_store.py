"""The vector store on the Qdrant engine embedded in this process (qdrant-edge-py).

One shard directory holds the whole index, and one process owns it: the engine locks its
write-ahead log, so a second open fails. The engine has no async API; its calls release the
GIL, so each runs on this store's own small thread pool, never on the event loop.

`optimize()` is never called: it holds the GIL for its whole run (175 s at 100k passages,
measured), which would stall every request, and searches are fast without it (~4 ms at 100k
for both legs, a filtered scan of the appendable segment).

Durability: `update()` appends to the write-ahead log's memory map before it returns, so an
acknowledged write survives the process being killed (kill -9; tested). `flush()` also fsyncs
the log and persists the segments, which a machine crash needs; it holds the GIL while it
runs (tens of ms), so it runs every FLUSH_SECONDS while there are writes, as Qdrant server's
flush interval does, not after every write, and on close.
"""

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import qdrant_edge as qe
from qdrant_client import models as qm

from services.errors import Unavailable
from services.knowledge.chunking import Chunk
from services.knowledge.lexical import SparseVector
from services.knowledge.vector_store import (
    DENSE,
    SPARSE,
    UPSERT_BATCH,
    ChunkOwner,
    CollectionMismatch,
    SearchScope,
    StoredHit,
    StoredPoint,
    chunk_points,
    collections_payload,
    document_filter,
    equals,
    generation_filter,
    owner_filter,
    scope_filter,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# Threads running engine calls; the engine parallelises one search over its own pool.
EDGE_THREADS = min(4, os.cpu_count() or 1)
# Longest a write waits for its fsync (what a machine crash may lose; kill -9 loses nothing).
FLUSH_SECONDS = 5.0
# Boolean payload fields, stored as the keywords "true"/"false": in qdrant-edge 0.9.0
# MatchValue(True) becomes the integer 1, so a bool filter silently matches nothing. (The
# `shared` flag of points written before collections; nothing filters on it any more.)
FLAGS = frozenset({"shared"})
# Where a scroll continues: the engine's point id type (a stub-only alias in qdrant_edge).
Cursor = int | str | uuid.UUID
# Fills a shard directory that does not exist yet (moving an old index in) before it opens.
Seed = Callable[[Path], Awaitable[None]]


class ShardInUse(RuntimeError):
    """Another process holds the embedded index open."""


class QdrantEdgeStore:
    """The whole index in one embedded shard directory, opened by `ensure_collection`."""

    def __init__(self, path: Path, *, seed: Seed | None = None, threads: int = EDGE_THREADS):
        self._path = path
        self._seed = seed
        self._shard: qe.EdgeShard | None = None
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="vectors")
        self._unflushed = False
        self._flusher: asyncio.Task[None] | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def ensure_collection(self, dimension: int) -> None:
        """Open the shard (creating it for `dimension`-sized vectors), checking its size."""
        await self._open(_config(dimension))

    async def open_existing(self) -> None:
        """Open the stored shard whatever its dimension; FileNotFoundError if there is none."""
        await self._open(None)

    async def upsert(
        self,
        owner: ChunkOwner,
        chunks: Sequence[Chunk],
        dense: Sequence[list[float]],
        sparse: Sequence[SparseVector],
    ) -> None:
        await self.upsert_points(chunk_points(owner, chunks, dense, sparse))

    async def upsert_points(self, points: Sequence[StoredPoint]) -> None:
        shard = self._require()
        for first in range(0, len(points), UPSERT_BATCH):
            await self._run(_upsert, shard, points[first : first + UPSERT_BATCH])
            self._unflushed = True

    async def scroll_points(self, batch: int) -> AsyncIterator[list[StoredPoint]]:
        shard = self._require()
        offset: Cursor | None = None
        while True:
            points, offset = await self._run(_scroll, shard, batch, offset)
            if points:
                yield points
            if offset is None:
                return

    async def delete_document(self, document_id: uuid.UUID, *, keep: str | None = None) -> None:
        """Delete a document's points, except those of generation `keep`."""
        await self._delete(document_filter(document_id, keep=keep))

    async def delete_generation(self, document_id: uuid.UUID, generation: str) -> None:
        await self._delete(generation_filter(document_id, generation))

    async def delete_owner(self, owner_id: uuid.UUID) -> None:
        await self._delete(owner_filter(owner_id))

    async def set_collections(self, document_id: uuid.UUID, collection_ids: Sequence[str]) -> None:
        operation = qe.UpdateOperation.set_payload_by_filter(
            edge_filter(document_filter(document_id)), collections_payload(collection_ids)
        )
        await self._run(self._require().update, operation)
        self._unflushed = True

    async def search(
        self,
        scope: SearchScope,
        *,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
        fields: Sequence[str] | None = None,
    ) -> tuple[list[StoredHit], list[StoredHit]]:
        """The dense and sparse legs' hits (a leg not asked for is empty), in one batch."""
        flt = edge_filter(scope_filter(scope))
        payload = True if fields is None else qe.PayloadSelector.Include(list(fields))
        requests: list[qe.QueryRequest] = []
        if dense is not None:
            query = qe.Query.Nearest(dense, using=DENSE)
            requests.append(qe.QueryRequest(limit, query=query, filter=flt, with_payload=payload))
        if sparse is not None and sparse.indices:
            vector = qe.SparseVector(sparse.indices, sparse.values)
            query = qe.Query.Nearest(vector, using=SPARSE)
            requests.append(qe.QueryRequest(limit, query=query, filter=flt, with_payload=payload))
        if not requests:
            return [], []
        legs = await self._run(_query_batch, self._require(), requests)
        dense_hits = legs.pop(0) if dense is not None else []
        sparse_hits = legs.pop(0) if legs else []
        return dense_hits, sparse_hits

    async def payloads(self, point_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return await self._run(_payloads, self._require(), list(point_ids))

    async def dense_vectors(self, point_ids: Sequence[str]) -> dict[str, list[float]]:
        return await self._run(_dense_vectors, self._require(), list(point_ids))

    async def count(self, document_id: uuid.UUID | None = None) -> int:
        condition = (
            edge_filter(qm.Filter(must=[equals("document_id", str(document_id))]))
            if document_id
            else None
        )
        return await self._run(self._require().count, qe.CountRequest(True, condition))

    async def ping(self) -> None:
        """Raise unless the shard is open and answers."""
        await self._run(self._require().info)

    async def close(self) -> None:
        """Wait for the calls in flight, then flush and close the shard (unlocking it)."""
        shard, self._shard = self._shard, None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        # Closing under a running query is no promise of the engine's: drain the pool first.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        if shard is not None:
            await asyncio.to_thread(shard.close)

    async def _open(self, config: qe.EdgeConfig | None) -> None:
        if self._shard is not None:  # opened once (and checked then) for the process
            return
        if self._seed is not None and not shard_exists(self._path):
            await self._seed(self._path)
        self._shard = await self._run(open_shard, self._path, config)
        self._flusher = asyncio.create_task(self._flush_while_open(self._shard))

    async def _flush_while_open(self, shard: qe.EdgeShard) -> None:
        """Persist what was written, every FLUSH_SECONDS that saw a write."""
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            if not self._unflushed:
                continue
            self._unflushed = False
            try:
                await self._run(shard.flush)
            except Exception:  # the log still holds the writes; try again next time
                self._unflushed = True
                log.exception("flushing the embedded vector index failed")

    async def _delete(self, condition: qm.Filter) -> None:
        operation = qe.UpdateOperation.delete_points_by_filter(edge_filter(condition))
        await self._run(self._require().update, operation)
        self._unflushed = True

    def _require(self) -> qe.EdgeShard:
        if self._shard is None:
            raise Unavailable("the search index is not open", reason="INDEX_UNAVAILABLE")
        return self._shard

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        """`func(*args)` on the store's threads."""
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, partial(func, *args))
        except RuntimeError as error:  # the pool is shut down: the store was closed
            raise Unavailable("the search index is closed", reason="INDEX_UNAVAILABLE") from error
        return await future


def shard_exists(path: Path) -> bool:
    """Whether `path` holds something (a shard, or anything else not to overwrite)."""
    return path.is_dir() and any(path.iterdir())


def open_shard(path: Path, config: qe.EdgeConfig | None) -> qe.EdgeShard:
    """Load the shard at `path` (checked against `config`), or create it from `config`."""
    try:
        if shard_exists(path):
            shard = qe.EdgeShard.load(str(path), config)
        elif config is None:
            raise FileNotFoundError(f"there is no embedded vector index in {path}")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            shard = qe.EdgeShard.create(str(path), config)
    except FileNotFoundError:
        raise
    except Exception as error:  # the engine raises bare Exceptions; their text says which
        raise _open_error(path, error) from error
    _ensure_indexes(shard)
    return shard


def _open_error(path: Path, error: Exception) -> Exception:
    text = str(error)
    if "WouldBlock" in text:  # the write-ahead log's lock
        return ShardInUse(
            f"the embedded vector index {path} is open in another process: another agentmesh "
            "process owns this data directory (one process per AGENTMESH_DATA_DIR; stop it "
            "first, or share a Qdrant server through AGENTMESH_QDRANT_URL)"
        )
    if "incompatible" in text:
        return CollectionMismatch(
            f"the embedded vector index {path} was built with another embedding model "
            f"({text}); stop the server and run `agentmesh reindex` to re-embed every passage "
            "with the configured model"
        )
    return RuntimeError(f"cannot open the embedded vector index {path}: {text}")


def _config(dimension: int) -> qe.EdgeConfig:
    return qe.EdgeConfig(
        vectors={DENSE: qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine)},
        sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
    )


def _ensure_indexes(shard: qe.EdgeShard) -> None:
    """The payload indexes every filter uses, added to shards that lack them."""
    indexes: dict[str, qe.PayloadSchemaType | qe.KeywordIndexParams] = {
        "owner_id": qe.KeywordIndexParams(is_tenant=True),
        "document_id": qe.PayloadSchemaType.Keyword,
        "collections": qe.PayloadSchemaType.Keyword,
        "generation": qe.PayloadSchemaType.Keyword,
    }
    existing = shard.info().payload_schema
    missing = [key for key in indexes if key not in existing]
    for key in missing:
        shard.update(qe.UpdateOperation.create_field_index(key, indexes[key]))
    if missing:
        shard.flush()


def edge_filter(flt: qm.Filter) -> qe.Filter:
    """`flt` (qdrant-client's model, as `vector_store.py` writes filters) for the engine."""
    return qe.Filter(
        must=_conditions(flt.must),
        should=_conditions(flt.should),
        must_not=_conditions(flt.must_not),
    )


def _conditions(conditions: Any) -> list[Any] | None:
    if conditions is None:
        return None
    items = conditions if isinstance(conditions, list) else [conditions]
    return [_condition(condition) for condition in items]


def _condition(condition: Any) -> Any:
    if isinstance(condition, qm.Filter):
        return edge_filter(condition)
    if isinstance(condition, qm.FieldCondition):
        key, match = condition.key, condition.match
        if isinstance(match, qm.MatchValue):
            value = _flag(match.value) if key in FLAGS else match.value
            return qe.FieldCondition(key, match=qe.MatchValue(value))
        if isinstance(match, qm.MatchAny):
            return qe.FieldCondition(key, match=qe.MatchAny([str(value) for value in match.any]))
    raise TypeError(f"no translation for the filter condition {condition!r}")


def _flag(value: Any) -> str:
    return "true" if value is True else "false"


def _upsert(shard: qe.EdgeShard, points: Sequence[StoredPoint]) -> None:
    shard.update(qe.UpdateOperation.upsert_points([_edge_point(point) for point in points]))


def _edge_point(point: StoredPoint) -> qe.Point:
    payload = {k: _flag(v) if k in FLAGS else v for k, v in point.payload.items()}
    sparse = qe.SparseVector(point.sparse.indices, point.sparse.values)
    return qe.Point(point.point_id, {DENSE: point.dense, SPARSE: sparse}, payload)


def _payload(payload: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v == "true" if k in FLAGS else v for k, v in (payload or {}).items()}


def _query_batch(shard: qe.EdgeShard, requests: list[qe.QueryRequest]) -> list[list[StoredHit]]:
    legs = shard.query_batch(qe.QueryBatchRequest(requests))
    return [[StoredHit(str(p.id), p.score, _payload(p.payload)) for p in leg] for leg in legs]


def _payloads(shard: qe.EdgeShard, point_ids: list[str]) -> dict[str, dict[str, Any]]:
    records = shard.retrieve(list(point_ids), with_payload=True, with_vector=False)
    return {str(record.id): _payload(record.payload) for record in records}


def _dense_vectors(shard: qe.EdgeShard, point_ids: list[str]) -> dict[str, list[float]]:
    records = shard.retrieve(list(point_ids), with_payload=False, with_vector=[DENSE])
    vectors: dict[str, list[float]] = {}
    for record in records:
        if isinstance(record.vector, dict) and isinstance(record.vector.get(DENSE), list):
            vectors[str(record.id)] = list(record.vector[DENSE])  # type: ignore[arg-type]
    return vectors


def _scroll(
    shard: qe.EdgeShard, batch: int, offset: Cursor | None
) -> tuple[list[StoredPoint], Cursor | None]:
    request = qe.ScrollRequest(offset=offset, limit=batch, with_payload=True, with_vector=True)
    records, following = shard.scroll(request)
    return [_stored_point(record) for record in records], following


def _stored_point(record: qe.Record) -> StoredPoint:
    vectors = record.vector if isinstance(record.vector, dict) else {}
    dense, sparse = vectors.get(DENSE), vectors.get(SPARSE)
    return StoredPoint(
        point_id=str(record.id),
        dense=list(dense) if isinstance(dense, list) else [],  # type: ignore[arg-type]
        sparse=SparseVector(list(sparse.indices), list(sparse.values))
        if isinstance(sparse, qe.SparseVector)
        else SparseVector([], []),
        payload=_payload(record.payload),
    )
