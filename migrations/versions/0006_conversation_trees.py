"""Conversations as trees (issue 20): a message's parent and a conversation's active leaf.

Each existing conversation becomes one branch: every message's parent is the message
stored before it, and the active leaf is the newest.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("parent_id", sa.Uuid(), nullable=True))
        batch.create_foreign_key(
            "fk_messages_parent_id_messages", "messages", ["parent_id"], ["id"], ondelete="CASCADE"
        )
        batch.create_index("ix_messages_parent_id", ["parent_id"])
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("active_message_id", sa.Uuid(), nullable=True))
    # Row-value comparison orders (created_at, id) alike on both databases.
    op.execute(
        """
        UPDATE messages SET parent_id = (
            SELECT before.id FROM messages AS before
            WHERE before.conversation_id = messages.conversation_id
              AND (before.created_at, before.id) < (messages.created_at, messages.id)
            ORDER BY before.created_at DESC, before.id DESC
            LIMIT 1
        )
        """
    )
    op.execute(
        """
        UPDATE conversations SET active_message_id = (
            SELECT newest.id FROM messages AS newest
            WHERE newest.conversation_id = conversations.id
            ORDER BY newest.created_at DESC, newest.id DESC
            LIMIT 1
        )
        """
    )


def downgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("active_message_id")
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_parent_id")
        batch.drop_constraint("fk_messages_parent_id_messages", type_="foreignkey")
        batch.drop_column("parent_id")
