"""The audit trail's table: one row per security-relevant action, kept for the retention
period (AUDIT_RETENTION_DAYS)."""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from services.db import Base, UTCDateTime


class AuditRecord(Base):
    """Who did what to whom, when, from where, and how it ended.

    Like usage events, `actor_id` and `target_id` have no foreign key: the trail outlives
    the accounts, keys and documents it names. No row ever holds a secret (a password, a
    token, an API key's secret): only identifiers and a key's visible prefix.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_occurred_at", "occurred_at"),
        Index("ix_audit_events_action_occurred_at", "action", "occurred_at"),
        Index("ix_audit_events_actor_id_occurred_at", "actor_id", "occurred_at"),
        Index("ix_audit_events_target_id_occurred_at", "target_id", "occurred_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    action: Mapped[str] = mapped_column(String(48))  # an AuditAction value
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure
    # The account that acted (None: anonymous, e.g. a failed login for an unknown email),
    # and the API key it acted with, if any.
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    actor_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    target_type: Mapped[str | None] = mapped_column(String(32))  # user | api_key | document
    target_id: Mapped[str | None] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(128))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)
