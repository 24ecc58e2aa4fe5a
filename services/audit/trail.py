"""The audit trail: security-relevant actions, each recorded with who acted (account and
API key), on what, when, from where (request id, client address) and how it ended.

Unlike usage events, an audit record is written before the call that did the action
answers (its own short transaction, after the action's): an answered action is in the
trail. Recording never fails the action: a failed write is logged at ERROR and counted.
The request id and client address come from `where`, which the server supplies (the
domain knows nothing of RPCs).

Record an action from a domain service with `await trail.record(AuditAction.X, ...)`.
"""

import enum
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.models import AuditRecord
from services.db import utcnow

log = logging.getLogger("agentmesh.audit")


class AuditAction(enum.StrEnum):
    LOGIN = "login"
    LOGOUT = "logout"
    PASSWORD_CHANGED = "password_changed"
    INVITATION_ACCEPTED = "invitation_accepted"
    API_KEY_CREATED = "api_key_created"
    API_KEY_REVOKED = "api_key_revoked"
    USER_CREATED = "user_created"
    SERVICE_ACCOUNT_CREATED = "service_account_created"
    ROLE_CHANGED = "role_changed"
    USER_DISABLED = "user_disabled"
    USER_ENABLED = "user_enabled"
    USER_DELETED = "user_deleted"
    ACCOUNT_EXPORTED = "account_exported"
    DOCUMENT_DELETED = "document_deleted"
    GROUP_CREATED = "group_created"
    GROUP_UPDATED = "group_updated"
    GROUP_DELETED = "group_deleted"
    GROUP_MEMBER_ADDED = "group_member_added"
    GROUP_MEMBER_REMOVED = "group_member_removed"
    GROUP_MEMBER_ROLE_CHANGED = "group_member_role_changed"


class Outcome(enum.StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"


@dataclass(frozen=True)
class Actor:
    """Who acted: an account (None: anonymous) and the API key it used (None: a token)."""

    user_id: uuid.UUID | None = None
    key_id: uuid.UUID | None = None

    @classmethod
    def of(cls, caller: "Caller") -> "Actor":
        """The actor of an authenticated call: its account and the API key it used, if any."""
        return cls(caller.user_id, caller.key_id)


class Caller(Protocol):
    """An authenticated caller as the trail needs it (services.auth's Principal is one)."""

    @property
    def user_id(self) -> uuid.UUID: ...
    @property
    def key_id(self) -> uuid.UUID | None: ...


@dataclass(frozen=True)
class Origin:
    """Where the current call came from, as the server knows it."""

    request_id: str | None = None
    client_ip: str | None = None


class AuditTrail:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        where: Callable[[], Origin] = Origin,
    ) -> None:
        self._sessions = sessions
        self._where = where
        self.failed_writes = 0

    async def record(
        self,
        action: AuditAction,
        *,
        actor: Actor,
        outcome: Outcome = Outcome.SUCCESS,
        target_type: str | None = None,
        target_id: uuid.UUID | str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Write one record now. `data` must never hold a secret."""
        origin = self._where()
        row = {
            "occurred_at": utcnow(),
            "action": action.value,
            "outcome": outcome.value,
            "actor_id": actor.user_id,
            "actor_key_id": actor.key_id,
            "target_type": target_type,
            "target_id": str(target_id) if target_id is not None else None,
            "request_id": origin.request_id,
            "client_ip": origin.client_ip,
            "data": data,
        }
        try:
            async with self._sessions.begin() as s:
                await s.execute(insert(AuditRecord), [row])
        except (SQLAlchemyError, OSError):
            self.failed_writes += 1
            log.exception("writing the audit record of %s failed", action.value)
