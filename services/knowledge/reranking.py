"""Optional cross-encoder reranking, when a local cross-encoder model is configured."""

from typing import Any

from services.knowledge.embeddings import Embedder
from services.knowledge.retrieval import Candidate

RERANK_DEPTH = 50


class CrossEncoderReranker:
    """Scores (query, passage) pairs with a sentence-transformers CrossEncoder."""

    def __init__(self, model: Any, compute: Embedder) -> None:
        self._model = model
        self._compute = compute  # runs on the embedder's query thread

    @classmethod
    def load(cls, path: str, compute: Embedder) -> "CrossEncoderReranker":
        from sentence_transformers import CrossEncoder

        return cls(CrossEncoder(path, device="cpu"), compute)

    async def rerank(self, query: str, candidates: list[Candidate]) -> list[Candidate]:
        """The first RERANK_DEPTH candidates reordered by the cross-encoder's score."""
        head = candidates[:RERANK_DEPTH]
        if not head:
            return []
        pairs = [(query, c.payload["text"]) for c in head]
        scores = await self._compute.run_for_query(self._model.predict, pairs)
        for candidate, score in zip(head, scores, strict=True):
            candidate.score = float(score)
        return sorted(head, key=lambda c: c.score, reverse=True)
