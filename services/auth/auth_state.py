"""Who may act as an account right now, checked on every authenticated call.

Access tokens are verified without the database, so on its own a token would outlive its
account. Each call therefore also reads the account's *auth state*: whether it still exists
and is enabled, its current role, and the sessions (refresh-token families) revoked within
the last access-token lifetime, whose access tokens name them in their `sid` claim.

The database holds the truth (the `users` row and `refresh_tokens.revoked_at`), so a
revocation survives any restart. A copy is cached, in Redis when it is configured (shared
by every replica) and in this process otherwise, for `ttl` seconds. Every change goes
through `AuthStates.changing`, which raises `users.auth_version` in the same transaction
and, after the commit, writes the new state over the cached one: the next call in every
replica sharing the cache sees it. Copies are ordered by that version: a cache fill that
read the database just before a change can never overwrite the state the change wrote, nor
can two changes committed in one order be cached in the other. A deleted account's state
outranks every version.

Without Redis, another process on the same database sees a change only when its own copy
expires (`ttl`); `ttl` 0 reads the database on every call.

When Redis fails, states are read from the database. A change made meanwhile could not
overwrite the copy cached before the outage, so after a Redis failure a process trusts no
copy for `ttl` (by then every copy older than the failure has expired), and the process
that made the change writes it again as soon as Redis answers.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.auth.models import RefreshToken, User
from services.auth.principal import Principal, Role
from services.auth.tokens import AccessClaims
from services.db import utcnow
from services.errors import Unauthenticated

log = logging.getLogger("agentmesh.auth")

Status = Literal["active", "disabled", "deleted"]
# Above every version a row can reach: a deleted account stays deleted in every cache.
DELETED_VERSION = 2**53 - 1
WARN_EVERY_SECONDS = 30.0
MAX_UNWRITTEN = 10_000


@dataclass(frozen=True)
class AuthState:
    """What an account's access tokens may do now; `version` orders copies of it."""

    version: int
    status: Status
    role: Role = Role.USER
    revoked_sessions: frozenset[uuid.UUID] = field(default_factory=frozenset)

    def encode(self) -> bytes:
        """`<version>|<json>`: the version first, where the Redis script can read it."""
        body = {
            "status": self.status,
            "role": self.role.value,
            "revoked": sorted(str(s) for s in self.revoked_sessions),
        }
        return f"{self.version}|{json.dumps(body, separators=(',', ':'))}".encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> "AuthState":
        version, _, body = (raw.decode() if isinstance(raw, bytes) else raw).partition("|")
        fields = json.loads(body)
        return cls(
            version=int(version),
            status=fields["status"],
            role=Role(fields["role"]),
            revoked_sessions=frozenset(uuid.UUID(s) for s in fields["revoked"]),
        )


DELETED = AuthState(DELETED_VERSION, "deleted")


async def load_state(s: AsyncSession, user_id: uuid.UUID, *, window: timedelta) -> AuthState:
    """The account's auth state as the database has it (sessions revoked within `window`)."""
    row = (
        await s.execute(
            select(User.role, User.disabled_at, User.auth_version).where(User.id == user_id)
        )
    ).first()
    if row is None:
        return DELETED
    revoked = await s.scalars(
        select(RefreshToken.family_id)
        .where(RefreshToken.user_id == user_id, RefreshToken.revoked_at >= utcnow() - window)
        .distinct()
    )
    return AuthState(
        version=row.auth_version,
        status="active" if row.disabled_at is None else "disabled",
        role=row.role,
        revoked_sessions=frozenset(revoked),
    )


class StateCache(Protocol):
    hits: int
    misses: int

    async def get(self, user_id: uuid.UUID) -> AuthState | None:
        """The cached state, or None (missing, expired, or the cache unreachable)."""
        ...

    async def offer(self, user_id: uuid.UUID, state: AuthState) -> None:
        """Cache `state` unless a copy with a higher version is cached."""
        ...


class InProcessStateCache:
    """States in this process's memory, the least recently used dropped past `max_entries`."""

    def __init__(
        self, ttl: float, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[uuid.UUID, tuple[AuthState, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def get(self, user_id: uuid.UUID) -> AuthState | None:
        entry = self._entries.get(user_id)
        if entry is None or entry[1] <= self._clock():
            self.misses += 1
            return None
        self._entries.move_to_end(user_id)
        self.hits += 1
        return entry[0]

    async def offer(self, user_id: uuid.UUID, state: AuthState) -> None:
        current = self._entries.get(user_id)
        if current is not None and current[0].version > state.version:
            return
        self._entries[user_id] = (state, self._clock() + self._ttl)
        self._entries.move_to_end(user_id)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


# KEYS[1]: the account's key. ARGV: the offered version, the encoded state, the TTL (ms).
# Atomic compare-and-set: a cached copy with a higher version stays.
_OFFER_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
  local stored = tonumber(string.match(current, '^(%d+)|'))
  if stored and stored > tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


class RedisStateCache:
    """States shared by every replica, under `prefix` in Redis, expired by Redis itself.
    A Redis failure is a miss (the database answers) or a delayed write, never an error."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        ttl: float,
        *,
        timeout: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis
        self._offer = redis.register_script(_OFFER_LUA)
        self._prefix = prefix
        self._ttl_ms = max(1, round(ttl * 1000))
        self._timeout = timeout
        self._clock = clock
        self._ttl = ttl
        self._last_warning: float | None = None
        # Until then copies may predate a change whose write failed: the database answers.
        self._distrust_until = 0.0
        # Writes that failed, written again with the next one that reaches Redis.
        self._unwritten: OrderedDict[uuid.UUID, tuple[AuthState, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    async def get(self, user_id: uuid.UUID) -> AuthState | None:
        if self._clock() < self._distrust_until:
            self.misses += 1
            return None
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._redis.get(self._prefix + str(user_id))
        except (RedisError, OSError) as error:  # TimeoutError is an OSError
            self._failed("read", error)
            raw = None
        try:
            state = None if raw is None else AuthState.decode(raw)
        except (ValueError, KeyError, TypeError):  # not written by this version: ask again
            state = None
        if state is None:
            self.misses += 1
            return None
        self.hits += 1
        return state

    async def offer(self, user_id: uuid.UUID, state: AuthState) -> None:
        self._keep(user_id, state, self._clock())
        try:
            async with asyncio.timeout(self._timeout):
                while self._unwritten:
                    key, (pending, since) = self._unwritten.popitem(last=False)
                    if self._clock() - since > self._ttl:
                        continue  # every copy it was meant to replace has expired
                    try:
                        await self._offer(
                            keys=[self._prefix + str(key)],
                            args=[pending.version, pending.encode(), self._ttl_ms],
                        )
                    except BaseException:
                        self._keep(key, pending, since)
                        raise
        except (RedisError, OSError) as error:
            self._failed("write", error)

    def _keep(self, user_id: uuid.UUID, state: AuthState, since: float) -> None:
        kept = self._unwritten.get(user_id)
        if kept is None or kept[0].version <= state.version:
            self._unwritten[user_id] = (state, since)
        while len(self._unwritten) > MAX_UNWRITTEN:
            self._unwritten.popitem(last=False)

    def _failed(self, what: str, error: Exception) -> None:
        now = self._clock()
        self._distrust_until = now + self._ttl
        if self._last_warning is None or now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning(
                "auth state cache %s failed, using the database: %s: %s",
                what,
                type(error).__name__,
                error,
            )


class AuthStates:
    """Checks access tokens against their account's current state, and publishes changes.

    `window` is how long after its session is revoked an access token may still be
    presented: the access-token lifetime plus room for clock skew.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        cache: StateCache | None,
        *,
        window: timedelta,
    ) -> None:
        self._sessions = sessions
        self.cache = cache  # None: the database answers every call
        self._window = window

    async def principal(self, claims: AccessClaims) -> Principal:
        """The caller an access token stands for now; UNAUTHENTICATED once its account is
        deleted or disabled, or its session revoked. The role is the account's current one."""
        state = await self.state(claims.user_id)
        if state.status != "active":
            raise Unauthenticated(f"the account is {state.status}", reason="USER_NOT_ACTIVE")
        if claims.session_id is not None and claims.session_id in state.revoked_sessions:
            raise Unauthenticated("the session was signed out", reason="TOKEN_REVOKED")
        return Principal(user_id=claims.user_id, role=state.role, version=state.version)

    async def state(self, user_id: uuid.UUID) -> AuthState:
        if self.cache is not None and (cached := await self.cache.get(user_id)) is not None:
            return cached
        async with self._sessions() as s:
            state = await load_state(s, user_id, window=self._window)
        if self.cache is not None:
            await self.cache.offer(user_id, state)
        return state

    @contextlib.asynccontextmanager
    async def changing(self, user_id: uuid.UUID) -> AsyncIterator[AsyncSession]:
        """A transaction that changes who may act as `user_id` (role, disabling, revoked
        sessions, deletion); once it commits, every replica sees the change on its next call."""
        async with self._sessions.begin() as s:
            yield s
            await s.execute(
                update(User)
                .where(User.id == user_id)
                # Naming updated_at keeps its onupdate: a sign-out is not a profile change.
                .values(auth_version=User.auth_version + 1, updated_at=User.updated_at)
                .execution_options(synchronize_session=False)
            )
            state = await load_state(s, user_id, window=self._window)
        if self.cache is not None:
            await self.cache.offer(user_id, state)
