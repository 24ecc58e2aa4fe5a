"""IndexingService (internal): ingestion workers' passages into this process's vector index,
and its embedding model for an agent process without one."""

import asyncio
import math
from typing import Any

from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.indexing.v1 import indexing_service_pb2_grpc as indexing_grpc

from services.db import require_uuid
from services.errors import InvalidArgument, Violations
from services.knowledge.chunking import Chunk
from services.knowledge.embeddings import Embedder
from services.knowledge.ingestion import PassageIndex
from services.knowledge.lexical import SparseVector
from services.knowledge.vector_store import ChunkOwner

# EmbedTexts' limits (the contract states them). A question is at most MAX_QUERY_CHARS
# (8,000 by default) and the model reads its first 256 word pieces only; the intent
# examples, the most texts the agent sends at once, are 32.
MAX_EMBED_TEXTS = 128
MAX_EMBED_TEXT_CHARS = 32_768


def _generation(value: str, field: str = "generation") -> str:
    if not value:
        raise InvalidArgument.of(field, "is required")
    return value


def _owner(request: indexing_pb.UpsertPassagesRequest) -> ChunkOwner:
    return ChunkOwner(
        document_id=require_uuid(request.document_id, field="document_id"),
        generation=_generation(request.generation),
        owner_id=require_uuid(request.owner_id, field="owner_id"),
        collection_ids=tuple(
            str(require_uuid(raw, field="collection_ids")) for raw in request.collection_ids
        ),
    )


def _sparse(passage: indexing_pb.IndexedPassage) -> SparseVector:
    if len(passage.sparse_indices) != len(passage.sparse_values):
        raise InvalidArgument.of("passages", "sparse indices and values differ in length")
    if not all(math.isfinite(value) for value in passage.sparse_values):
        raise InvalidArgument.of("passages", "sparse values must be finite numbers")
    return SparseVector(list(passage.sparse_indices), list(passage.sparse_values))


def _dense(passage: indexing_pb.IndexedPassage, dimension: int) -> list[float]:
    """The passage's embedding, checked before the store sees it: the store refuses a
    vector of another size with an error of its own, and would keep NaN or infinity."""
    if len(passage.dense) != dimension:
        raise InvalidArgument.of(
            "passages", f"dense vectors must have {dimension} values, not {len(passage.dense)}"
        )
    vector = list(passage.dense)
    if not all(math.isfinite(value) for value in vector):
        raise InvalidArgument.of("passages", "dense values must be finite numbers")
    return vector


def _texts_to_embed(request: indexing_pb.EmbedTextsRequest) -> list[str]:
    violations = Violations()
    if request.kind == indexing_pb.EMBEDDING_KIND_UNSPECIFIED:
        violations.add("kind", "is required")
    elif request.kind not in indexing_pb.EmbeddingKind.values():
        violations.add("kind", "is not a known kind")
    texts = list(request.texts)
    if not 1 <= len(texts) <= MAX_EMBED_TEXTS:
        violations.add("texts", f"must hold 1 to {MAX_EMBED_TEXTS} texts, not {len(texts)}")
    for position, text in enumerate(texts):
        if not text or len(text) > MAX_EMBED_TEXT_CHARS:
            violations.add(
                f"texts[{position}]", f"must be 1 to {MAX_EMBED_TEXT_CHARS} characters long"
            )
    violations.raise_if_any()
    return texts


class IndexingServicer(indexing_grpc.IndexingServiceServicer):
    def __init__(self, index: PassageIndex, embedder: Embedder) -> None:
        self._index = index
        self._embedder = embedder
        self._dimension = embedder.dimension

    async def UpsertPassages(
        self, request: indexing_pb.UpsertPassagesRequest, context: Any
    ) -> indexing_pb.UpsertPassagesResponse:
        passages = request.passages
        chunks = [Chunk(p.index, p.text, p.start, p.end, p.page, tokens=0) for p in passages]
        dense = [_dense(p, self._dimension) for p in passages]
        sparse = [_sparse(p) for p in passages]
        await self._index.upsert(_owner(request), chunks, dense, sparse)
        return indexing_pb.UpsertPassagesResponse()

    async def DeleteGeneration(
        self, request: indexing_pb.DeleteGenerationRequest, context: Any
    ) -> indexing_pb.DeleteGenerationResponse:
        document_id = require_uuid(request.document_id, field="document_id")
        await self._index.delete_generation(document_id, _generation(request.generation))
        return indexing_pb.DeleteGenerationResponse()

    async def DeleteDocumentPassages(
        self, request: indexing_pb.DeleteDocumentPassagesRequest, context: Any
    ) -> indexing_pb.DeleteDocumentPassagesResponse:
        document_id = require_uuid(request.document_id, field="document_id")
        await self._index.delete_document(document_id, keep=request.keep_generation or None)
        return indexing_pb.DeleteDocumentPassagesResponse()

    async def DeleteOwnerPassages(
        self, request: indexing_pb.DeleteOwnerPassagesRequest, context: Any
    ) -> indexing_pb.DeleteOwnerPassagesResponse:
        await self._index.delete_owner(require_uuid(request.owner_id, field="owner_id"))
        return indexing_pb.DeleteOwnerPassagesResponse()

    async def EmbedTexts(
        self, request: indexing_pb.EmbedTextsRequest, context: Any
    ) -> indexing_pb.EmbedTextsResponse:
        texts = _texts_to_embed(request)
        if request.kind == indexing_pb.EMBEDDING_KIND_QUERY:
            vectors = await asyncio.gather(*(self._embedder.encode_query(t) for t in texts))
        else:
            vectors = await self._embedder.encode_passages(texts)
        embeddings = [indexing_pb.Embedding(values=vector) for vector in vectors]
        return indexing_pb.EmbedTextsResponse(embeddings=embeddings)
