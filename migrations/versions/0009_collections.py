"""Teams (issue 23), collections: named sets of documents owned by an account or a group,
with read/write grants to accounts, groups and everyone. The administrators' `shared` flag
becomes membership of a built-in collection every user reads; those documents' passages
get the collection's id in the search index when the knowledge base next starts (their
`acl_version` is ahead of `indexed_acl_version` until then, and until then the database's
check at search time keeps serving them to everyone, as before).

Revision ID: 0009
Revises: 0008
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVERYONE = uuid.UUID("00000000-0000-4000-8000-00000000e0e1")  # services.knowledge.models


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.String(1000), nullable=False),
        sa.Column("owner_user_id", sa.Uuid(), nullable=True),
        sa.Column("owner_group_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "owner_user_id IS NULL OR owner_group_id IS NULL",
            name=op.f("ck_collections_one_owner"),
        ),
        sa.ForeignKeyConstraint(
            ["owner_user_id"],
            ["users.id"],
            name=op.f("fk_collections_owner_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["owner_group_id"],
            ["groups.id"],
            name=op.f("fk_collections_owner_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_collections")),
    )
    op.create_index("ix_collections_owner_user_id", "collections", ["owner_user_id"])
    op.create_index("ix_collections_owner_group_id", "collections", ["owner_group_id"])
    op.create_table(
        "collection_documents",
        sa.Column("collection_id", sa.Uuid(), nullable=False),
        sa.Column("document_id", sa.Uuid(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["collections.id"],
            name=op.f("fk_collection_documents_collection_id_collections"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["document_id"],
            ["documents.id"],
            name=op.f("fk_collection_documents_document_id_documents"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "collection_id", "document_id", name=op.f("pk_collection_documents")
        ),
    )
    op.create_index("ix_collection_documents_document_id", "collection_documents", ["document_id"])
    op.create_table(
        "collection_grants",
        sa.Column("collection_id", sa.Uuid(), nullable=False),
        sa.Column("grantee", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("group_id", sa.Uuid(), nullable=True),
        sa.Column("access", sa.String(8), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("access IN ('read', 'write')", name=op.f("ck_collection_grants_access")),
        sa.ForeignKeyConstraint(
            ["collection_id"],
            ["collections.id"],
            name=op.f("fk_collection_grants_collection_id_collections"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_collection_grants_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_collection_grants_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("collection_id", "grantee", name=op.f("pk_collection_grants")),
    )
    op.create_index("ix_collection_grants_user_id", "collection_grants", ["user_id"])
    op.create_index("ix_collection_grants_group_id", "collection_grants", ["group_id"])
    with op.batch_alter_table("documents") as batch:
        batch.add_column(sa.Column("acl_version", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("indexed_acl_version", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_index("ix_documents_acl_stale", "documents", ["acl_version", "indexed_acl_version"])
    _shared_flag_to_collection()
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("shared")


def _shared_flag_to_collection() -> None:
    now = datetime.now(UTC)
    collections = sa.table(
        "collections",
        sa.column("id", sa.Uuid()),
        sa.column("name", sa.String()),
        sa.column("description", sa.String()),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    grants = sa.table(
        "collection_grants",
        sa.column("collection_id", sa.Uuid()),
        sa.column("grantee", sa.String()),
        sa.column("access", sa.String()),
        sa.column("granted_at", sa.DateTime(timezone=True)),
    )
    everyone = EVERYONE
    op.execute(
        collections.insert().values(
            id=everyone,
            name="Everyone",
            description="Documents every user can search, shared by administrators.",
            created_at=now,
        )
    )
    op.execute(
        grants.insert().values(
            collection_id=everyone, grantee="everyone", access="read", granted_at=now
        )
    )
    op.execute(
        sa.text(
            "INSERT INTO collection_documents (collection_id, document_id, added_at) "
            "SELECT :everyone, id, :now FROM documents WHERE shared"
        ).bindparams(
            sa.bindparam("everyone", EVERYONE, sa.Uuid()),
            sa.bindparam("now", now, sa.DateTime(timezone=True)),
        )
    )
    op.execute("UPDATE documents SET acl_version = 1 WHERE shared")


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.add_column(
            sa.Column("shared", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(
        sa.text(
            "UPDATE documents SET shared = true WHERE id IN (SELECT document_id FROM "
            "collection_documents WHERE collection_id = :everyone)"
        ).bindparams(sa.bindparam("everyone", EVERYONE, sa.Uuid()))
    )
    op.drop_index("ix_documents_acl_stale", table_name="documents")
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("indexed_acl_version")
        batch.drop_column("acl_version")
    op.drop_table("collection_grants")
    op.drop_table("collection_documents")
    op.drop_table("collections")
