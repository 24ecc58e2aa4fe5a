"""Test databases: a fresh SQLite file or a fresh PostgreSQL database, migrated to head.

PostgreSQL comes from AGENTMESH_TEST_POSTGRES_URL (default: the local server these
machines run). Without it the PostgreSQL tests skip with a reason, except under CI=true,
where a missing service fails the run.
"""

import asyncio
import os
import uuid
from pathlib import Path

import asyncpg
import pytest

from server import migrations

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
POSTGRES_DSN = os.environ.get(
    "AGENTMESH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
BACKENDS = ["sqlite", "postgres"]


def require_service(reason: str) -> None:
    """Skip (on a laptop) or fail (in CI) because a backing service is missing."""
    if CI:
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


async def postgres_reachable() -> bool:
    try:
        connection = await asyncpg.connect(POSTGRES_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await connection.close()
    return True


def _sqlalchemy_url(dsn: str, database: str) -> str:
    base = dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return f"{base}/{database}"


async def create_postgres_database() -> tuple[str, str]:
    """A new empty database: (its name, its SQLAlchemy URL)."""
    name = f"agentmesh_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return name, _sqlalchemy_url(POSTGRES_DSN, name)


async def drop_postgres_database(name: str) -> None:
    connection = await asyncpg.connect(POSTGRES_DSN)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


class Database:
    """One test database of a backend; `create` makes it empty, `migrate` brings it to head."""

    def __init__(self, backend: str, directory: Path) -> None:
        self.backend = backend
        self._directory = directory
        self._pg_name: str | None = None
        self.url = ""

    async def create(self) -> str:
        if self.backend == "sqlite":
            self._directory.mkdir(parents=True, exist_ok=True)
            self.url = f"sqlite+aiosqlite:///{self._directory / f'{uuid.uuid4().hex}.db'}"
        else:
            if not await postgres_reachable():
                require_service(f"PostgreSQL is not reachable at {POSTGRES_DSN}")
            self._pg_name, self.url = await create_postgres_database()
        return self.url

    async def migrate(self) -> None:
        # Alembic's env runs its own event loop, so it runs on a worker thread.
        await asyncio.to_thread(migrations.upgrade, self.url)

    async def drop(self) -> None:
        if self._pg_name:
            await drop_postgres_database(self._pg_name)
