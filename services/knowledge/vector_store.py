"""The only code that talks to Qdrant: one collection of chunks, every owner's, tenant-keyed.

Each point is one chunk of one *generation* of a document (a generation is one ingestion of
one content). Searches see a generation only once the database names it the document's
current one, which is what makes replacing a document's content atomic.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException

from services.errors import Unavailable
from services.knowledge.chunking import Chunk
from services.knowledge.lexical import SparseVector

DENSE = "dense"
SPARSE = "sparse"
UPSERT_BATCH = 64
POINT_NAMESPACE = uuid.UUID("5b0e7d2a-3f43-4c8e-9d6e-0d1c2b7a9e51")


class CollectionMismatch(RuntimeError):
    """The configured collection was created for a model of another dimension."""


@dataclass(frozen=True)
class SearchScope:
    """Whose chunks a search may see: the caller's own and shared ones, optionally narrowed."""

    owner_id: uuid.UUID
    document_ids: tuple[uuid.UUID, ...] = ()


@dataclass(frozen=True)
class ChunkOwner:
    document_id: uuid.UUID
    generation: str
    owner_id: uuid.UUID
    shared: bool


@dataclass(frozen=True)
class StoredHit:
    point_id: str
    score: float
    payload: dict[str, Any]


def scope_filter(scope: SearchScope) -> qm.Filter:
    """The owner filter every vector query goes through (the caller's own + shared chunks)."""
    visible = qm.Filter(
        should=[
            qm.FieldCondition(key="owner_id", match=qm.MatchValue(value=str(scope.owner_id))),
            qm.FieldCondition(key="shared", match=qm.MatchValue(value=True)),
        ]
    )
    must: list[Any] = [visible]
    if scope.document_ids:
        ids = [str(document_id) for document_id in scope.document_ids]
        must.append(qm.FieldCondition(key="document_id", match=qm.MatchAny(any=ids)))
    return qm.Filter(must=must)


def point_id(owner: ChunkOwner, index: int) -> str:
    """Deterministic, so re-running an interrupted ingestion overwrites instead of adding."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{owner.document_id}:{owner.generation}:{index}"))


class VectorStore:
    def __init__(self, client: AsyncQdrantClient, collection: str, *, local: bool) -> None:
        self._client = client
        self._collection = collection
        self._local = local

    @classmethod
    def connect(
        cls, *, url: str | None, api_key: str | None, path: Path, collection: str
    ) -> "VectorStore":
        """A Qdrant server at `url`, or embedded Qdrant (local mode) on disk at `path`."""
        if url:
            return cls(AsyncQdrantClient(url=url, api_key=api_key), collection, local=False)
        path.mkdir(parents=True, exist_ok=True)
        return cls(AsyncQdrantClient(path=str(path)), collection, local=True)

    async def ensure_collection(self, dimension: int) -> None:
        """Create the collection for `dimension`-sized vectors, or check an existing one."""
        if await self._client.collection_exists(self._collection):
            info = await self._client.get_collection(self._collection)
            vectors = info.config.params.vectors
            size = vectors[DENSE].size if isinstance(vectors, dict) else None
            if size != dimension:
                raise CollectionMismatch(
                    f"Qdrant collection {self._collection!r} holds {size}-dimensional vectors "
                    f"but the embedding model makes {dimension}; configure another collection"
                )
            return
        await self._client.create_collection(
            self._collection,
            vectors_config={DENSE: qm.VectorParams(size=dimension, distance=qm.Distance.COSINE)},
            sparse_vectors_config={SPARSE: qm.SparseVectorParams(modifier=qm.Modifier.IDF)},
        )
        if not self._local:  # local mode has no payload indexes (it scans)
            await self._client.create_payload_index(
                self._collection,
                "owner_id",
                qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True),
            )
            for key, schema in (
                ("document_id", qm.PayloadSchemaType.KEYWORD),
                ("shared", qm.PayloadSchemaType.BOOL),
            ):
                await self._client.create_payload_index(self._collection, key, schema)

    async def upsert(
        self,
        owner: ChunkOwner,
        chunks: Sequence[Chunk],
        dense: Sequence[list[float]],
        sparse: Sequence[SparseVector],
    ) -> None:
        points = [
            qm.PointStruct(
                id=point_id(owner, chunk.index),
                vector={
                    DENSE: vector,
                    SPARSE: qm.SparseVector(indices=lexical.indices, values=lexical.values),
                },
                payload={
                    "owner_id": str(owner.owner_id),
                    "shared": owner.shared,
                    "document_id": str(owner.document_id),
                    "generation": owner.generation,
                    "chunk_index": chunk.index,
                    "text": chunk.text,
                    "start": chunk.start,
                    "end": chunk.end,
                    "page": chunk.page,
                },
            )
            for chunk, vector, lexical in zip(chunks, dense, sparse, strict=True)
        ]
        for first in range(0, len(points), UPSERT_BATCH):
            batch = points[first : first + UPSERT_BATCH]
            await self._client.upsert(self._collection, batch, wait=True)

    async def delete_document(self, document_id: uuid.UUID, *, keep: str | None = None) -> None:
        """Delete a document's points, except those of generation `keep`."""
        condition = qm.Filter(
            must=[_equals("document_id", str(document_id))],
            must_not=[_equals("generation", keep)] if keep else None,
        )
        await self._delete(condition)

    async def delete_generation(self, document_id: uuid.UUID, generation: str) -> None:
        await self._delete(
            qm.Filter(
                must=[_equals("document_id", str(document_id)), _equals("generation", generation)]
            )
        )

    async def delete_owner(self, owner_id: uuid.UUID) -> None:
        await self._delete(qm.Filter(must=[_equals("owner_id", str(owner_id))]))

    async def search(
        self,
        scope: SearchScope,
        *,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
    ) -> tuple[list[StoredHit], list[StoredHit]]:
        """The dense and sparse legs' hits (a leg not asked for is empty), in one round trip."""
        flt = scope_filter(scope)
        requests: list[qm.QueryRequest] = []
        if dense is not None:
            requests.append(
                qm.QueryRequest(
                    query=dense, using=DENSE, filter=flt, limit=limit, with_payload=True
                )
            )
        if sparse is not None and sparse.indices:
            query = qm.SparseVector(indices=sparse.indices, values=sparse.values)
            requests.append(
                qm.QueryRequest(
                    query=query, using=SPARSE, filter=flt, limit=limit, with_payload=True
                )
            )
        try:
            responses = await self._client.query_batch_points(self._collection, requests)
        except ResponseHandlingException as error:  # connection refused, timeout, ...
            raise Unavailable(
                "the search index cannot be reached; try again", reason="INDEX_UNAVAILABLE"
            ) from error
        legs = [[_hit(point) for point in response.points] for response in responses]
        dense_hits = legs.pop(0) if dense is not None else []
        sparse_hits = legs.pop(0) if legs else []
        return dense_hits, sparse_hits

    async def dense_vectors(self, point_ids: Sequence[str]) -> dict[str, list[float]]:
        records = await self._client.retrieve(
            self._collection, list(point_ids), with_payload=False, with_vectors=[DENSE]
        )
        vectors: dict[str, list[float]] = {}
        for record in records:
            if isinstance(record.vector, dict):
                vectors[str(record.id)] = list(record.vector[DENSE])  # type: ignore[arg-type]
        return vectors

    async def count(self, document_id: uuid.UUID | None = None) -> int:
        condition = (
            qm.Filter(must=[_equals("document_id", str(document_id))]) if document_id else None
        )
        result = await self._client.count(self._collection, count_filter=condition, exact=True)
        return result.count

    async def ping(self) -> None:
        """Raise unless Qdrant answers (a collection listing: cheap, needs no collection)."""
        await self._client.get_collections()

    async def close(self) -> None:
        await self._client.close()

    async def _delete(self, condition: qm.Filter) -> None:
        await self._client.delete(
            self._collection, points_selector=qm.FilterSelector(filter=condition), wait=True
        )


def _equals(key: str, value: str | None) -> qm.FieldCondition:
    return qm.FieldCondition(key=key, match=qm.MatchValue(value=value or ""))


def _hit(point: qm.ScoredPoint) -> StoredHit:
    return StoredHit(str(point.id), float(point.score), dict(point.payload or {}))
