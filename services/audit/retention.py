"""Audit retention: records older than AUDIT_RETENTION_DAYS are deleted, in batches, once
an hour by the process that serves the audit listing (0 days keeps them forever).

Several replicas may purge at once: each batch deletes whatever old rows it finds, so
they only share the work."""

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.models import AuditRecord
from services.db import utcnow

log = logging.getLogger("agentmesh.audit")

PURGE_INTERVAL_SECONDS = 3600.0
PURGE_BATCH = 1000


class AuditRetention:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        days: int,
        *,
        interval: float = PURGE_INTERVAL_SECONDS,
        batch: int = PURGE_BATCH,
    ) -> None:
        self._sessions = sessions
        self._keep = timedelta(days=days) if days > 0 else None
        self._interval = interval
        self._batch = batch
        self._task: asyncio.Task[None] | None = None

    async def purge(self, now: datetime | None = None) -> int:
        """Delete the records older than the retention period; how many went."""
        if self._keep is None:
            return 0
        cutoff = (now or utcnow()) - self._keep
        purged = 0
        while True:
            async with self._sessions.begin() as s:
                ids = (
                    await s.scalars(
                        select(AuditRecord.id)
                        .where(AuditRecord.occurred_at < cutoff)
                        .order_by(AuditRecord.id)
                        .limit(self._batch)
                    )
                ).all()
                if ids:
                    await s.execute(delete(AuditRecord).where(AuditRecord.id.in_(ids)))
            purged += len(ids)
            if len(ids) < self._batch:
                return purged

    async def start(self) -> None:
        if self._keep is not None:
            self._task = asyncio.create_task(self._run(), name="audit-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                purged = await self.purge()
                if purged:
                    log.info("purged %d audit records past retention", purged)
            except (SQLAlchemyError, OSError):
                log.exception("purging old audit records failed; retrying next round")
            await asyncio.sleep(self._interval)
