"""Which unexpected failures mean a backing service is down, not a bug.

A call that fails because PostgreSQL or Redis cannot be reached (refused, reset, timed out,
a pooled connection found dead) is UNAVAILABLE for its caller, who should try again, and
not INTERNAL: the error interceptor asks `outage_of` before reporting a bug. The message
names which kind of dependency failed, never its address.
"""

from collections.abc import Iterator

from psycopg import InterfaceError as PsycopgInterfaceError
from psycopg import OperationalError as PsycopgOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from services.errors import Unavailable

# What SQLite says when its file is busy or cannot be reached for now.
TRANSIENT_SQLITE = ("database is locked", "unable to open database file", "disk i/o error")


def _database() -> Unavailable:
    return Unavailable("the database cannot be reached; try again", reason="DATABASE_UNAVAILABLE")


def _redis() -> Unavailable:
    return Unavailable("Redis cannot be reached; try again", reason="REDIS_UNAVAILABLE")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the exceptions it was raised from or during, innermost last."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def outage_of(error: BaseException) -> Unavailable | None:
    """The UNAVAILABLE error `error` stands for, or None when it is not an outage."""
    for cause in _chain(error):
        if isinstance(cause, RedisConnectionError | RedisTimeoutError):
            return _redis()
        # psycopg is the durable queue's driver; procrastinate raises its errors as the
        # cause of a ConnectorException ("Database error.").
        if isinstance(cause, PsycopgOperationalError | PsycopgInterfaceError):
            return _database()
        if isinstance(cause, InterfaceError | PoolTimeoutError) or (
            isinstance(cause, DBAPIError) and cause.connection_invalidated
        ):
            return _database()
        # OperationalError is also SQLite's "no such table", a bug: only these are outages.
        if isinstance(cause, OperationalError) and any(
            sign in str(cause.orig).lower() for sign in TRANSIENT_SQLITE
        ):
            return _database()
        if isinstance(cause, ConnectionError | TimeoutError) and _from_database(error):
            return _database()
    return None


def _from_database(error: BaseException) -> bool:
    """Whether a bare connection error was raised by the database driver (asyncpg raises
    OSError itself when it cannot connect, outside SQLAlchemy's wrapping)."""
    for cause in _chain(error):
        traceback = cause.__traceback__
        while traceback is not None:
            module = traceback.tb_frame.f_globals.get("__name__", "")
            if module.startswith(("asyncpg", "sqlalchemy")):
                return True
            traceback = traceback.tb_next
    return False
