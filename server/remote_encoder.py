"""The embedding model of another process, over its internal IndexingService: what the
agent's intent classifier embeds with in a process that serves the agent without the
knowledge base, so that process loads no model (nor torch)."""

from collections.abc import Iterator

import grpc
from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.indexing.v1 import indexing_service_pb2_grpc as indexing_grpc

from server.channels import connect
from server.servicers.indexing import MAX_EMBED_TEXT_CHARS, MAX_EMBED_TEXTS
from services.errors import Unavailable

# Text per call, in UTF-8 bytes: within every method's receive limit (MAX_REQUEST_BYTES,
# 64 KiB by default) with room for the framing. A longer text goes alone.
BATCH_BYTES = 32 * 1024


class RemoteEncoder:
    """A `TextEncoder` (services/agent/intents.py) whose embeddings the index owner at
    `target` computes, called with the service credential. Any failure is `Unavailable`:
    the classifier then does without (its details go to the log, never to a client)."""

    def __init__(self, target: str, token: str, *, timeout: float) -> None:
        self._target = target
        self._channel = connect(target)
        self._stub = indexing_grpc.IndexingServiceStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)
        self._timeout = timeout

    async def encode_query(self, text: str) -> list[float]:
        [vector] = await self._embed([_fitted(text)], indexing_pb.EMBEDDING_KIND_QUERY)
        return vector

    async def encode_passages(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for batch in _batches([_fitted(text) for text in texts]):
            vectors += await self._embed(batch, indexing_pb.EMBEDDING_KIND_PASSAGE)
        return vectors

    async def _embed(
        self, texts: list[str], kind: indexing_pb.EmbeddingKind.ValueType
    ) -> list[list[float]]:
        request = indexing_pb.EmbedTextsRequest(texts=texts, kind=kind)
        try:
            response = await self._stub.EmbedTexts(
                request, metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"embedding at {self._target} failed: {error.code().name} {error.details()}",
                reason=f"UPSTREAM_{error.code().name}",
            ) from None
        if len(response.embeddings) != len(texts):
            raise Unavailable(
                f"embedding at {self._target} returned {len(response.embeddings)} vectors"
                f" for {len(texts)} texts",
                reason="UPSTREAM_MALFORMED",
            )
        return [list(embedding.values) for embedding in response.embeddings]

    async def close(self) -> None:
        await self._channel.close()


def _fitted(text: str) -> str:
    """`text` within the callee's length limit. The model reads a text's first 256 word
    pieces only, which a text of this length holds unless it is nearly all whitespace: the
    embedding is the one of the whole text."""
    return text[:MAX_EMBED_TEXT_CHARS]


def _batches(texts: list[str]) -> Iterator[list[str]]:
    """`texts` in order, in calls of at most MAX_EMBED_TEXTS texts and BATCH_BYTES."""
    batch: list[str] = []
    size = 0
    for text in texts:
        length = len(text.encode())
        if batch and (len(batch) == MAX_EMBED_TEXTS or size + length > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += length
    if batch:
        yield batch
