"""Reading and managing accounts: self-service profile changes and administration."""

import enum
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, tuple_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.trail import Actor, AuditAction, AuditTrail, Outcome
from services.auth.auth_state import AuthStates
from services.auth.invitations import Invitations, IssuedInvitation
from services.auth.models import User
from services.auth.passwords import PasswordHasher
from services.auth.principal import Principal, Role
from services.auth.service import get_user, get_user_by_email
from services.auth.validation import clean_full_name, normalize_email
from services.db import require_uuid, utcnow
from services.errors import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
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


class UserKind(enum.StrEnum):
    """`users.kind`: a person signs in; a service account (a program) only uses API keys."""

    PERSON = "person"
    SERVICE = "service"


@dataclass(frozen=True)
class NewUser:
    """What CreateUser asks for."""

    email: str
    full_name: str
    role: Role | None  # None: not given (refused)
    kind: UserKind | None


@dataclass(frozen=True)
class CreatedUser:
    user: User
    invitation: IssuedInvitation | None  # a person's; None for a service account


def actor_of(principal: Principal) -> Actor:
    return Actor(principal.user_id, principal.key_id)


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
        *,
        hasher: PasswordHasher,
        invitations: Invitations,
        audit: AuditTrail,
        on_deleted: Callable[[uuid.UUID], Awaitable[None]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._hasher = hasher  # checks the password of a person deleting their account
        self._invitations = invitations
        self._audit = audit
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
        user, _ = await self._update(principal.user_id, changes, SELF_UPDATABLE)
        return user

    async def update(self, actor: Principal, user_id: uuid.UUID, changes: UserChanges) -> User:
        """Change any account's name or role, keeping at least one administrator."""
        user, previous_role = await self._update(user_id, changes, ADMIN_UPDATABLE)
        if previous_role is not user.role:
            await self._audit.record(
                AuditAction.ROLE_CHANGED,
                actor=actor_of(actor),
                target_type="user",
                target_id=user_id,
                data={"from": previous_role.value, "to": user.role.value},
            )
        return user

    async def create(self, actor: Principal, new: NewUser) -> CreatedUser:
        """Create an account: a person gets a one-time invitation to set their password, a
        service account no password at all (it can never sign in)."""
        violations = Violations()
        email = normalize_email(new.email, violations)
        full_name = clean_full_name(new.full_name, violations)
        if new.role is None:
            violations.add("role", "must be ROLE_USER or ROLE_ADMIN")
        if new.kind is None:
            violations.add("kind", "must be USER_KIND_PERSON or USER_KIND_SERVICE")
        violations.raise_if_any()
        assert new.role is not None and new.kind is not None
        now = utcnow()
        user = User(
            email=email,
            full_name=full_name,
            role=new.role,
            kind=new.kind.value,
            password_hash=None,
            created_at=now,
            updated_at=now,
        )
        invitation = None
        try:
            async with self._sessions.begin() as s:
                if await get_user_by_email(s, email) is not None:
                    raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN")
                s.add(user)
                await s.flush()
                if new.kind is UserKind.PERSON:
                    invitation = self._invitations.issue(
                        s, user.id, created_by=actor.user_id, now=now
                    )
        except IntegrityError:  # created concurrently
            raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN") from None
        action = (
            AuditAction.USER_CREATED
            if new.kind is UserKind.PERSON
            else AuditAction.SERVICE_ACCOUNT_CREATED
        )
        await self._audit.record(
            action,
            actor=actor_of(actor),
            target_type="user",
            target_id=user.id,
            data={"role": new.role.value, "kind": new.kind.value},
        )
        return CreatedUser(user, invitation)

    async def set_disabled(self, actor: Principal, user_id: uuid.UUID, *, disabled: bool) -> User:
        """Disable or enable an account; its tokens and keys follow on their next call."""
        async with self._states.changing(user_id) as s:
            user = await get_user(s, user_id)
            if user is None:
                raise NotFound("user not found", reason="USER_NOT_FOUND")
            if disabled and user.disabled_at is None:
                if user.role is Role.ADMIN and not await other_active_admins(s, user.id):
                    raise FailedPrecondition(
                        "cannot disable the last active administrator", reason="LAST_ADMIN"
                    )
                user.disabled_at = utcnow()
            elif not disabled:
                user.disabled_at = None
            user.updated_at = utcnow()
        await self._audit.record(
            AuditAction.USER_DISABLED if disabled else AuditAction.USER_ENABLED,
            actor=actor_of(actor),
            target_type="user",
            target_id=user_id,
        )
        return user

    async def delete_current(self, principal: Principal, *, current_password: str) -> None:
        """Delete the caller's own account as an administrator would; a person proves it
        with their password, a service account cannot delete itself."""
        user = await self.get(principal.user_id)
        refusal = None
        if user.kind == UserKind.SERVICE:
            refusal = PermissionDenied(
                "a service account cannot delete itself", reason="SERVICE_ACCOUNT"
            )
        elif not await self._hasher.verify(user.password_hash, current_password):
            refusal = PermissionDenied("the current password is wrong", reason="WRONG_PASSWORD")
        if refusal is not None:
            await self._audit.record(
                AuditAction.USER_DELETED,
                actor=actor_of(principal),
                outcome=Outcome.FAILURE,
                target_type="user",
                target_id=user.id,
                data={"self": True, "reason": refusal.reason},
            )
            raise refusal
        await self.delete(principal, user.id)

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

    async def delete(self, actor: Principal, user_id: uuid.UUID) -> None:
        """Delete an account and, by cascade, everything it owns; its tokens stop at once."""
        async with self._states.changing(user_id) as s:
            user = await get_user(s, user_id)
            if user is None:
                raise NotFound("user not found", reason="USER_NOT_FOUND")
            if user.role is Role.ADMIN and not await other_active_admins(s, user.id):
                raise FailedPrecondition(
                    "cannot delete the last administrator", reason="LAST_ADMIN"
                )
            await s.execute(delete(User).where(User.id == user_id))
        await self._audit.record(
            AuditAction.USER_DELETED,
            actor=actor_of(actor),
            target_type="user",
            target_id=user_id,
            data={"self": actor.user_id == user_id, "kind": user.kind},
        )
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
    ) -> tuple[User, Role]:
        """The account after the change, and its role before it."""
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
                previous_role = user.role
                if changes.role is not None and changes.role is not user.role:
                    await self._check_demotion(s, user, changes.role)
                    values["role"] = changes.role
                for name, value in values.items():
                    setattr(user, name, value)
                user.updated_at = utcnow()
        except IntegrityError:  # the email was taken concurrently
            raise AlreadyExists("an account with this email exists", reason="EMAIL_TAKEN") from None
        return user, previous_role

    async def _check_demotion(self, s: AsyncSession, user: User, role: Role) -> None:
        if (
            user.role is Role.ADMIN
            and role is not Role.ADMIN
            and not await other_active_admins(s, user.id)
        ):
            raise FailedPrecondition("cannot demote the last administrator", reason="LAST_ADMIN")


async def other_active_admins(s: AsyncSession, user_id: uuid.UUID) -> int:
    """The number of enabled administrators besides `user_id`, every administrator's row
    held until commit (PostgreSQL), so two concurrent removals cannot both pass."""
    query = select(User.id, User.disabled_at).where(User.role == Role.ADMIN).with_for_update()
    rows = (await s.execute(query)).all()
    return sum(1 for row in rows if row.id != user_id and row.disabled_at is None)
