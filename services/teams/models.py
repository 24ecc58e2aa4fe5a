"""Tables of groups and their memberships.

A membership row is what makes an account part of a group: deleting the account or the
group deletes it (ON DELETE CASCADE), so nothing ever names a member who is gone. Lookups
go both ways: a group's members (the primary key's order) and an account's groups (the
user_id index, which the permission checks of collections will read on every search).
"""

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from services.db import Base, UTCDateTime, new_id, utcnow


class Group(Base):
    __tablename__ = "groups"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    # The name case-folded: two groups cannot differ only by case ("Sales" and "sales").
    name_key: Mapped[str] = mapped_column(String(300), unique=True)
    description: Mapped[str] = mapped_column(String(1000), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class GroupMember(Base):
    """An account's membership of a group, with its role there."""

    __tablename__ = "group_members"
    __table_args__ = (
        CheckConstraint("role IN ('member', 'manager')", name="role"),
        Index("ix_group_members_user_id", "user_id"),
    )

    # The composite primary key is the (group_id, user_id) uniqueness: one row per member.
    group_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[str] = mapped_column(String(16))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
