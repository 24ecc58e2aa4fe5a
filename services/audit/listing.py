"""The administrators' listing of the audit trail: newest first, filtered, keyset-paged.

Records are ordered by (occurred_at, id); the page token holds the last row's pair. The
ids are integers, so the token is this module's own (services/pagination.py's holds UUIDs).
"""

import base64
import binascii
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.models import AuditRecord
from services.audit.trail import AuditAction, Outcome
from services.db import parse_uuid
from services.errors import InvalidArgument, Violations
from services.pagination import page_size

KNOWN_ACTIONS = frozenset(action.value for action in AuditAction)


@dataclass(frozen=True)
class AuditFilter:
    """What to list; every part optional. Ids arrive as given and are checked here."""

    actions: list[str] = field(default_factory=list)
    outcome: Outcome | None = None
    actor_id: str = ""
    target_id: str = ""
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class AuditPage:
    records: list[AuditRecord]
    next_page_token: str


@dataclass(frozen=True)
class _Checked:
    actions: list[str]
    actor_id: uuid.UUID | None
    target_id: str | None


def _check(where: AuditFilter) -> _Checked:
    violations = Violations()
    unknown = sorted(set(where.actions) - KNOWN_ACTIONS)
    if unknown:
        violations.add("actions", f"names unknown actions: {', '.join(unknown)[:200]}")
    actor_id = parse_uuid(where.actor_id) if where.actor_id else None
    if where.actor_id and actor_id is None:
        violations.add("actor_id", "must be a user id (a UUID)")
    target_id = parse_uuid(where.target_id) if where.target_id else None
    if where.target_id and target_id is None:
        violations.add("target_id", "must be an id (a UUID)")
    if where.start is not None and where.end is not None and where.start >= where.end:
        violations.add("end_time", "must be after start_time")
    violations.raise_if_any()
    return _Checked(sorted(set(where.actions)), actor_id, str(target_id) if target_id else None)


def _filtered(checked: _Checked, where: AuditFilter) -> Select[AuditRecord]:
    query = select(AuditRecord).order_by(AuditRecord.occurred_at.desc(), AuditRecord.id.desc())
    if checked.actions:
        query = query.where(AuditRecord.action.in_(checked.actions))
    if where.outcome is not None:
        query = query.where(AuditRecord.outcome == where.outcome.value)
    if checked.actor_id is not None:
        query = query.where(AuditRecord.actor_id == checked.actor_id)
    if checked.target_id is not None:
        query = query.where(AuditRecord.target_id == checked.target_id)
    if where.start is not None:
        query = query.where(AuditRecord.occurred_at >= where.start)
    if where.end is not None:
        query = query.where(AuditRecord.occurred_at < where.end)
    return query


def encode_token(at: datetime, record_id: int) -> str:
    raw = json.dumps({"t": at.isoformat(), "i": record_id}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(token: str) -> tuple[datetime, int] | None:
    """The (occurred_at, id) in `token`; None for an empty one, INVALID_ARGUMENT if bad."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode((token + "=" * (-len(token) % 4)).encode()))
        at, record_id = datetime.fromisoformat(data["t"]), data["i"]
        if at.tzinfo is None or type(record_id) is not int:
            raise ValueError("not a cursor")
        return at, record_id
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument.of("page_token", "is not a valid page token") from None


class AuditListing:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def list(self, size: int, token: str, where: AuditFilter) -> AuditPage:
        """Audit records, newest first, filtered, one page at a time."""
        limit = page_size(size)
        cursor = decode_token(token)
        query = _filtered(_check(where), where)
        if cursor is not None:
            at, last_id = cursor
            query = query.where(
                or_(
                    AuditRecord.occurred_at < at,
                    and_(AuditRecord.occurred_at == at, AuditRecord.id < last_id),
                )
            )
        async with self._sessions() as s:
            rows = list((await s.scalars(query.limit(limit + 1))).all())
        if len(rows) <= limit:
            return AuditPage(rows, "")
        last = rows[limit - 1]
        return AuditPage(rows[:limit], encode_token(last.occurred_at, last.id))
