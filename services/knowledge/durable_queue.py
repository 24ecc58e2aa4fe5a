"""The durable ingestion queue on PostgreSQL, on procrastinate: jobs are rows (migration
0003), so an upload's job outlives the process that took it, and any number of worker
processes (`agentmesh worker`, or the server itself) run them.

- One job at a time per document: every job holds the lock `document:<id>`.
- The same job is queued once: its queueing lock `ingest:<id>:<generation>` refuses a
  second copy while one waits.
- Retries with exponential backoff for unexpected errors; the last attempt fails the
  document (`IngestionPipeline.run(last_attempt=...)`).
- One queue per vector index (`queue_name`): a job must be written into the index of the
  process that took its upload when that index is an embedded engine, so two such
  processes on one database never take each other's jobs.
- Recovery without a restart: every worker process, every `sweep_seconds`, puts back the
  jobs of workers whose heartbeat stopped (a killed worker), and queues a job for any
  document left PROCESSING with none (an upload whose job was never queued).
"""

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import procrastinate
from procrastinate.exceptions import AlreadyEnqueued
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.db import utcnow
from services.knowledge.ingestion import IngestionPipeline, Job, QueueStats, queue_full

log = logging.getLogger("agentmesh.ingestion")

# Every ingestion queue's name starts so: one per index that jobs must be written into.
QUEUE_PREFIX = "ingestion"
TASK = "agentmesh.ingest_document"

# The documents left PROCESSING, for a while, with no job waiting or running for them in
# any ingestion queue.
ORPHANS = text(
    """
    SELECT d.id, d.pending_generation FROM documents d
    WHERE d.status = 'processing' AND d.pending_generation IS NOT NULL
      AND d.updated_at < :before
      AND NOT EXISTS (
        SELECT 1 FROM procrastinate_jobs j
        WHERE j.queue_name LIKE :prefix AND j.status IN ('todo', 'doing')
          AND j.lock = 'document:' || d.id::text)
    """
)
WAITING = text(
    "SELECT count(*) FROM procrastinate_jobs WHERE queue_name = :queue AND status = 'todo'"
)


@dataclass(frozen=True)
class QueueSettings:
    capacity: int = 100
    """Jobs that may wait before uploads are refused with RESOURCE_EXHAUSTED."""
    workers: int = 1
    """Jobs this process runs at once; 0 only queues them (workers run elsewhere)."""
    max_attempts: int = 5
    """Runs of a job that fails unexpectedly, the last one failing its document."""
    backoff_seconds: int = 2
    """Exponential backoff base: retries wait 2, 4, 8, ... seconds."""
    heartbeat_seconds: float = 10.0
    """How often a worker process tells the database it is alive."""
    stalled_seconds: float = 30.0
    """Silence after which a worker is taken for dead and its jobs run again."""
    sweep_seconds: float = 15.0
    """How often a worker process looks for stalled jobs and orphaned documents."""


def psycopg_conninfo(database_url: str) -> str:
    """A SQLAlchemy PostgreSQL URL (postgresql+asyncpg://...) as a libpq connection URI."""
    url = make_url(database_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class DurableQueue:
    def __init__(
        self,
        database_url: str,
        sessions: async_sessionmaker[AsyncSession],
        settings: QueueSettings,
        pipeline: IngestionPipeline | None,
        *,
        queue_name: str = QUEUE_PREFIX,
    ) -> None:
        """`pipeline` runs the jobs; None only queues them (a process that runs none)."""
        self._sessions = sessions
        self._settings = settings
        self._pipeline = pipeline
        self._queue = queue_name
        self._app = procrastinate.App(
            connector=procrastinate.PsycopgConnector(
                conninfo=psycopg_conninfo(database_url), min_size=1, max_size=4
            )
        )
        retry = procrastinate.RetryStrategy(
            max_attempts=settings.max_attempts - 1, exponential_wait=settings.backoff_seconds
        )
        self._task = self._app.task(name=TASK, queue=queue_name, retry=retry, pass_context=True)(
            self._run
        )
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(
        self, context: procrastinate.JobContext, document_id: str, generation: str
    ) -> None:
        assert self._pipeline is not None and context.job is not None
        last = context.job.attempts + 1 >= self._settings.max_attempts
        await self._pipeline.run(Job(uuid.UUID(document_id), generation), last_attempt=last)

    async def check_capacity(self) -> None:
        async with self._sessions() as s:
            waiting = int(await s.scalar(WAITING, {"queue": self._queue}) or 0)
        if waiting >= self._settings.capacity:
            raise queue_full()

    async def submit(self, job: Job) -> None:
        """Queue `job` (a copy already waiting makes this a no-op)."""
        deferrer = self._task.configure(
            lock=f"document:{job.document_id}",
            queueing_lock=f"ingest:{job.document_id}:{job.generation}",
        )
        with contextlib.suppress(AlreadyEnqueued):
            await deferrer.defer_async(document_id=str(job.document_id), generation=job.generation)

    async def start(self) -> None:
        await self._app.open_async()
        if self._pipeline is not None and self._settings.workers > 0:
            self._tasks = [
                asyncio.create_task(self._work(), name="ingestion-worker"),
                asyncio.create_task(self._sweep_forever(), name="ingestion-sweep"),
            ]

    async def stop(self) -> None:
        """Stop the workers; a job cut short runs again (its worker is gone from the
        database at once, so no one waits for its heartbeat to go stale)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self._app.close_async()

    async def _work(self) -> None:
        """Run procrastinate's worker until cancelled, starting it again whenever it stops.

        The worker stops for good when one of its own queries fails (fetching the next job,
        its heartbeat, its listener): a moment without PostgreSQL would otherwise leave this
        process running no job at all, every later upload PROCESSING for ever. The job it
        was running goes back to the queue through `sweep`, like a dead worker's."""
        while True:
            try:
                await self._app.run_worker_async(
                    queues=[self._queue],
                    concurrency=self._settings.workers,
                    install_signal_handlers=False,
                    update_heartbeat_interval=self._settings.heartbeat_seconds,
                    stalled_worker_timeout=self._settings.stalled_seconds,
                    delete_jobs="successful",
                    shutdown_graceful_timeout=0,
                )
                error = None
            except Exception as failure:
                error = repr(failure)
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # stop(): the worker was cancelled
                return
            log.warning("ingestion worker stopped; starting it again", extra={"error": error})
            await asyncio.sleep(self._settings.backoff_seconds)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.sweep_seconds)
            try:
                await self.sweep()
            except Exception:  # the next sweep tries again; a worker must not die of it
                log.exception("ingestion sweep failed")

    async def sweep(self) -> tuple[int, int]:
        """Run again the jobs of dead workers, and queue a job for every document left
        PROCESSING without one; (jobs retried, documents queued)."""
        stalled = await self._app.job_manager.get_stalled_jobs(
            queue=self._queue, seconds_since_heartbeat=self._settings.stalled_seconds
        )
        retried = 0
        for job in stalled:
            with contextlib.suppress(Exception):  # another sweep may have retried it first
                await self._app.job_manager.retry_job(job)
                retried += 1
        before = utcnow() - timedelta(seconds=self._settings.stalled_seconds)
        async with self._sessions() as s:
            rows = (
                await s.execute(ORPHANS, {"before": before, "prefix": f"{QUEUE_PREFIX}%"})
            ).all()
        for document_id, generation in rows:
            await self.submit(Job(_uuid(document_id), str(generation)))
        if retried or rows:
            log.warning(
                "ingestion recovered",
                extra={"stalled_jobs_retried": retried, "orphaned_documents_queued": len(rows)},
            )
        return retried, len(rows)

    async def stats(self) -> QueueStats:
        async with self._sessions() as s:
            row = (await s.execute(STATS, {"queue": self._queue})).one()
        waiting, running, retrying, failed, oldest = row
        return QueueStats(
            int(waiting), int(running), int(retrying), int(failed), float(oldest or 0.0)
        )


STATS = text(
    """
    SELECT count(*) FILTER (WHERE j.status = 'todo'),
           count(*) FILTER (WHERE j.status = 'doing'),
           count(*) FILTER (WHERE j.status = 'todo' AND j.attempts > 0),
           count(*) FILTER (WHERE j.status = 'failed'),
           EXTRACT(EPOCH FROM now() - min(e.at) FILTER (WHERE j.status = 'todo'))
    FROM procrastinate_jobs j
    LEFT JOIN procrastinate_events e ON e.job_id = j.id AND e.type = 'deferred'
    WHERE j.queue_name = :queue
    """
)


def _uuid(value: Any) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
