"""Reading and managing accounts: self-service profile changes and administration."""

import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.auth.auth_state import AuthStates
from services.auth.models import User
from services.auth.principal import Principal, Role
from services.auth.service import count_admins, get_user, get_user_by_email
from services.auth.validation import clean_full_name, normalize_email
from services.db import require_uuid, utcnow
from services.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Violations,
)
from services.pagination import decode_cursor, page_size, split_page

log = logging.getLogger("agentmesh.auth")
SELF_UPDATABLE = frozenset({"full_name", "email"})
ADMIN_UPDATABLE = frozenset({"full_name", "role"})


@dataclass(frozen=True)
class UserChanges:
    """New values for the fields to change; None leaves a field as it is."""

    full_name: str | None = None
    email: str | None = None
    role: Role | None = None

    def fields(self) -> set[str]:
        return {name for name in ("full_name", "email", "role") if getattr(self, name) is not None}


@dataclass(frozen=True)
class UserPage:
    users: list[User]
    next_page_token: str


def require_user_id(raw: str, *, field: str = "user_id") -> uuid.UUID:
    return require_uuid(raw, field=field)


class Profiles:
    """Accounts as read from the database, each with the auth_version it had, the least
    recently used dropped past `max_entries`. An entry serves only a principal of the same
    version: nothing can be stale, only missing."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[uuid.UUID, User] = OrderedDict()

    def get(self, principal: Principal) -> User | None:
        user = self._entries.get(principal.user_id)
        if user is None or principal.version is None or user.auth_version != principal.version:
            return None
        self._entries.move_to_end(principal.user_id)
        return user

    def keep(self, user: User) -> None:
        self._entries[user.id] = user
        self._entries.move_to_end(user.id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class UserService:
    """Accounts as resources. Who may call what is decided by the RPC access table."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        states: AuthStates,
        on_deleted: Callable[[uuid.UUID], Awaitable[None]] | None = None,
    ) -> None:
        self._sessions = sessions
        # Deletions and role changes apply to the account's live tokens on their next call.
        self._states = states
        # Cleans up what lives outside the database (indexed passages) after a deletion.
        self._on_deleted = on_deleted
        self._profiles = Profiles()

    async def get_current(self, principal: Principal) -> User:
        """The caller's account: from memory while the account is at the version the call's
        auth check read (every change to an account raises its version), else from the
        database. The hottest read there is, and no database round trip once warm."""
        if (user := self._profiles.get(principal)) is not None:
            return user
        user = await self.get(principal.user_id)
        self._profiles.keep(user)
        return user

    async def get(self, user_id: uuid.UUID) -> User:
        async with self._sessions() as s:
            user = await get_user(s, user_id)
        if user is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        return user

    async def update_current(self, principal: Principal, changes: UserChanges) -> User:
        """Change the caller's own name or email; their role is not theirs to change."""
        return await self._update(principal.user_id, changes, SELF_UPDATABLE)

    async def update(self, user_id: uuid.UUID, changes: UserChanges) -> User:
        """Change any account's name or role, keeping at least one administrator."""
        return await self._update(user_id, changes, ADMIN_UPDATABLE)

    async def list(self, *, requested_page_size: int, page_token: str) -> UserPage:
        """A page of accounts, oldest first."""
        size = page_size(requested_page_size)
        cursor = decode_cursor(page_token)
        query = select(User).order_by(User.created_at, User.id).limit(size + 1)
        if cursor is not None:
            query = query.where(tuple_(User.created_at, User.id) > (cursor.at, cursor.id))
        async with self._sessions() as s:
            users = list((await s.scalars(query)).all())
        return UserPage(*split_page(users, size))

    async def delete(self, user_id: uuid.UUID) -> None:
        """Delete an account and, by cascade, everything it owns; its tokens stop at once."""
        async with self._states.changing(user_id) as s:
            user = await get_user(s, user_id)
            if user is None:
                raise NotFound("user not found", reason="USER_NOT_FOUND")
            if user.role is Role.ADMIN and await count_admins(s, lock=True) <= 1:
                raise FailedPrecondition(
                    "cannot delete the last administrator", reason="LAST_ADMIN"
                )
            await s.execute(delete(User).where(User.id == user_id))
        if self._on_deleted is not None:
            try:
                await self._on_deleted(user_id)
            except Exception:  # the account is gone; its passages can no longer be served
                log.exception(
                    "a deleted account's passages stay in the index",
                    extra={"user_id": str(user_id)},
                )

    async def _update(
        self, user_id: uuid.UUID, changes: UserChanges, allowed: frozenset[str]
    ) -> User:
        violations = Violations()
        for name in sorted(changes.fields() - allowed):
            violations.add("update_mask", f"{name} cannot be changed here")
        if not changes.fields():
            violations.add("update_mask", f"name at least one of: {', '.join(sorted(allowed))}")
        values: dict[str, object] = {}
        if changes.full_name is not None:
            values["full_name"] = clean_full_name(
                changes.full_name, violations, field="user.full_name"
            )
        if changes.email is not None:
            values["email"] = normalize_email(changes.email, violations, field="user.email")
        violations.raise_if_any()
        try:
            async with self._states.changing(user_id) as s:
                user = await get_user(s, user_id)
                if user is None:
                    raise NotFound("user not found", reason="USER_NOT_FOUND")
                new_email = values.get("email")
                if new_email not in (None, user.email) and await get_user_by_email(
                    s, str(new_email)
                ):
                    raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")
                if changes.role is not None and changes.role is not user.role:
                    await self._check_demotion(s, user, changes.role)
                    values["role"] = changes.role
                for name, value in values.items():
                    setattr(user, name, value)
                user.updated_at = utcnow()
        except IntegrityError:  # the email was taken concurrently
            raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN") from None
        return user

    async def _check_demotion(self, s: AsyncSession, user: User, role: Role) -> None:
        if (
            user.role is Role.ADMIN
            and role is not Role.ADMIN
            and await count_admins(s, lock=True) <= 1
        ):
            raise FailedPrecondition("cannot demote the last administrator", reason="LAST_ADMIN")
