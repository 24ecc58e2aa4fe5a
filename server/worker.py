"""`agentmesh worker`: a process that only ingests, from the durable queue (PostgreSQL).

Embedding is the costly step of ingestion, so this is what scales out: run as many workers
as there are cores to spare, on this machine or others. With a Qdrant server they write
to it directly; with the embedded engine the process that owns it (`agentmesh serve`)
stays its only writer, and workers hand it their passages over its internal
IndexingService with the service credential (INDEX_TOKEN). The pieces are the ones
`server/domain.py` builds for the server (`build_pipeline`), not a second wiring.
"""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server import domain_settings as configured
from server.config import Settings
from server.domain import PARSE_THREADS, build_pipeline
from server.logs import configure_logging
from server.remote_index import RemoteIndex
from services.db import create_engine, create_sessionmaker
from services.knowledge.durable_queue import DurableQueue
from services.knowledge.embeddings import Embedder
from services.knowledge.lexical import LexicalEncoder
from services.knowledge.vector_backends import connect_vector_store
from services.knowledge.vector_store import VectorStore
from services.metrics import Metrics

log = logging.getLogger("agentmesh.worker")


@dataclass
class Worker:
    """The queue's worker loop over a pipeline, and how to let go of what it holds."""

    queue: DurableQueue
    release: Callable[[], Awaitable[None]]

    async def start(self) -> None:
        await self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await self.release()


def build_worker(settings: Settings) -> Worker:
    url = settings.resolved_database_url
    if not url.startswith("postgresql"):
        raise SystemExit(
            "agentmesh worker needs PostgreSQL (AGENTMESH_DATABASE_URL): with SQLite the "
            "server ingests in process"
        )
    if settings.ingest_workers == 0:
        raise SystemExit("agentmesh worker runs INGEST_WORKERS jobs at once: set it above 0")
    engine = create_engine(url)
    sessions = create_sessionmaker(engine)
    embedder = Embedder.load(configured.embedder_settings(settings))
    executor = ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="ingest")
    index: RemoteIndex | VectorStore
    if settings.qdrant_url:
        index = connect_vector_store(
            url=settings.qdrant_url,
            api_key=configured.revealed(settings.qdrant_api_key),
            data_dir=settings.data_dir,
            collection=settings.qdrant_collection,
        )
    else:
        target = settings.index_target or f"127.0.0.1:{settings.grpc_port}"
        index = RemoteIndex(target, configured.index_token(settings))
    pipeline = build_pipeline(
        settings, sessions, index, embedder, LexicalEncoder(), executor, Metrics()
    )

    async def release() -> None:
        await index.close()
        embedder.close()
        executor.shutdown(wait=False, cancel_futures=True)
        await engine.dispose()

    queue = DurableQueue(
        url,
        sessions,
        configured.queue_settings(settings),
        pipeline,
        queue_name=configured.ingestion_queue(settings),
    )
    return Worker(queue, release)


async def run_worker(settings: Settings) -> None:
    """Ingest until SIGTERM/SIGINT; a job cut short runs again elsewhere or next time."""
    configure_logging(settings.log_level, settings.log_format)
    worker = build_worker(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await worker.start()
    log.info("agentmesh worker ingesting", extra={"jobs_at_once": settings.ingest_workers})
    try:
        await stop.wait()
    finally:
        await worker.stop()
        log.info("worker stopped")
