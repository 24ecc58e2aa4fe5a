"""Document generations (atomic content replacement) and uploads awaiting ingestion.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("generation", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("pending_generation", sa.String(length=32), nullable=True))
    op.create_table(
        "document_uploads",
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("generation", sa.String(length=32), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["documents.id"],
            name=op.f("fk_document_uploads_document_id_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("document_id", name=op.f("pk_document_uploads")),
    )


def downgrade() -> None:
    op.drop_table("document_uploads")
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("pending_generation")
        batch.drop_column("generation")
