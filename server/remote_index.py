"""The vector index of another process, over its internal IndexingService: what an
`agentmesh worker` writes to when the index is the embedded engine that process owns."""

import uuid
from collections.abc import Sequence

from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.indexing.v1 import indexing_service_pb2_grpc as indexing_grpc

from server.channels import connect
from services.knowledge.chunking import Chunk
from services.knowledge.lexical import SparseVector
from services.knowledge.vector_store import ChunkOwner

# Passages per call: a few MB with their vectors, well within the server's message cap.
UPSERT_BATCH = 256


class RemoteIndex:
    """A `PassageIndex` whose writes are calls to the index owner, with the service
    credential; a failed call raises, and the queue retries the job."""

    def __init__(self, target: str, token: str, *, timeout: float = 60.0) -> None:
        self._channel = connect(target)
        self._stub = indexing_grpc.IndexingServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    async def upsert(
        self,
        owner: ChunkOwner,
        chunks: Sequence[Chunk],
        dense: Sequence[list[float]],
        sparse: Sequence[SparseVector],
    ) -> None:
        passages = [
            indexing_pb.IndexedPassage(
                index=chunk.index,
                text=chunk.text,
                start=chunk.start,
                end=chunk.end,
                page=chunk.page,
                dense=vector,
                sparse_indices=lexical.indices,
                sparse_values=lexical.values,
            )
            for chunk, vector, lexical in zip(chunks, dense, sparse, strict=True)
        ]
        # Point ids derive from the passage, so a batch sent again after a failure
        # overwrites what the first try wrote.
        for first in range(0, len(passages), UPSERT_BATCH):
            request = indexing_pb.UpsertPassagesRequest(
                document_id=str(owner.document_id),
                generation=owner.generation,
                owner_id=str(owner.owner_id),
                collection_ids=owner.collection_ids,
                passages=passages[first : first + UPSERT_BATCH],
            )
            await self._stub.UpsertPassages(request, metadata=self._metadata, timeout=self._timeout)

    async def delete_document(self, document_id: uuid.UUID, *, keep: str | None = None) -> None:
        request = indexing_pb.DeleteDocumentPassagesRequest(
            document_id=str(document_id), keep_generation=keep or ""
        )
        await self._stub.DeleteDocumentPassages(
            request, metadata=self._metadata, timeout=self._timeout
        )

    async def delete_generation(self, document_id: uuid.UUID, generation: str) -> None:
        request = indexing_pb.DeleteGenerationRequest(
            document_id=str(document_id), generation=generation
        )
        await self._stub.DeleteGeneration(request, metadata=self._metadata, timeout=self._timeout)

    async def delete_owner(self, owner_id: uuid.UUID) -> None:
        request = indexing_pb.DeleteOwnerPassagesRequest(owner_id=str(owner_id))
        await self._stub.DeleteOwnerPassages(
            request, metadata=self._metadata, timeout=self._timeout
        )

    async def close(self) -> None:
        await self._channel.close()
