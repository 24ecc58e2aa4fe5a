"""The vector store on a Qdrant server, through qdrant-client's async client.

The same code runs on qdrant-client's local mode (`AsyncQdrantClient(path=...)`), a
pure-Python scan: the tests use it to exercise this backend (no Qdrant server runs here),
and an old embedded data dir is read through it once, to move it into the embedded engine.
"""

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from qdrant_client import AsyncQdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException

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


class QdrantServerStore:
    """One collection on a Qdrant server (or in qdrant-client's local mode)."""

    def __init__(self, client: AsyncQdrantClient, collection: str, *, local: bool) -> None:
        self._client = client
        self._collection = collection
        self._local = local

    @property
    def collection(self) -> str:
        return self._collection

    async def ensure_collection(self, dimension: int) -> None:
        """Create the collection for `dimension`-sized vectors, or check an existing one;
        either way add the payload indexes it lacks (a collection made by an older version
        lacks `collections`)."""
        if await self.exists():
            size = await self.dimension()
            if size != dimension:
                raise CollectionMismatch(
                    f"Qdrant collection {self._collection!r} holds {size}-dimensional vectors "
                    f"but the embedding model makes {dimension}; configure another collection, "
                    "or run `agentmesh reindex` to re-embed every passage into a new one"
                )
        else:
            await self._client.create_collection(
                self._collection,
                vectors_config={
                    DENSE: qm.VectorParams(size=dimension, distance=qm.Distance.COSINE)
                },
                sparse_vectors_config={SPARSE: qm.SparseVectorParams(modifier=qm.Modifier.IDF)},
            )
        if not self._local:  # local mode has no payload indexes (it scans)
            await self._ensure_indexes()

    async def _ensure_indexes(self) -> None:
        """The payload index of every field a filter reads (the tenant key first)."""
        info = await self._client.get_collection(self._collection)
        schemas: dict[str, qm.PayloadSchemaType | qm.KeywordIndexParams] = {
            "owner_id": qm.KeywordIndexParams(type=qm.KeywordIndexType.KEYWORD, is_tenant=True),
            "document_id": qm.PayloadSchemaType.KEYWORD,
            "collections": qm.PayloadSchemaType.KEYWORD,
        }
        for key, schema in schemas.items():
            if key not in (info.payload_schema or {}):
                await self._client.create_payload_index(self._collection, key, schema)

    async def open_existing(self) -> None:
        """Raise unless the collection exists (nothing to open on a server)."""
        if not await self.exists():
            raise FileNotFoundError(f"Qdrant has no collection {self._collection!r}")

    async def exists(self) -> bool:
        return await self._client.collection_exists(self._collection)

    async def dimension(self) -> int | None:
        """The size of the stored dense vectors."""
        info = await self._client.get_collection(self._collection)
        vectors = info.config.params.vectors
        return vectors[DENSE].size if isinstance(vectors, dict) else None

    async def upsert(
        self,
        owner: ChunkOwner,
        chunks: Sequence[Chunk],
        dense: Sequence[list[float]],
        sparse: Sequence[SparseVector],
    ) -> None:
        await self.upsert_points(chunk_points(owner, chunks, dense, sparse))

    async def upsert_points(self, points: Sequence[StoredPoint]) -> None:
        structs = [
            qm.PointStruct(
                id=point.point_id,
                vector={
                    DENSE: point.dense,
                    SPARSE: qm.SparseVector(
                        indices=point.sparse.indices, values=point.sparse.values
                    ),
                },
                payload=point.payload,
            )
            for point in points
        ]
        for first in range(0, len(structs), UPSERT_BATCH):
            batch = structs[first : first + UPSERT_BATCH]
            await self._client.upsert(self._collection, batch, wait=True)

    async def scroll_points(self, batch: int) -> AsyncIterator[list[StoredPoint]]:
        offset: Any = None  # an opaque cursor (a point id) from the previous page
        while True:
            records, offset = await self._client.scroll(
                self._collection, limit=batch, offset=offset, with_payload=True, with_vectors=True
            )
            if records:
                yield [_stored_point(record) for record in records]
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
        await self._client.set_payload(
            self._collection,
            collections_payload(collection_ids),
            points=document_filter(document_id),
            wait=True,
        )

    async def search(
        self,
        scope: SearchScope,
        *,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
        fields: Sequence[str] | None = None,
    ) -> tuple[list[StoredHit], list[StoredHit]]:
        """The dense and sparse legs' hits (a leg not asked for is empty), in one round trip."""
        flt = scope_filter(scope)
        payload: bool | list[str] = True if fields is None else list(fields)
        requests: list[qm.QueryRequest] = []
        if dense is not None:
            requests.append(
                qm.QueryRequest(
                    query=dense, using=DENSE, filter=flt, limit=limit, with_payload=payload
                )
            )
        if sparse is not None and sparse.indices:
            query = qm.SparseVector(indices=sparse.indices, values=sparse.values)
            requests.append(
                qm.QueryRequest(
                    query=query, using=SPARSE, filter=flt, limit=limit, with_payload=payload
                )
            )
        if not requests:
            return [], []
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

    async def payloads(self, point_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        try:
            records = await self._client.retrieve(
                self._collection, list(point_ids), with_payload=True, with_vectors=False
            )
        except ResponseHandlingException as error:
            raise Unavailable(
                "the search index cannot be reached; try again", reason="INDEX_UNAVAILABLE"
            ) from error
        return {str(record.id): dict(record.payload or {}) for record in records}

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
            qm.Filter(must=[equals("document_id", str(document_id))]) if document_id else None
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


def _stored_point(record: qm.Record) -> StoredPoint:
    vectors = record.vector if isinstance(record.vector, dict) else {}
    dense = vectors.get(DENSE)
    sparse = vectors.get(SPARSE)
    return StoredPoint(
        point_id=str(record.id),
        dense=[float(x) for x in dense] if isinstance(dense, list) else [],  # type: ignore[arg-type]
        sparse=SparseVector(list(sparse.indices), list(sparse.values))
        if isinstance(sparse, qm.SparseVector)
        else SparseVector([], []),
        payload=dict(record.payload or {}),
    )


def _hit(point: qm.ScoredPoint) -> StoredHit:
    return StoredHit(str(point.id), float(point.score), dict(point.payload or {}))
