"""API keys: credentials for programs, managed by their owner (or, for a service account,
by an administrator) and checked on every call they authenticate.

A key is `am_<prefix>_<secret>`: the prefix (8 url-safe characters) is shown to recognise
the key and finds its row; only the SHA-256 of the whole key is stored (256 random bits of
secret: a slow hash adds nothing), compared in constant time.

Creating or revoking a key goes through `AuthStates.changing` for its owner, so the owner's
auth_version rises. `KeyCredentials` caches each key's row in this process together with
the owner's version it was read at, and trusts the copy only while the owner's current auth
state (one cache read per call, as for a token) has that version: a revocation, a disabled
owner or a role change applies on the next call in every replica that shares the states.

`last_used_at` is written off the request path: a use is noted in memory at most once a
minute per key, and a background task writes the noted times every `flush_interval`.
"""

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import unicodedata
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, tuple_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.audit.trail import Actor, AuditAction, AuditTrail, Outcome
from services.auth.auth_state import AuthStates
from services.auth.models import ApiKey, User
from services.auth.principal import Principal
from services.db import parse_uuid, require_uuid, utcnow
from services.errors import (
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Violations,
)
from services.pagination import decode_cursor, page_size, split_page

log = logging.getLogger("agentmesh.auth")

KEY_MARK = "am_"
PREFIX_LENGTH = 8
MAX_NAME = 100
# A key's last use is written at most this often.
LAST_USED_EVERY = timedelta(minutes=1)
SERVICE_KIND = "service"


def new_key() -> tuple[str, str]:
    """A new key and its prefix."""
    prefix = secrets.token_urlsafe(6)  # 6 bytes: 8 characters
    return f"{KEY_MARK}{prefix}_{secrets.token_urlsafe(32)}", prefix


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_api_key(credential: str) -> bool:
    """Whether a bearer credential is an API key (else it is an access token)."""
    return credential.startswith(KEY_MARK)


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key; None for anything else."""
    end = len(KEY_MARK) + PREFIX_LENGTH
    if len(key) <= end + 1 or key[end] != "_":
        return None
    return key[len(KEY_MARK) : end]


def clean_key_name(raw: str, violations: Violations) -> str:
    name = raw.strip()
    if not name:
        violations.add("name", "is required")
    elif len(name) > MAX_NAME:
        violations.add("name", f"must be at most {MAX_NAME} characters")
    elif any(unicodedata.category(c).startswith("C") for c in name):
        violations.add("name", "must not contain control characters")
    return name


@dataclass(frozen=True)
class KeyPage:
    keys: list[ApiKey]
    next_page_token: str


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # the whole key, shown once


def _actor(principal: Principal) -> Actor:
    return Actor(user_id=principal.user_id, key_id=principal.key_id)


def _audit_data(key: ApiKey) -> dict[str, object]:
    return {"prefix": key.prefix, "read_only": key.read_only}


class ApiKeyService:
    """Creating, listing and revoking keys. Who may call what is decided here for the owner
    (the caller's own keys; an administrator's for service accounts) and by the access
    table for the rest (a key cannot manage keys)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        states: AuthStates,
        audit: AuditTrail,
        credentials: "KeyCredentials",
    ) -> None:
        self._sessions = sessions
        self._states = states
        self._audit = audit
        self.credentials = credentials

    async def create(
        self,
        principal: Principal,
        *,
        name: str,
        expires_at: datetime | None,
        read_only: bool,
        user_id: str = "",
    ) -> CreatedKey:
        """A new key for the caller, or for a service account (administrators)."""
        violations = Violations()
        name = clean_key_name(name, violations)
        if expires_at is not None and expires_at <= utcnow():
            violations.add("expires_at", "must be in the future")
        owner_id = self._owner_id(user_id, principal, violations)
        violations.raise_if_any()
        if owner_id != principal.user_id:
            await self._check_service_account(principal, owner_id, audit_refusal=True)
        secret, prefix = new_key()
        key = ApiKey(
            id=uuid.uuid4(),
            user_id=owner_id,
            name=name,
            prefix=prefix,
            secret_hash=key_hash(secret),
            read_only=read_only,
            created_at=utcnow(),
            expires_at=expires_at,
        )
        async with self._states.changing(owner_id) as s:
            s.add(key)
        await self._audit.record(
            AuditAction.API_KEY_CREATED,
            actor=_actor(principal),
            target_type="api_key",
            target_id=key.id,
            data={**_audit_data(key), "user_id": str(owner_id)},
        )
        return CreatedKey(key, secret)

    async def list(
        self, principal: Principal, *, user_id: str, requested_page_size: int, page_token: str
    ) -> KeyPage:
        """A page of the caller's keys (or a service account's), newest first."""
        violations = Violations()
        owner_id = self._owner_id(user_id, principal, violations)
        violations.raise_if_any()
        size = page_size(requested_page_size)
        cursor = decode_cursor(page_token)
        if owner_id != principal.user_id:
            await self._check_service_account(principal, owner_id, audit_refusal=False)
        query = (
            select(ApiKey)
            .where(ApiKey.user_id == owner_id)
            .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())
            .limit(size + 1)
        )
        if cursor is not None:
            query = query.where(tuple_(ApiKey.created_at, ApiKey.id) < (cursor.at, cursor.id))
        async with self._sessions() as s:
            keys = list((await s.scalars(query)).all())
        return KeyPage(*split_page(keys, size))

    async def revoke(self, principal: Principal, raw_key_id: str) -> ApiKey:
        """Revoke one of the caller's keys (or, for an administrator, a service account's);
        refused from the next call on. Anyone else's key is NOT_FOUND."""
        key_id = require_uuid(raw_key_id, field="api_key_id")
        async with self._sessions() as s:
            row = (
                await s.execute(
                    select(ApiKey.user_id, User.kind)
                    .join(User, User.id == ApiKey.user_id)
                    .where(ApiKey.id == key_id)
                )
            ).first()
        mine = row is not None and row.user_id == principal.user_id
        managed = row is not None and principal.is_admin and row.kind == SERVICE_KIND
        if row is None or not (mine or managed):
            if row is not None:
                await self._audit.record(
                    AuditAction.API_KEY_REVOKED,
                    actor=_actor(principal),
                    outcome=Outcome.FAILURE,
                    target_type="api_key",
                    target_id=key_id,
                    data={"reason": "not_owner"},
                )
            raise NotFound("API key not found", reason="API_KEY_NOT_FOUND")
        async with self._states.changing(row.user_id) as s:
            key = await s.get(ApiKey, key_id, with_for_update=True)
            if key is None:  # deleted meanwhile, with its owner
                raise NotFound("API key not found", reason="API_KEY_NOT_FOUND")
            already = key.revoked_at is not None
            if not already:
                key.revoked_at = utcnow()
        if not already:
            await self._audit.record(
                AuditAction.API_KEY_REVOKED,
                actor=_actor(principal),
                target_type="api_key",
                target_id=key.id,
                data=_audit_data(key),
            )
        return key

    @staticmethod
    def _owner_id(raw: str, principal: Principal, violations: Violations) -> uuid.UUID:
        if not raw:
            return principal.user_id
        parsed = parse_uuid(raw)
        if parsed is None:
            violations.add("user_id", "must be a UUID")
            return principal.user_id
        return parsed

    async def _check_service_account(
        self, principal: Principal, owner_id: uuid.UUID, *, audit_refusal: bool
    ) -> None:
        """Another account's keys: only an administrator's business, and only a service
        account's."""
        if not principal.is_admin:
            if audit_refusal:
                await self._audit.record(
                    AuditAction.API_KEY_CREATED,
                    actor=_actor(principal),
                    outcome=Outcome.FAILURE,
                    target_type="user",
                    target_id=owner_id,
                    data={"reason": "admin_required"},
                )
            raise PermissionDenied(
                "only administrators manage another account's keys", reason="ADMIN_REQUIRED"
            )
        async with self._sessions() as s:
            kind = await s.scalar(select(User.kind).where(User.id == owner_id))
        if kind is None:
            raise NotFound("user not found", reason="USER_NOT_FOUND")
        if kind != SERVICE_KIND:
            raise FailedPrecondition(
                "keys are made for another account only when it is a service account",
                reason="NOT_A_SERVICE_ACCOUNT",
            )


@dataclass(frozen=True)
class KeyEntry:
    """A key's row as read, with its owner's auth_version at that moment."""

    id: uuid.UUID
    user_id: uuid.UUID
    secret_hash: str
    read_only: bool
    expires_at: datetime | None
    revoked_at: datetime | None
    version: int


class KeyCredentials:
    """Turns a presented key into the principal it stands for now."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        states: AuthStates,
        *,
        max_entries: int = 100_000,
        flush_interval: float = 10.0,
    ) -> None:
        self._sessions = sessions
        self._states = states
        self._max_entries = max_entries
        self._flush_interval = flush_interval
        self._entries: OrderedDict[str, KeyEntry] = OrderedDict()
        self._noted: dict[uuid.UUID, datetime] = {}  # the last use noted per key
        self._unwritten: dict[uuid.UUID, datetime] = {}
        self._task: asyncio.Task[None] | None = None

    async def principal(self, key: str) -> Principal:
        """The caller `key` stands for; UNAUTHENTICATED for a wrong, unknown, revoked or
        expired key, or an owner no longer active."""
        prefix = key_prefix(key)
        if prefix is None:
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        cached = self._entries.get(prefix)
        state = await self._states.state(cached.user_id) if cached is not None else None
        if cached is not None and state is not None and state.version == cached.version:
            entry = cached
            self._entries.move_to_end(prefix)
        else:  # unknown here, or its owner changed since it was read (a revocation, ...)
            read = await self._read(prefix)
            if read is None:
                raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
            entry = read
            if state is None or cached is None or cached.user_id != entry.user_id:
                state = await self._states.state(entry.user_id)
        if not hmac.compare_digest(key_hash(key), entry.secret_hash):
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        if entry.revoked_at is not None:
            raise Unauthenticated("the API key was revoked", reason="API_KEY_REVOKED")
        now = utcnow()
        if entry.expires_at is not None and entry.expires_at <= now:
            raise Unauthenticated("the API key has expired", reason="API_KEY_EXPIRED")
        if state.status != "active":
            raise Unauthenticated(f"the account is {state.status}", reason="USER_NOT_ACTIVE")
        self._note_use(entry.id, now)
        return Principal(
            user_id=entry.user_id,
            role=state.role,
            version=state.version,
            key_id=entry.id,
            read_only=entry.read_only,
        )

    async def _read(self, prefix: str) -> KeyEntry | None:
        async with self._sessions() as s:
            row = (
                await s.execute(
                    select(ApiKey, User.auth_version)
                    .join(User, User.id == ApiKey.user_id)
                    .where(ApiKey.prefix == prefix)
                )
            ).first()
        if row is None:
            self._entries.pop(prefix, None)
            return None
        key: ApiKey = row[0]
        entry = KeyEntry(
            id=key.id,
            user_id=key.user_id,
            secret_hash=key.secret_hash,
            read_only=key.read_only,
            expires_at=key.expires_at,
            revoked_at=key.revoked_at,
            version=row[1],
        )
        self._entries[prefix] = entry
        self._entries.move_to_end(prefix)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
        return entry

    # --- last use, written off the request path ------------------------------------------

    def _note_use(self, key_id: uuid.UUID, now: datetime) -> None:
        noted = self._noted.get(key_id)
        if noted is not None and now - noted < LAST_USED_EVERY:
            return
        self._noted[key_id] = now
        self._unwritten[key_id] = now
        if len(self._noted) > self._max_entries:
            self._noted.clear()  # at worst one more write per key

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="api-key-last-used")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            await self.flush()

    async def flush(self) -> int:
        """Write the noted last uses; how many keys were written."""
        batch, self._unwritten = self._unwritten, {}
        if not batch:
            return 0
        try:
            async with self._sessions.begin() as s:
                for key_id, used_at in batch.items():
                    await s.execute(
                        update(ApiKey)
                        .where(ApiKey.id == key_id)
                        .values(last_used_at=used_at)
                        .execution_options(synchronize_session=False)
                    )
        except (SQLAlchemyError, OSError):
            log.warning("writing API keys' last use failed", exc_info=True)
            self._keep(batch)
            return 0
        except asyncio.CancelledError:  # stopping: the final flush writes them
            self._keep(batch)
            raise
        return len(batch)

    def _keep(self, batch: dict[uuid.UUID, datetime]) -> None:
        for key_id, used_at in batch.items():
            self._unwritten.setdefault(key_id, used_at)
