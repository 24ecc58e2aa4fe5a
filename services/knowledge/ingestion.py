"""Background ingestion: parse → chunk → embed → index, run as jobs from a queue.

A job names a document and the generation to build; the bytes wait in the database, so any
process that can reach it can run the job, and running it twice is harmless. Every step
that writes checks that the generation is still the document's pending one, so a job
overtaken by a replacement or a deletion removes what it wrote instead of publishing it,
and never removes a generation that is published (a second run of a job that another
runner already finished must not delete the passages that run published).

Two queues run the jobs: `InProcessQueue` (this module; SQLite, one process) and
`DurableQueue` (`durable_queue.py`; PostgreSQL, any number of worker processes).
"""

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.errors import ResourceExhausted
from services.knowledge import queries
from services.knowledge.chunking import Chunk, ChunkingPolicy, chunk_document
from services.knowledge.collection_access import document_collections
from services.knowledge.embeddings import Embedder
from services.knowledge.lexical import LexicalEncoder, SparseVector
from services.knowledge.models import Document, DocumentStatus, Stage
from services.knowledge.parsing import (
    DocumentFormat,
    ParsedText,
    ParseLimits,
    UnreadableDocument,
    parse_document,
)
from services.knowledge.vector_store import ChunkOwner
from services.metrics import Metrics

log = logging.getLogger("agentmesh.ingestion")


@dataclass(frozen=True)
class Job:
    document_id: uuid.UUID
    generation: str


class PassageIndex(Protocol):
    """What ingestion writes to: the vector store itself, or (in a worker process beside
    an embedded store) the process that owns it."""

    async def upsert(
        self,
        owner: ChunkOwner,
        chunks: Sequence[Chunk],
        dense: Sequence[list[float]],
        sparse: Sequence[SparseVector],
    ) -> None: ...

    async def delete_document(self, document_id: uuid.UUID, *, keep: str | None = None) -> None:
        """Delete a document's passages, except those of generation `keep`."""
        ...

    async def delete_generation(self, document_id: uuid.UUID, generation: str) -> None: ...

    async def delete_owner(self, owner_id: uuid.UUID) -> None:
        """Delete every passage of an owner (a deleted account)."""
        ...


@dataclass(frozen=True)
class QueueStats:
    """The queue's state now, for its metrics."""

    waiting: int
    running: int
    retrying: int  # waiting again after a failed or interrupted run
    failed: int  # out of attempts (their documents are FAILED)
    oldest_waiting_seconds: float


class JobQueue(Protocol):
    """Where uploads hand their ingestion jobs."""

    async def stats(self) -> QueueStats: ...

    async def check_capacity(self) -> None:
        """RESOURCE_EXHAUSTED (retry later) when too many jobs wait."""
        ...

    async def submit(self, job: Job) -> None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Stale(Exception):
    """The job's generation is no longer the document's pending one."""


@dataclass(frozen=True)
class Prepared:
    parsed: ParsedText
    chunks: list[Chunk]
    sparse: list[SparseVector]


# The metrics' `stage` label of each ingestion stage.
STAGE_LABELS = {
    Stage.PARSING: "parse",
    Stage.CHUNKING: "chunk",
    Stage.EMBEDDING: "embed",
    Stage.INDEXING: "index",
}


class StageClock:
    """Counts one document through the stages and times each (the ingestion metrics)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._stage: str | None = None
        self._started = self._entered = time.perf_counter()

    def enter(self, stage: Stage) -> None:
        self._close("ok")
        self._stage, self._entered = STAGE_LABELS.get(stage), time.perf_counter()

    def done(self, chunks: int) -> None:
        self._close("ok")
        self._metrics.ingest_chunks.inc(chunks)
        self._metrics.ingest_seconds.labels("total").observe(time.perf_counter() - self._started)

    def failed(self) -> None:
        self._close("failed")

    def _close(self, outcome: str) -> None:
        if self._stage is None:
            return
        self._metrics.ingest_documents.labels(self._stage, outcome).inc()
        if outcome == "ok":
            elapsed = time.perf_counter() - self._entered
            self._metrics.ingest_seconds.labels(self._stage).observe(elapsed)
        self._stage = None


class IngestionPipeline:
    """Runs one job to READY or FAILED."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        store: PassageIndex,
        embedder: Embedder,
        lexical: LexicalEncoder,
        policy: ChunkingPolicy,
        limits: ParseLimits,
        executor: ThreadPoolExecutor,
        metrics: Metrics,
    ) -> None:
        self._metrics = metrics
        self._sessions = sessions
        self._store = store
        self._embedder = embedder
        self._lexical = lexical
        self._policy = policy
        self._limits = limits
        self._executor = executor

    async def run(self, job: Job, *, last_attempt: bool = True) -> None:
        """Ingest `job` to READY or FAILED. An unexpected error fails the document on the
        last attempt; before that it is raised, for the queue to retry the job later."""
        stage = Stage.QUEUED
        clock = StageClock(self._metrics)
        try:
            async with self._sessions.begin() as s:
                document = await s.get(Document, job.document_id)
                upload = await queries.get_upload(
                    s, document_id=job.document_id, generation=job.generation
                )
            if document is None or upload is None or document.pending_generation != job.generation:
                return
            stage = Stage.PARSING
            await self._stage(job, stage, clock)
            fmt = DocumentFormat(document.document_type)
            prepared = await self._prepare(upload.content, fmt, job, clock)
            stage = Stage.EMBEDDING
            await self._stage(job, stage, clock)
            dense = await self._embedder.encode_passages([c.text for c in prepared.chunks])
            stage = Stage.INDEXING
            await self._stage(job, stage, clock)
            owner, acl_version = await self._owner(job, document.owner_id)
            await self._store.upsert(owner, prepared.chunks, dense, prepared.sparse)
            await self._publish(job, prepared, acl_version)
            clock.done(len(prepared.chunks))
        except Stale:
            await self._discard(job)
        except UnreadableDocument as error:
            clock.failed()
            await self._fail(job, stage, error.reason)
        except Exception:
            clock.failed()
            log.exception("ingestion failed", extra={"document_id": str(job.document_id)})
            if not last_attempt:
                raise
            await self._fail(job, stage, f"internal error while {stage.value}; try again")

    async def _discard(self, job: Job) -> None:
        """Remove what a stale job wrote, unless its generation is the published one (then
        another run of the same job finished first, and those passages are live)."""
        async with self._sessions.begin() as s:
            published = await s.scalar(
                select(Document.generation).where(Document.id == job.document_id)
            )
        if published != job.generation:
            await self._store.delete_generation(job.document_id, job.generation)

    async def _prepare(
        self, content: bytes, fmt: DocumentFormat, job: Job, clock: "StageClock"
    ) -> Prepared:
        """Parse, chunk and build lexical vectors on the ingestion threads."""
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(
            self._executor, parse_document, content, fmt, self._limits
        )
        await self._stage(job, Stage.CHUNKING, clock)
        chunks = await loop.run_in_executor(
            self._executor, chunk_document, parsed, self._embedder.tokenizer, self._policy
        )
        if not chunks:
            raise UnreadableDocument("no text could be extracted from the document")
        if len(chunks) > self._policy.max_chunks:
            raise UnreadableDocument(
                f"the document is too long: {len(chunks)} passages, the limit is "
                f"{self._policy.max_chunks}"
            )
        sparse = await loop.run_in_executor(
            self._executor, lambda: [self._lexical.encode_passage(c.text) for c in chunks]
        )
        return Prepared(parsed, chunks, sparse)

    async def _stage(self, job: Job, stage: Stage, clock: "StageClock") -> None:
        clock.enter(stage)
        async with self._sessions.begin() as s:
            if not await queries.set_stage(
                s, document_id=job.document_id, generation=job.generation, stage=stage
            ):
                raise Stale()

    async def _owner(self, job: Job, owner_id: uuid.UUID) -> tuple[ChunkOwner, int]:
        """Whose the passages are and the collections holding the document now, with the
        version of that list (acl_sync.py)."""
        async with self._sessions.begin() as s:
            version = await s.scalar(
                select(Document.acl_version).where(Document.id == job.document_id)
            )
            held = (await document_collections(s, [job.document_id]))[job.document_id]
        collections = tuple(str(collection_id) for collection_id in held)
        return ChunkOwner(job.document_id, job.generation, owner_id, collections), version or 0

    async def _publish(self, job: Job, prepared: Prepared, acl_version: int) -> None:
        """Make the new generation the one searches see, then drop the older ones. The
        points carry the collections of `acl_version`: if they changed since, the versions
        differ and the index owner's repair loop writes the new list (acl_sync.py)."""
        async with self._sessions.begin() as s:
            previous = await s.scalar(
                select(Document.generation).where(Document.id == job.document_id)
            )
            published = await queries.finish_ingestion(
                s,
                document_id=job.document_id,
                generation=job.generation,
                values={
                    "generation": job.generation,
                    "status": DocumentStatus.READY,
                    "stage": Stage.DONE,
                    "failure_reason": None,
                    "page_count": prepared.parsed.page_count,
                    "chunk_count": len(prepared.chunks),
                    "indexed_acl_version": acl_version,
                },
            )
        if not published:
            raise Stale()
        if previous is not None:  # a replacement: the old passages go (a first upload has none)
            await self._store.delete_document(job.document_id, keep=job.generation)

    async def _fail(self, job: Job, stage: Stage, reason: str) -> None:
        """FAILED with `reason`; a previous generation, if any, stays searchable. The state
        goes first: points of a generation the database does not name are never searched,
        and this job may only remove them while the generation is still its own."""
        try:
            async with self._sessions.begin() as s:
                failed = await queries.finish_ingestion(
                    s,
                    document_id=job.document_id,
                    generation=job.generation,
                    values={
                        "status": DocumentStatus.FAILED,
                        "stage": stage,
                        "failure_reason": reason,
                    },
                )
            if failed:
                await self._store.delete_generation(job.document_id, job.generation)
            else:
                await self._discard(job)
        except Exception:
            log.exception(
                "could not record a failed ingestion", extra={"document_id": str(job.document_id)}
            )


def queue_full() -> ResourceExhausted:
    return ResourceExhausted(
        "too many documents are waiting for ingestion; try again shortly",
        retry_after=30.0,
        reason="INGESTION_QUEUE_FULL",
    )


class InProcessQueue:
    """A bounded in-memory queue and the tasks that drain it, for a database that one
    process serves (SQLite): jobs a stop interrupted are found again at the next start."""

    def __init__(
        self,
        pipeline: IngestionPipeline,
        sessions: async_sessionmaker[AsyncSession],
        *,
        workers: int,
        capacity: int,
    ) -> None:
        self._pipeline = pipeline
        self._sessions = sessions
        self._workers = workers
        self._capacity = capacity
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._queued: dict[Job, float] = {}  # waiting jobs: when each was queued (monotonic)
        self._running = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def check_capacity(self) -> None:
        if self._queue.qsize() >= self._capacity:
            raise queue_full()

    async def submit(self, job: Job) -> None:
        self._queued[job] = time.monotonic()
        self._queue.put_nowait(job)

    async def stats(self) -> QueueStats:
        oldest = min(self._queued.values(), default=None)
        age = time.monotonic() - oldest if oldest is not None else 0.0
        return QueueStats(len(self._queued), self._running, 0, 0, age)

    async def start(self) -> None:
        """Start the workers, then resume every ingestion a stop interrupted."""
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]
        async with self._sessions.begin() as s:
            interrupted = await queries.processing(s)
        for document_id, generation in interrupted:
            await self.submit(Job(document_id, generation))

    async def stop(self) -> None:
        """Cancel the workers; interrupted jobs stay PROCESSING and resume on next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            self._queued.pop(job, None)
            self._running += 1
            try:
                await self._pipeline.run(job)
            finally:
                self._running -= 1
                self._queue.task_done()
