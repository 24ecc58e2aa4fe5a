"""Alembic environment (async). One migration history for every table of the product.

The database URL comes from the caller (`agentmesh migrate` sets it) or, for a bare
`alembic` command, from the same settings the service reads.
"""

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from services.db import create_engine
from services.models import Base

target_metadata = Base.metadata


def _url() -> str:
    url = context.config.attributes.get("database_url")
    if url:
        return str(url)
    from server.config import Settings

    return Settings().resolved_database_url


def _ours(name: str | None, type_: str, parent_names: object) -> bool:
    """Leave procrastinate's tables (the job queue, migration 0003) out of autogenerate."""
    return not (type_ == "table" and name is not None and name.startswith("procrastinate"))


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        include_name=_ours,
        compare_type=True,
        # SQLite cannot ALTER most things in place; batch mode copies the table instead.
        render_as_batch=(url or str(connection.engine.url) if connection else "").startswith(
            "sqlite"
        ),
        literal_binds=connection is None,
    )


def run_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    asyncio.run(run_online())
