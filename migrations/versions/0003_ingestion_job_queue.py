"""The durable ingestion queue on PostgreSQL: procrastinate's schema (jobs, workers,
events, and the functions its workers call). SQLite keeps its in-process queue.

The schema is procrastinate's own `sql/schema.sql` of the pinned release (3.10); a later
procrastinate release brings its own SQL migrations, applied in a revision of ours.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence
from importlib import resources

from alembic import op
from sqlalchemy.util import await_only

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every object procrastinate creates is named procrastinate_* (tables, types, functions).
DROP_ALL = """
DO $$
DECLARE item record;
BEGIN
  FOR item IN SELECT tablename FROM pg_tables
      WHERE schemaname = current_schema() AND tablename LIKE 'procrastinate%' LOOP
    EXECUTE format('DROP TABLE IF EXISTS %I CASCADE', item.tablename);
  END LOOP;
  FOR item IN SELECT p.oid::regprocedure AS signature FROM pg_proc p
      JOIN pg_namespace n ON n.oid = p.pronamespace
      WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate%' LOOP
    EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', item.signature);
  END LOOP;
  FOR item IN SELECT t.typname FROM pg_type t
      JOIN pg_namespace n ON n.oid = t.typnamespace
      WHERE n.nspname = current_schema() AND t.typname LIKE 'procrastinate%'
        AND t.typtype IN ('e', 'c') LOOP
    EXECUTE format('DROP TYPE IF EXISTS %I CASCADE', item.typname);
  END LOOP;
END $$;
"""


def _run_script(sql: str) -> None:
    """Run a multi-statement script on the migration's connection and transaction: the
    simple query protocol of asyncpg's own connection (a prepared statement holds one)."""
    driver = op.get_bind().connection.driver_connection
    assert driver is not None
    await_only(driver.execute(sql))


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _run_script(resources.files("procrastinate.sql").joinpath("schema.sql").read_text())


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    _run_script(DROP_ALL)
