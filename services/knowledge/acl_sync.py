"""Keeping each point's `collections` payload equal to its document's collections.

A change of a document's collections bumps `documents.acl_version` in the transaction that
makes it; after the commit the new list is written on the document's points and
`indexed_acl_version` catches up. If that write fails or the process dies in between, the
repair loop of the process owning the index finds the document (the versions differ) and
writes it again. Until then the search stays safe: its filter reads the payload, and the
database check of every hit it serves (KnowledgeService._served) reads the collections as
they are, so a passage is never served through a collection its document has left.
"""

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.knowledge.collection_access import document_collections
from services.knowledge.models import Document
from services.knowledge.vector_store import VectorStore

log = logging.getLogger(__name__)

REPAIR_SECONDS = 5.0  # how often the index owner looks for documents left unsynced
REPAIR_BATCH = 200


async def bump(s: AsyncSession, document_ids: Iterable[uuid.UUID]) -> None:
    """Mark the documents' collections changed (in the transaction that changes them)."""
    ids = list(set(document_ids))
    if ids:
        await s.execute(
            update(Document)
            .where(Document.id.in_(ids))
            .values(acl_version=Document.acl_version + 1)
        )


class AclSync:
    """Writes documents' collections onto their points, now and on repair."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], store: VectorStore) -> None:
        self._sessions = sessions
        self._store = store
        self._repairing: asyncio.Task[None] | None = None

    async def sync(self, document_ids: Sequence[uuid.UUID]) -> None:
        """Write the current collections of these documents onto their points; a failure is
        logged and left to the repair loop (the caller's change is committed already)."""
        try:
            await self._sync(document_ids)
        except Exception:
            log.exception("writing documents' collections to the index failed; will retry")

    async def _sync(self, document_ids: Sequence[uuid.UUID]) -> None:
        if not document_ids:
            return
        async with self._sessions.begin() as s:
            versions = dict(
                (
                    await s.execute(
                        select(Document.id, Document.acl_version).where(
                            Document.id.in_(list(document_ids))
                        )
                    )
                )
                .tuples()
                .all()
            )
            held = await document_collections(s, versions)
        for document_id, version in versions.items():
            collections = [str(collection_id) for collection_id in held[document_id]]
            await self._store.set_collections(document_id, collections)
            async with self._sessions.begin() as s:
                await s.execute(
                    update(Document)
                    .where(Document.id == document_id, Document.acl_version == version)
                    .values(indexed_acl_version=version)
                )

    async def repair(self) -> int:
        """Sync every document whose points may carry an old list; how many there were."""
        async with self._sessions.begin() as s:
            stale = list(
                await s.scalars(
                    select(Document.id)
                    .where(Document.acl_version != Document.indexed_acl_version)
                    .limit(REPAIR_BATCH)
                )
            )
        await self._sync(stale)
        return len(stale)

    def start(self) -> None:
        self._repairing = asyncio.create_task(self._repair_forever())

    async def stop(self) -> None:
        task, self._repairing = self._repairing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _repair_forever(self) -> None:
        while True:
            try:
                while await self.repair() == REPAIR_BATCH:
                    pass
            except Exception:
                log.exception("repairing documents' collections in the index failed")
            await asyncio.sleep(REPAIR_SECONDS)
