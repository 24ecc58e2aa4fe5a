"""Database plumbing shared by every feature: the declarative base, column types that
behave the same on SQLite and PostgreSQL, and the engine/session factory."""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, MetaData, event, func, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

from services.errors import InvalidArgument

# Deterministic constraint names, so Alembic migrations name things the same on both DBs.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp; SQLite drops the zone, so it is restored on load."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(AsyncAttrs, DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> uuid.UUID:
    return uuid.uuid4()


def parse_uuid(value: str) -> uuid.UUID | None:
    """The UUID in `value`, or None when it is not one."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return None


def require_uuid(raw: str, *, field: str) -> uuid.UUID:
    """The UUID in `raw`; INVALID_ARGUMENT on `field` when it is not one."""
    parsed = parse_uuid(raw)
    if parsed is None:
        raise InvalidArgument.of(field, "must be a UUID")
    return parsed


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """An async engine for SQLite (aiosqlite) or PostgreSQL (asyncpg)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, echo=echo, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=10, pool_timeout=10
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite (cascading deletes depend on them); WAL lets
    # readers proceed while a writer commits.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


@dataclass(frozen=True)
class PoolStats:
    """The connection pool as a metrics scrape reads it."""

    size: int
    in_use: int
    idle: int
    overflow: int


def pool_stats(engine: AsyncEngine) -> PoolStats:
    """The pool's counts now (SQLite's pool has no size: zeros)."""
    pool: Any = engine.sync_engine.pool
    return PoolStats(
        size=getattr(pool, "size", lambda: 0)(),
        in_use=getattr(pool, "checkedout", lambda: 0)(),
        idle=getattr(pool, "checkedin", lambda: 0)(),
        overflow=max(0, getattr(pool, "overflow", lambda: 0)()),
    )


async def ping(engine: AsyncEngine) -> None:
    """One round trip to the database (the readiness probe's check)."""
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def utc_day(column: Any, dialect: str) -> Any:
    """A SQL expression for the UTC calendar day of a UTCDateTime column, as YYYY-MM-DD
    text, on SQLite (which stores UTC text) and PostgreSQL (timestamptz)."""
    if dialect == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)
