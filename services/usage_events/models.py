"""The append-only table of usage events that statistics are computed from."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from services.db import Base, UTCDateTime


class Event(Base):
    """One thing that happened: a login, a query, a tool call, a refused call, an error.

    `user_id` deliberately has no foreign key: history outlives deleted accounts, and
    appending never waits on the users table. `code` is the kind's outcome: the status
    code name of an RPC, the reason a query failed or was refused, a tool call's outcome,
    the rating of feedback.
    """

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_kind_occurred_at", "kind", "occurred_at"),
        Index("ix_events_user_id_occurred_at", "user_id", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    rpc: Mapped[str | None] = mapped_column(String(128))
    code: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(200))
    tool: Mapped[str | None] = mapped_column(String(64))
    tokens_in: Mapped[int] = mapped_column(Integer, default=0)
    tokens_out: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    success: Mapped[bool | None] = mapped_column(Boolean)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
