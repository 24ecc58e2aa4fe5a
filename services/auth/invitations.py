"""Invitations: how a person whose account an administrator created sets their password.

CreateUser hands out a one-time token (256 random bits; only its SHA-256 is stored, as for
API keys: a slow hash adds nothing to a secret that cannot be guessed). Presenting it once,
before it expires, with a password that meets the policy, sets the password and signs in.
"""

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.trail import Actor, AuditAction, AuditTrail, Outcome
from services.auth.models import Invitation, User
from services.auth.passwords import PasswordHasher, password_problems
from services.auth.service import AuthService, TokenPair
from services.db import utcnow
from services.errors import Unauthenticated, Violations

TOKEN_PREFIX = "inv_"


@dataclass(frozen=True)
class IssuedInvitation:
    token: str  # shown once, never stored
    expires_at: datetime


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Invitations:
    """Issues invitation tokens and redeems them for a password and a token pair."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        hasher: PasswordHasher,
        auth: AuthService,
        audit: AuditTrail,
        *,
        ttl: timedelta,
    ) -> None:
        self._sessions = sessions
        self._hasher = hasher
        self._auth = auth
        self._audit = audit
        self._ttl = ttl

    def issue(
        self, s: AsyncSession, user_id: uuid.UUID, *, created_by: uuid.UUID, now: datetime
    ) -> IssuedInvitation:
        """Add a new invitation for `user_id` to the caller's transaction."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        expires_at = now + self._ttl
        s.add(
            Invitation(
                user_id=user_id,
                token_hash=token_hash(token),
                created_by=created_by,
                created_at=now,
                expires_at=expires_at,
            )
        )
        return IssuedInvitation(token=token, expires_at=expires_at)

    async def accept(self, *, token: str, password: str) -> TokenPair:
        """Set the invited account's password and sign it in; the token works once."""
        violations = Violations()
        if not token:
            violations.add("invitation_token", "is required")
        if not password:
            violations.add("password", "is required")
        violations.raise_if_any()
        now = utcnow()
        async with self._sessions() as s:
            row = (
                await s.execute(
                    select(Invitation, User)
                    .join(User, User.id == Invitation.user_id)
                    .where(Invitation.token_hash == token_hash(token))
                )
            ).first()
        if row is None:
            raise await self._refused(None, "INVITATION_INVALID", "unknown invitation token")
        invitation, user = row
        if invitation.used_at is not None:
            raise await self._refused(user.id, "INVITATION_USED", "invitation already used")
        if invitation.expires_at <= now:
            raise await self._refused(user.id, "INVITATION_EXPIRED", "invitation has expired")
        if user.disabled_at is not None or user.kind != "person":
            raise await self._refused(user.id, "USER_NOT_ACTIVE", "the account is disabled")
        for problem in password_problems(password, email=user.email):
            violations.add("password", problem)
        violations.raise_if_any()
        password_hash = await self._hasher.hash(password)
        async with self._sessions.begin() as s:
            if not await self._redeem(s, invitation.id, now):
                raise await self._refused(user.id, "INVITATION_USED", "invitation already used")
            await s.execute(
                update(User)
                .where(User.id == user.id)
                .values(password_hash=password_hash, updated_at=now)
            )
            user = await s.get(User, user.id, populate_existing=True) or user
            pair = await self._auth.start_session(s, user, now=now)
        await self._audit.record(
            AuditAction.INVITATION_ACCEPTED,
            actor=Actor(user.id),
            target_type="user",
            target_id=user.id,
        )
        return pair

    @staticmethod
    async def _redeem(s: AsyncSession, invitation_id: uuid.UUID, now: datetime) -> bool:
        """Mark the invitation used; False when a concurrent call used it first."""
        result = cast(
            CursorResult[Any],
            await s.execute(
                update(Invitation)
                .where(Invitation.id == invitation_id, Invitation.used_at.is_(None))
                .values(used_at=now)
            ),
        )
        return result.rowcount == 1

    async def _refused(
        self, user_id: uuid.UUID | None, reason: str, message: str
    ) -> Unauthenticated:
        await self._audit.record(
            AuditAction.INVITATION_ACCEPTED,
            actor=Actor(user_id),
            outcome=Outcome.FAILURE,
            target_type="user" if user_id else None,
            target_id=user_id,
            data={"reason": reason},
        )
        return Unauthenticated(message, reason=reason)
