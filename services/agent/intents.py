"""Intents and the fast embedding-similarity classifier (the LLM classifies when it is unsure
or absent; see graph.classify_intent)."""

import enum
from dataclasses import dataclass

import numpy as np

from services.agent.prompts import PromptManager
from services.knowledge.embeddings import Embedder

EXAMPLES_FILE = "agent/intent_examples.yaml"


class Intent(enum.StrEnum):
    GREETING = "greeting"
    FOLLOW_UP = "follow_up"
    KNOWLEDGE_BASE = "knowledge_base"
    WEB_SEARCH = "web_search"
    API_LOOKUP = "api_lookup"
    GENERAL = "general"


@dataclass(frozen=True)
class IntentGuess:
    intent: Intent
    confidence: float  # cosine similarity to the nearest example


@dataclass(frozen=True)
class IntentInfo:
    name: str
    description: str
    examples: list[str]


class IntentExamples:
    """The example questions of agent/intent_examples.yaml, embedded once."""

    def __init__(self, infos: list[IntentInfo], labels: list[Intent], matrix: np.ndarray) -> None:
        self.infos = infos
        self._labels = labels
        self._matrix = matrix

    @classmethod
    def build(cls, prompts: PromptManager, embedder: Embedder) -> "IntentExamples":
        """Embed the examples (blocking: once, while the domain is built)."""
        raw = prompts.data(EXAMPLES_FILE)
        infos = [
            IntentInfo(
                name=Intent(name).value, description=spec["description"], examples=spec["examples"]
            )
            for name, spec in raw.items()
        ]
        labels = [Intent(info.name) for info in infos for _ in info.examples]
        texts = [example for info in infos for example in info.examples]
        vectors = np.asarray(embedder.encode_passages_sync(texts), dtype=np.float32)
        return cls(infos, labels, _normalise(vectors))

    async def guess(self, embedder: Embedder, text: str) -> IntentGuess:
        """The intent of the most similar example, and how similar it is."""
        query = _normalise(np.asarray([await embedder.encode_query(text)], dtype=np.float32))[0]
        scores = self._matrix @ query
        best = int(np.argmax(scores))
        return IntentGuess(self._labels[best], float(scores[best]))


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return normalised
