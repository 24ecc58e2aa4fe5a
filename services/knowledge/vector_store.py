"""The vector store seam: one collection of chunks, every owner's, tenant-keyed.

Each point is one chunk of one *generation* of a document (a generation is one ingestion of
one content). Searches see a generation only once the database names it the document's
current one, which is what makes replacing a document's content atomic.

Two backends implement `VectorStore`: the Qdrant engine embedded in process
(`qdrant_edge_store.py`, the default) and a Qdrant server through qdrant-client
(`qdrant_server_store.py`); `vector_backends.py` picks one. Every filter is written here, in
qdrant-client's models, and the embedded backend translates it; `scope_filter` is the one
place the owner filter is added to a search.
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
