"""Intents and the fast embedding-similarity classifier (the LLM classifies when it is unsure
or absent; see graph.classify_intent)."""

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.agent.prompts import PromptManager
from services.errors import Unavailable

EXAMPLES_FILE = "agent/intent_examples.yaml"
log = logging.getLogger("agentmesh.agent")


class TextEncoder(Protocol):
    """What the classifier embeds with: the knowledge base's model in its process
    (`services.knowledge.embeddings.Embedder`), or that process's model over gRPC in an
    agent process without it, which raises `Unavailable` when it cannot be reached."""

    async def encode_query(self, text: str) -> list[float]:
        """The embedding of one question."""
        ...

    async def encode_passages(self, texts: list[str]) -> list[list[float]]:
        """The embeddings of several texts, in order."""
        ...


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
    """The example questions of agent/intent_examples.yaml, embedded through `encoder` on
    the first classification (not at start-up: the encoder may be another process, which
    need not be up yet), once."""

    def __init__(self, infos: list[IntentInfo], encoder: TextEncoder) -> None:
        self.infos = infos
        self._encoder = encoder
        self._labels = [Intent(info.name) for info in infos for _ in info.examples]
        self._matrix: np.ndarray | None = None
        self._embedding: asyncio.Task[np.ndarray] | None = None

    @classmethod
    def load(cls, prompts: PromptManager, encoder: TextEncoder) -> "IntentExamples":
        """The examples of the prompts' file, to be embedded through `encoder`."""
        raw = prompts.data(EXAMPLES_FILE)
        infos = [
            IntentInfo(
                name=Intent(name).value, description=spec["description"], examples=spec["examples"]
            )
            for name, spec in raw.items()
        ]
        return cls(infos, encoder)

    async def guess(self, text: str) -> IntentGuess | None:
        """The intent of the most similar example, and how similar it is; None when the
        encoder is unavailable (logged: the caller classifies another way, and the next
        call tries the encoder again)."""
        try:
            matrix = await self._examples()
            vector = await self._encoder.encode_query(text)
        except Unavailable as error:
            log.warning("intent examples not compared: %s", error.message)
            return None
        query = _normalise(np.asarray([vector], dtype=np.float32))[0]
        scores = matrix @ query
        best = int(np.argmax(scores))
        return IntentGuess(self._labels[best], float(scores[best]))

    async def _examples(self) -> np.ndarray:
        """The examples' unit vectors, one row each. Callers that arrive while they are
        being embedded wait for that one attempt and share its outcome: concurrent first
        runs embed them once, and an encoder that hangs holds each of them for one call's
        timeout, not one after another. A failed attempt is forgotten: the next caller
        starts another."""
        if self._matrix is not None:
            return self._matrix
        if self._embedding is None:
            self._embedding = asyncio.create_task(self._embed_examples())
            self._embedding.add_done_callback(self._embedded)
        # Shielded: a run cancelled while waiting does not cancel the others' attempt.
        return await asyncio.shield(self._embedding)

    async def _embed_examples(self) -> np.ndarray:
        texts = [example for info in self.infos for example in info.examples]
        vectors = await self._encoder.encode_passages(texts)
        self._matrix = _normalise(np.asarray(vectors, dtype=np.float32))
        return self._matrix

    def _embedded(self, attempt: "asyncio.Task[np.ndarray]") -> None:
        self._embedding = None  # done: the matrix is kept, or the next caller tries again
        if not attempt.cancelled():
            attempt.exception()  # its waiters got it; retrieved even when none is left


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    normalised: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return normalised
