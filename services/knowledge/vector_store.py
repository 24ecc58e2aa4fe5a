"""The vector store seam: one collection of chunks, every owner's, tenant-keyed.

Each point is one chunk of one *generation* of a document (a generation is one ingestion of
one content). Searches see a generation only once the database names it the document's
current one, which is what makes replacing a document's content atomic.

Two backends implement `VectorStore`: the Qdrant engine embedded in process
(`qdrant_edge_store.py`, the default) and a Qdrant server through qdrant-client
(`qdrant_server_store.py`); `vector_backends.py` picks one. Every filter is written here, in
qdrant-client's models, and the embedded backend translates it; `scope_filter` is the one
place the permission filter is added to a search.

Who may read a point is in its payload: `owner_id` (its document's owner) and
`collections` (the ids of the collections holding its document). A search's filter is
"owned by the caller, or in one of the collections the caller may read now", the
collections read from the database for that search; so a revoked grant or a removed group
member changes the next search without touching a point, and `top_k`, counts and dense
scores are computed over readable points only (the sparse leg's IDF, Qdrant's modifier, is
a statistic of the whole index). Both fields have payload indexes in both backends.
"""

import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qdrant_client import models as qm

from services.knowledge.chunking import Chunk
from services.knowledge.lexical import SparseVector

DENSE = "dense"
SPARSE = "sparse"
UPSERT_BATCH = 64
POINT_NAMESPACE = uuid.UUID("5b0e7d2a-3f43-4c8e-9d6e-0d1c2b7a9e51")
NOBODY = "nobody"  # an owner id no point has (owner ids are UUIDs)


class CollectionMismatch(RuntimeError):
    """The configured collection was created for a model of another dimension."""


@dataclass(frozen=True)
class SearchScope:
    """Which chunks a search may see: those of `owner_id`'s documents (None: none of them)
    and of the documents in `collection_ids`, optionally narrowed to `document_ids`."""

    owner_id: uuid.UUID | None
    collection_ids: tuple[uuid.UUID, ...] = ()
    document_ids: tuple[uuid.UUID, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether the scope reaches no document at all (nothing to ask the index)."""
        return self.owner_id is None and not self.collection_ids


@dataclass(frozen=True)
class ChunkOwner:
    document_id: uuid.UUID
    generation: str
    owner_id: uuid.UUID
    collection_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredHit:
    point_id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class StoredPoint:
    """One point as stored: what a copy to another store needs, nothing re-computed."""

    point_id: str
    dense: list[float]
    sparse: SparseVector
    payload: dict[str, Any]


class VectorStore(Protocol):
    """What the knowledge base asks of a vector index; both backends implement it."""

    async def ensure_collection(self, dimension: int) -> None:
        """Create the collection for `dimension`-sized vectors, or check an existing one."""
        ...

    async def open_existing(self) -> None:
        """Open the stored collection whatever its dimension (to copy it); raise if none."""
        ...

    async def upsert(
        self,
        owner: ChunkOwner,
        chunks: Sequence[Chunk],
        dense: Sequence[list[float]],
        sparse: Sequence[SparseVector],
    ) -> None:
        """Store one generation's chunks (point ids are deterministic: a rerun overwrites)."""
        ...

    async def upsert_points(self, points: Sequence[StoredPoint]) -> None:
        """Store points as they are (a migration or a re-index)."""
        ...

    def scroll_points(self, batch: int) -> AsyncIterator[list[StoredPoint]]:
        """Every point with its vectors and payload, `batch` at a time."""
        ...

    async def delete_document(self, document_id: uuid.UUID, *, keep: str | None = None) -> None:
        """Delete a document's points, except those of generation `keep`."""
        ...

    async def delete_generation(self, document_id: uuid.UUID, generation: str) -> None:
        """Delete the points of one generation of a document."""
        ...

    async def delete_owner(self, owner_id: uuid.UUID) -> None:
        """Delete every point of an owner."""
        ...

    async def set_collections(self, document_id: uuid.UUID, collection_ids: Sequence[str]) -> None:
        """Record the collections holding a document on every point of it (no re-embedding)."""
        ...

    async def search(
        self,
        scope: SearchScope,
        *,
        dense: list[float] | None,
        sparse: SparseVector | None,
        limit: int,
        fields: Sequence[str] | None = None,
    ) -> tuple[list[StoredHit], list[StoredHit]]:
        """The dense and sparse legs' hits (a leg not asked for is empty), in one round trip.

        `fields` limits each hit's payload to those keys (None: the whole payload); a search
        that ranks many candidates and serves a few asks for the few's text by `payloads`.
        """
        ...

    async def payloads(self, point_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The whole payloads of the points that exist among `point_ids`."""
        ...

    async def dense_vectors(self, point_ids: Sequence[str]) -> dict[str, list[float]]:
        """The dense vectors of the points that exist among `point_ids`."""
        ...

    async def count(self, document_id: uuid.UUID | None = None) -> int:
        """Points of one document, or of the whole collection."""
        ...

    async def ping(self) -> None:
        """Raise unless the index answers."""
        ...

    async def close(self) -> None:
        """Release the index (the embedded one flushes and unlocks its directory)."""
        ...


def scope_filter(scope: SearchScope) -> qm.Filter:
    """The permission filter every vector query goes through: the caller's own chunks and
    those of the collections the caller may read (an empty scope matches nothing)."""
    reach: list[Any] = []
    if scope.owner_id is not None:
        reach.append(equals("owner_id", str(scope.owner_id)))
    if scope.collection_ids:
        ids = [str(collection_id) for collection_id in scope.collection_ids]
        reach.append(qm.FieldCondition(key="collections", match=qm.MatchAny(any=ids)))
    if not reach:  # no owner and no collection: a filter no point passes
        reach.append(equals("owner_id", NOBODY))
    must: list[Any] = [qm.Filter(should=reach)]
    if scope.document_ids:
        ids = [str(document_id) for document_id in scope.document_ids]
        must.append(qm.FieldCondition(key="document_id", match=qm.MatchAny(any=ids)))
    return qm.Filter(must=must)


def document_filter(document_id: uuid.UUID, *, keep: str | None = None) -> qm.Filter:
    """A document's points, except those of generation `keep`."""
    return qm.Filter(
        must=[equals("document_id", str(document_id))],
        must_not=[equals("generation", keep)] if keep else None,
    )


def generation_filter(document_id: uuid.UUID, generation: str) -> qm.Filter:
    return qm.Filter(
        must=[equals("document_id", str(document_id)), equals("generation", generation)]
    )


def collections_payload(collection_ids: Sequence[str]) -> dict[str, Any]:
    """The payload that records which collections hold a document."""
    return {"collections": sorted(collection_ids)}


def owner_filter(owner_id: uuid.UUID) -> qm.Filter:
    return qm.Filter(must=[equals("owner_id", str(owner_id))])


def equals(key: str, value: str) -> qm.FieldCondition:
    return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))


def point_id(owner: ChunkOwner, index: int) -> str:
    """Deterministic, so re-running an interrupted ingestion overwrites instead of adding."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{owner.document_id}:{owner.generation}:{index}"))


def chunk_points(
    owner: ChunkOwner,
    chunks: Sequence[Chunk],
    dense: Sequence[list[float]],
    sparse: Sequence[SparseVector],
) -> list[StoredPoint]:
    """One point per chunk, with the payload searches filter on and return."""
    return [
        StoredPoint(
            point_id=point_id(owner, chunk.index),
            dense=vector,
            sparse=lexical,
            payload={
                "owner_id": str(owner.owner_id),
                **collections_payload(owner.collection_ids),
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
