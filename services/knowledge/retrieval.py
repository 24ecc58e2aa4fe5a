"""Scoring retrieved chunks: fusing the dense and sparse legs, and MMR diversity.

Fusion is a convex combination of the two legs' scores after "theoretical min-max"
normalization (each leg divided by its best score, with 0 as the floor; Bruch et al. 2023,
"An Analysis of Fusion Functions for Hybrid Retrieval"). Unlike reciprocal rank fusion it
keeps how far apart scores are, so a weak lexical leg cannot drag a clear dense winner down;
`bench/retrieval.py` measures both against the dense leg alone.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from services.knowledge.vector_store import StoredHit


class SearchMode(StrEnum):
    HYBRID = "hybrid"
    DENSE = "dense"
    SPARSE = "sparse"


class Rerank(StrEnum):
    NONE = "none"
    MMR = "mmr"
    CROSS_ENCODER = "cross_encoder"


class Leg(StrEnum):
    DENSE = "dense"
    SPARSE = "sparse"


@dataclass
class Candidate:
    point_id: str
    payload: dict[str, Any]
    score: float = 0.0
    legs: set[Leg] = field(default_factory=set)


def single_leg(hits: Sequence[StoredHit], leg: Leg) -> list[Candidate]:
    """Candidates scored by one leg alone (its raw score: cosine or BM25)."""
    return [Candidate(hit.point_id, hit.payload, hit.score, {leg}) for hit in hits]


def fuse(
    dense: Sequence[StoredHit], sparse: Sequence[StoredHit], dense_weight: float
) -> list[Candidate]:
    """Both legs' hits, scored w·dense/max(dense) + (1-w)·sparse/max(sparse), best first."""
    merged: dict[str, Candidate] = {}
    for hits, leg, weight in (
        (dense, Leg.DENSE, dense_weight),
        (sparse, Leg.SPARSE, 1 - dense_weight),
    ):
        best = max((hit.score for hit in hits), default=0.0)
        for hit in hits:
            candidate = merged.setdefault(hit.point_id, Candidate(hit.point_id, hit.payload))
            candidate.legs.add(leg)
            if best > 0:
                candidate.score += weight * max(hit.score, 0.0) / best
    return sorted(merged.values(), key=lambda c: c.score, reverse=True)


def rrf(dense: Sequence[StoredHit], sparse: Sequence[StoredHit], k: int = 60) -> list[Candidate]:
    """Equal-weight reciprocal rank fusion; kept as the benchmark's reference point."""
    merged: dict[str, Candidate] = {}
    for hits, leg in ((dense, Leg.DENSE), (sparse, Leg.SPARSE)):
        for rank, hit in enumerate(hits):
            candidate = merged.setdefault(hit.point_id, Candidate(hit.point_id, hit.payload))
            candidate.legs.add(leg)
            candidate.score += 1.0 / (k + rank + 1)
    return sorted(merged.values(), key=lambda c: c.score, reverse=True)


def mmr(
    candidates: Sequence[Candidate],
    vectors: dict[str, list[float]],
    limit: int,
    diversity: float = 0.5,
) -> list[Candidate]:
    """Maximal marginal relevance: trade relevance for novelty against what is picked."""
    pool = [c for c in candidates if c.point_id in vectors]
    if not pool:
        return []
    matrix = np.asarray([vectors[c.point_id] for c in pool], dtype=np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    similarity = matrix @ matrix.T
    relevance = np.asarray([c.score for c in pool], dtype=np.float32)
    relevance /= max(float(relevance.max()), 1e-12)
    picked: list[int] = []
    closest = np.zeros(len(pool), dtype=np.float32)  # similarity to the nearest picked one
    available = np.ones(len(pool), dtype=bool)
    while len(picked) < min(limit, len(pool)):
        value = (1 - diversity) * relevance - diversity * closest
        choice = int(np.argmax(np.where(available, value, -np.inf)))
        picked.append(choice)
        available[choice] = False
        closest = np.maximum(closest, similarity[choice])
    return [pool[i] for i in picked]
