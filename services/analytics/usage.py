"""A user's own usage today, this ISO week and this calendar month, from the events
table (written within EVENTS_FLUSH_SECONDS of the call), with their quota status and the
storage their documents take."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.auth.principal import Principal
from services.db import utcnow
from services.knowledge.storage_quota import StorageStatus, storage_status
from services.periods import Window, window_bounds
from services.quotas.service import QuotaService, QuotaStatus
from services.usage_events.models import Event
from services.usage_events.recorder import EventKind


@dataclass(frozen=True)
class WindowUsage:
    window: Window
    start: datetime
    end: datetime
    queries: int
    tokens_in: int
    tokens_out: int
    documents_uploaded: int


@dataclass(frozen=True)
class Usage:
    windows: list[WindowUsage]
    quotas: list[QuotaStatus]
    storage: StorageStatus


class UsageService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        quotas: QuotaService,
        storage_quota_bytes: int = 0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessions
        self._quotas = quotas
        self._storage_quota_bytes = storage_quota_bytes
        self._clock = clock

    async def usage(self, principal: Principal) -> Usage:
        now = self._clock()
        is_query = Event.kind == EventKind.AGENT_QUERY.value
        windows = []
        async with self._sessions() as s:
            for window in Window:
                start, end = window_bounds(window, now)
                queries, tokens_in, tokens_out, uploads = (
                    await s.execute(
                        select(
                            func.sum(case((is_query, 1), else_=0)),
                            func.sum(case((is_query, Event.tokens_in), else_=0)),
                            func.sum(case((is_query, Event.tokens_out), else_=0)),
                            func.sum(
                                case((Event.kind == EventKind.DOCUMENT_UPLOAD.value, 1), else_=0)
                            ),
                        ).where(
                            and_(
                                Event.user_id == principal.user_id,
                                Event.occurred_at >= start,
                                Event.occurred_at < end,
                            )
                        )
                    )
                ).one()
                windows.append(
                    WindowUsage(
                        window,
                        start,
                        end,
                        int(queries or 0),
                        int(tokens_in or 0),
                        int(tokens_out or 0),
                        int(uploads or 0),
                    )
                )
            storage = await storage_status(
                s, owner_id=principal.user_id, limit=self._storage_quota_bytes
            )
        return Usage(windows, await self._quotas.status(principal), storage)
