"""Registration, login and the refresh-token lifecycle.

Refresh tokens rotate: each exchange marks the presented token used and issues a new one
in the same family. Presenting a used token again is treated as theft (RFC 9700 §4.14.2)
and revokes the whole family, including its newest token. There is no grace window for
concurrent refreshes: of two simultaneous exchanges of one token, one wins and the other
revokes the family, so clients must serialize their refreshes.

Revoking a family (logout, password change, reuse) goes through `AuthStates.changing`, so
the access tokens of that session stop at once too (services/auth/auth_state.py). A
disabled account cannot sign in or refresh.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.trail import Actor, AuditAction, AuditTrail, Outcome
from services.auth.auth_state import AuthStates
from services.auth.models import RefreshToken, User
from services.auth.passwords import PasswordHasher, password_problems
from services.auth.principal import Principal, Role
from services.auth.tokens import TokenCodec
from services.auth.validation import canonical_email, clean_full_name, normalize_email
from services.db import utcnow
from services.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Violations,
)
from services.usage_events.recorder import EventKind, EventRecorder


@dataclass(frozen=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int
    refresh_expires_in: int
    user: User


async def get_user(s: AsyncSession, user_id: uuid.UUID) -> User | None:
    return await s.get(User, user_id)


async def get_user_by_email(s: AsyncSession, email: str) -> User | None:
    return await s.scalar(select(User).where(User.email == email))


async def count_admins(s: AsyncSession, *, lock: bool = False) -> int:
    """The number of administrators; `lock` holds their rows until commit (PostgreSQL)."""
    query = select(User.id).where(User.role == Role.ADMIN)
    if lock:
        query = query.with_for_update()
    return len((await s.scalars(query)).all())


async def revoke_tokens(
    s: AsyncSession,
    now: datetime,
    *,
    family_id: uuid.UUID | None = None,
    user_id: uuid.UUID | None = None,
) -> None:
    """Revoke every live refresh token of a family or of a user."""
    condition = (
        RefreshToken.family_id == family_id if family_id else RefreshToken.user_id == user_id
    )
    await s.execute(
        update(RefreshToken)
        .where(condition, RefreshToken.revoked_at.is_(None))
        .values(revoked_at=now)
    )


class AuthService:
    """Accounts and tokens."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        hasher: PasswordHasher,
        tokens: TokenCodec,
        events: EventRecorder,
        states: AuthStates,
        audit: AuditTrail,
    ) -> None:
        self._sessions = sessions
        self._hasher = hasher
        self._tokens = tokens
        self._events = events
        self._states = states
        self._audit = audit

    async def register(
        self, *, email: str, password: str, full_name: str, role: Role = Role.USER
    ) -> User:
        """Create an account; ALREADY_EXISTS when the email is taken."""
        violations = Violations()
        email = normalize_email(email, violations)
        full_name = clean_full_name(full_name, violations)
        for problem in password_problems(password, email=email):
            violations.add("password", problem)
        violations.raise_if_any()
        async with self._sessions() as s:
            taken = await get_user_by_email(s, email) is not None
        if taken:
            raise self._email_taken()
        user = User(
            email=email,
            full_name=full_name,
            role=role,
            password_hash=await self._hasher.hash(password),
        )
        try:
            async with self._sessions.begin() as s:
                s.add(user)
        except IntegrityError:  # registered concurrently
            raise self._email_taken() from None
        self._events.record(EventKind.REGISTRATION, user_id=user.id, success=True)
        return user

    @staticmethod
    def _not_active() -> Unauthenticated:
        return Unauthenticated("the account is disabled", reason="USER_NOT_ACTIVE")

    def _email_taken(self) -> AlreadyExists:
        """The refusal of a taken email, recorded as a failed registration."""
        self._events.record(EventKind.REGISTRATION, success=False, code="EMAIL_TAKEN")
        return AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")

    async def has_admin(self) -> bool:
        async with self._sessions() as s:
            return await count_admins(s) > 0

    async def login(self, *, email: str, password: str) -> TokenPair:
        """A new token family for valid credentials; UNAUTHENTICATED otherwise."""
        violations = Violations()
        if not email.strip():
            violations.add("email", "is required")
        if not password:
            violations.add("password", "is required")
        violations.raise_if_any()
        async with self._sessions() as s:
            user = await get_user_by_email(s, canonical_email(email))
        if (
            not await self._hasher.verify(user.password_hash if user else None, password)
            or not user
        ):
            self._events.record(EventKind.LOGIN, user_id=user.id if user else None, success=False)
            await self._login_failed(user, "invalid_credentials")
            raise Unauthenticated("wrong email or password", reason="INVALID_CREDENTIALS")
        if user.disabled_at is not None:  # said only to whoever knows the password
            self._events.record(EventKind.LOGIN, user_id=user.id, success=False)
            await self._login_failed(user, "user_not_active")
            raise self._not_active()
        # Upgrade hashes made with weaker parameters, before holding a transaction open.
        upgraded = (
            await self._hasher.hash(password)
            if user.password_hash is not None and self._hasher.needs_rehash(user.password_hash)
            else None
        )
        now = utcnow()
        async with self._sessions.begin() as s:
            if upgraded is not None:
                await s.execute(  # a stronger hash is not a profile change: updated_at stays
                    update(User)
                    .where(User.id == user.id)
                    .values(password_hash=upgraded, updated_at=User.updated_at)
                )
            pair = await self._issue_pair(s, user, family_id=uuid.uuid4(), now=now)
        self._events.record(EventKind.LOGIN, user_id=user.id, success=True)
        await self._audit.record(
            AuditAction.LOGIN, actor=Actor(user.id), target_type="user", target_id=user.id
        )
        return pair

    async def _login_failed(self, user: User | None, reason: str) -> None:
        """Record a refused login: by the account when the email names one, else anonymous
        (never the email or password that were tried)."""
        await self._audit.record(
            AuditAction.LOGIN,
            actor=Actor(user.id if user else None),
            outcome=Outcome.FAILURE,
            target_type="user" if user else None,
            target_id=user.id if user else None,
            data={"reason": reason},
        )

    async def refresh(self, *, refresh_token: str) -> TokenPair:
        """Exchange a refresh token for a new pair (rotation, with reuse detection)."""
        if not refresh_token:
            raise InvalidArgument.of("refresh_token", "is required")
        claims = self._tokens.decode_refresh(refresh_token)
        now = utcnow()
        async with self._sessions.begin() as s:
            exchanged = cast(
                CursorResult[Any],
                await s.execute(
                    update(RefreshToken)
                    .where(
                        RefreshToken.id == claims.token_id,
                        RefreshToken.used_at.is_(None),
                        RefreshToken.revoked_at.is_(None),
                    )
                    .values(used_at=now)
                ),
            )
            user = await get_user(s, claims.user_id)
            if exchanged.rowcount == 1 and user is not None:
                if user.disabled_at is not None:  # rolls back: the token stays unused
                    raise self._not_active()
                return await self._issue_pair(s, user, family_id=claims.family_id, now=now)
        async with self._sessions() as s:
            row = await s.get(RefreshToken, claims.token_id)
        if row is not None and row.used_at is not None:
            async with self._states.changing(row.user_id) as s:
                await revoke_tokens(s, now, family_id=row.family_id)
            raise Unauthenticated(
                "refresh token was already used; the session has been revoked",
                reason="REFRESH_TOKEN_REUSED",
            )
        raise Unauthenticated("refresh token revoked", reason="TOKEN_REVOKED")

    async def logout(self, principal: Principal, *, refresh_token: str, all_sessions: bool) -> None:
        """Revoke one session (the refresh token's family) or all of the caller's sessions."""
        now = utcnow()
        if all_sessions:
            async with self._states.changing(principal.user_id) as s:
                await revoke_tokens(s, now, user_id=principal.user_id)
            await self._logged_out(principal, all_sessions=True)
            return
        if not refresh_token:
            raise InvalidArgument.of("refresh_token", "is required unless all_sessions is set")
        try:
            claims = self._tokens.decode_refresh(refresh_token, verify_exp=False)
        except Unauthenticated:
            claims = None
        if claims is None or claims.user_id != principal.user_id:
            raise InvalidArgument.of("refresh_token", "is not a refresh token of this account")
        async with self._states.changing(principal.user_id) as s:
            await revoke_tokens(s, now, family_id=claims.family_id)
        await self._logged_out(principal, all_sessions=False)

    async def _logged_out(self, principal: Principal, *, all_sessions: bool) -> None:
        await self._audit.record(
            AuditAction.LOGOUT,
            actor=Actor.of(principal),
            target_type="user",
            target_id=principal.user_id,
            data={"all_sessions": all_sessions},
        )

    async def change_password(
        self, principal: Principal, *, current_password: str, new_password: str
    ) -> None:
        """Replace the caller's password and revoke all their sessions."""
        async with self._sessions() as s:
            user = await get_user(s, principal.user_id)
        if user is None:
            raise NotFound("account not found", reason="USER_NOT_FOUND")
        if not await self._hasher.verify(user.password_hash, current_password):
            await self._password_change_failed(principal, "wrong_password")
            raise PermissionDenied("the current password is wrong", reason="WRONG_PASSWORD")
        violations = Violations()
        for problem in password_problems(new_password, email=user.email):
            violations.add("new_password", problem)
        if violations.items:
            await self._password_change_failed(principal, "new_password_rejected")
        violations.raise_if_any()
        password_hash = await self._hasher.hash(new_password)
        now = utcnow()
        async with self._states.changing(user.id) as s:
            await s.execute(
                update(User)
                .where(User.id == user.id)
                .values(password_hash=password_hash, updated_at=now)
            )
            await revoke_tokens(s, now, user_id=user.id)
        await self._audit.record(
            AuditAction.PASSWORD_CHANGED,
            actor=Actor.of(principal),
            target_type="user",
            target_id=user.id,
        )

    async def _password_change_failed(self, principal: Principal, reason: str) -> None:
        await self._audit.record(
            AuditAction.PASSWORD_CHANGED,
            actor=Actor.of(principal),
            outcome=Outcome.FAILURE,
            target_type="user",
            target_id=principal.user_id,
            data={"reason": reason},
        )

    async def start_session(self, s: AsyncSession, user: User, *, now: datetime) -> TokenPair:
        """A new token family for `user` in the caller's transaction (an accepted invitation)."""
        return await self._issue_pair(s, user, family_id=uuid.uuid4(), now=now)

    async def _issue_pair(
        self, s: AsyncSession, user: User, *, family_id: uuid.UUID, now: datetime
    ) -> TokenPair:
        token_id = uuid.uuid4()
        s.add(
            RefreshToken(
                id=token_id,
                user_id=user.id,
                family_id=family_id,
                issued_at=now,
                expires_at=now + self._tokens.refresh_ttl,
            )
        )
        return TokenPair(
            access_token=self._tokens.issue_access(
                user_id=user.id, role=user.role, session_id=family_id, now=now
            ),
            refresh_token=self._tokens.issue_refresh(
                user_id=user.id, token_id=token_id, family_id=family_id, now=now
            ),
            expires_in=int(self._tokens.access_ttl.total_seconds()),
            refresh_expires_in=int(self._tokens.refresh_ttl.total_seconds()),
            user=user,
        )
