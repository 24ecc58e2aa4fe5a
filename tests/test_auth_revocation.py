"""Tokens stop at once when their account or session does (services/auth/auth_state.py):
a deleted or disabled account, a signed-out session, a changed role apply on the next call,
on both databases, in every replica sharing Redis (and through a Redis outage), and after a
restart."""

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from google.protobuf import field_mask_pb2
from redis.asyncio import Redis
from sqlalchemy import update

from server.main import Application
from services.auth.auth_state import (
    DELETED,
    AuthState,
    InProcessStateCache,
    RedisStateCache,
)
from services.auth.models import User
from services.auth.principal import Role
from services.db import utcnow
from tests.backends import Database
from tests.harness import Account, Stubs, login, new_admin, new_user, running_app
from tests.knowledge import upload
from tests.limited import REDIS_URL, redis_up
from tests.rpc_errors import error_info
from tests.tcp_proxy import TcpProxy

INDEX_TOKEN = "auth-revocation-" + "t" * 32


async def me(stubs: Stubs, account: Account) -> users_pb.GetCurrentUserResponse:
    return await stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(), metadata=account.metadata
    )


async def refused(call: object, reason: str) -> grpc.aio.AioRpcError:
    """The UNAUTHENTICATED error `call` fails with, checked to carry `reason`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, caught.value.details()
    assert error_info(caught.value).reason == reason
    return caught.value


async def refresh(stubs: Stubs, account: Account) -> auth_pb.RefreshTokenResponse:
    request = auth_pb.RefreshTokenRequest(refresh_token=account.refresh_token)
    response: auth_pb.RefreshTokenResponse = await stubs.auth.RefreshToken(request)
    return response


async def delete(stubs: Stubs, admin: Account, account: Account) -> None:
    await stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=account.user_id), metadata=admin.metadata
    )


async def set_role(stubs: Stubs, admin: Account, account: Account, role: int) -> None:
    await stubs.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=user_pb.User(user_id=account.user_id, role=role),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=admin.metadata,
    )


async def set_disabled(app: Application, account: Account, disabled: bool) -> None:
    """What issue 18's admin RPC will do: flag the row and publish the account's state."""
    user_id = uuid.UUID(account.user_id)
    async with app.domain.auth_states.changing(user_id) as s:
        await s.execute(
            update(User)
            .where(User.id == user_id)
            .values(disabled_at=utcnow() if disabled else None)
        )


async def test_a_deleted_users_tokens_are_refused_at_once(app: Application, stubs: Stubs) -> None:
    admin, user = await new_admin(app, stubs), await new_user(stubs, "deleted")
    await upload(stubs, user, "before.txt", b"Written while the account existed.")
    await delete(stubs, admin, user)

    # Not INTERNAL on the documents' foreign key: the call never reaches the handler.
    await refused(
        upload(stubs, user, "after.txt", b"Written after it was deleted."), "USER_NOT_ACTIVE"
    )
    await refused(me(stubs, user), "USER_NOT_ACTIVE")
    await refused(refresh(stubs, user), "TOKEN_REVOKED")
    await refused(login(stubs, user.email), "INVALID_CREDENTIALS")


async def test_a_disabled_account_is_refused_until_enabled(app: Application, stubs: Stubs) -> None:
    user = await new_user(stubs, "disabled")
    await set_disabled(app, user, True)
    await refused(me(stubs, user), "USER_NOT_ACTIVE")
    await refused(refresh(stubs, user), "USER_NOT_ACTIVE")
    await refused(login(stubs, user.email), "USER_NOT_ACTIVE")

    await set_disabled(app, user, False)  # its sessions were kept: they work again
    assert (await me(stubs, user)).user.user_id == user.user_id
    assert (await refresh(stubs, user)).access_token


async def test_a_role_change_applies_to_live_tokens(app: Application, stubs: Stubs) -> None:
    admin, user = await new_admin(app, stubs), await new_user(stubs, "promoted")
    listing = users_pb.ListUsersRequest(page_size=1)
    await set_role(stubs, admin, user, user_pb.ROLE_ADMIN)
    await stubs.users.ListUsers(listing, metadata=user.metadata)  # the same token, now admin
    await set_role(stubs, admin, user, user_pb.ROLE_USER)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.users.ListUsers(listing, metadata=user.metadata)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "ADMIN_REQUIRED"


async def rename(stubs: Stubs, account: Account, full_name: str) -> None:
    await stubs.users.UpdateCurrentUser(
        users_pb.UpdateCurrentUserRequest(
            user=user_pb.User(full_name=full_name),
            update_mask=field_mask_pb2.FieldMask(paths=["full_name"]),
        ),
        metadata=account.metadata,
    )


async def test_the_current_user_kept_in_memory_is_never_stale(
    app: Application, stubs: Stubs
) -> None:
    """GetCurrentUser answers from memory once warm (issue 17), and every change shows on
    the very next call: a rename, a role change, a password change."""
    admin, user = await new_admin(app, stubs), await new_user(stubs, "renamed")
    first = await me(stubs, user)
    assert await me(stubs, user) == first  # this answer comes from memory
    await rename(stubs, user, "First Name")
    assert (await me(stubs, user)).user.full_name == "First Name"
    await set_role(stubs, admin, user, user_pb.ROLE_ADMIN)
    assert (await me(stubs, user)).user.role == user_pb.ROLE_ADMIN
    await rename(stubs, user, "Second Name")
    current = (await me(stubs, user)).user
    assert (current.full_name, current.role) == ("Second Name", user_pb.ROLE_ADMIN)


async def test_signing_out_stops_that_sessions_access_tokens(stubs: Stubs) -> None:
    first = await new_user(stubs, "sessions")
    second = await login(stubs, first.email)
    rotated = await refresh(stubs, first)  # an older and a newer token of one session
    newer = Account(first.user_id, first.email, first.password, rotated.access_token, "")

    await stubs.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=rotated.refresh_token), metadata=newer.metadata
    )
    await refused(me(stubs, first), "TOKEN_REVOKED")
    await refused(me(stubs, newer), "TOKEN_REVOKED")
    assert (await me(stubs, second)).user.user_id == first.user_id  # the other session lives

    await stubs.auth.Logout(auth_pb.LogoutRequest(all_sessions=True), metadata=second.metadata)
    await refused(me(stubs, second), "TOKEN_REVOKED")


async def test_a_password_change_and_a_replayed_refresh_token_stop_access_tokens(
    stubs: Stubs,
) -> None:
    account = await new_user(stubs, "changed")
    other = await login(stubs, account.email)
    await stubs.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(
            current_password=account.password, new_password="a brand new passphrase"
        ),
        metadata=account.metadata,
    )
    await refused(me(stubs, account), "TOKEN_REVOKED")
    await refused(me(stubs, other), "TOKEN_REVOKED")

    fresh = await login(stubs, account.email, "a brand new passphrase")
    rotated = await refresh(stubs, fresh)
    await refused(refresh(stubs, fresh), "REFRESH_TOKEN_REUSED")  # a thief's replay
    newest = Account(fresh.user_id, fresh.email, fresh.password, rotated.access_token, "")
    await refused(me(stubs, newest), "TOKEN_REVOKED")


async def test_revocation_survives_a_restart(database: Database, tmp_path: Path) -> None:
    async with running_app(database.url, tmp_path / "data") as (app, stubs):
        admin = await new_admin(app, stubs)
        deleted, disabled = await new_user(stubs, "gone"), await new_user(stubs, "off")
        signed_out, kept = await new_user(stubs, "out"), await new_user(stubs, "kept")
        for account in (deleted, disabled, signed_out, kept):
            await me(stubs, account)  # cached as active before the changes
        await delete(stubs, admin, deleted)
        await set_disabled(app, disabled, True)
        await stubs.auth.Logout(
            auth_pb.LogoutRequest(refresh_token=signed_out.refresh_token),
            metadata=signed_out.metadata,
        )

    async with running_app(database.url, tmp_path / "data") as (_, stubs):
        await refused(me(stubs, deleted), "USER_NOT_ACTIVE")
        await refused(me(stubs, disabled), "USER_NOT_ACTIVE")
        await refused(me(stubs, signed_out), "TOKEN_REVOKED")
        assert (await me(stubs, kept)).user.user_id == kept.user_id


@pytest.fixture
async def postgres(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database("postgres", tmp_path / "db")
    await database.create()
    await database.migrate()
    yield database
    await database.drop()


@contextlib.asynccontextmanager
async def replicas(
    database: Database, tmp_path: Path, redis_url: str | None, **overrides: object
) -> AsyncIterator[tuple[Application, Stubs, Stubs]]:
    """Two processes over one database (and one Redis, when given): the first serves
    everything, the second accounts only (a deleted account's passages are purged by the
    first, the index owner)."""
    shared = {
        "redis_url": redis_url,
        "redis_key_prefix": f"agentmesh-test-{uuid.uuid4().hex}:",
        "index_token": INDEX_TOKEN,
        **overrides,
    }
    async with running_app(database.url, tmp_path / "a", **shared) as (first, first_stubs):
        target = f"127.0.0.1:{first.grpc_port}"
        async with running_app(
            database.url, tmp_path / "b", services=["auth", "users"], index_target=target, **shared
        ) as (_, second_stubs):
            yield first, first_stubs, second_stubs


async def test_every_replica_sharing_redis_refuses_at_once(
    postgres: Database, tmp_path: Path
) -> None:
    await redis_up()
    async with replicas(postgres, tmp_path, REDIS_URL) as (first, a, b):
        admin = await new_admin(first, a)
        doomed, leaving = await new_user(a, "doomed"), await new_user(a, "leaving")
        promoted = await new_user(a, "promoted")
        for account in (doomed, leaving, promoted):
            await me(b, account)  # the other replica has read (and cached) them as active
        listing = users_pb.ListUsersRequest(page_size=1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await b.users.ListUsers(listing, metadata=promoted.metadata)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        await delete(a, admin, doomed)
        await a.auth.Logout(
            auth_pb.LogoutRequest(refresh_token=leaving.refresh_token), metadata=leaving.metadata
        )
        await set_role(a, admin, promoted, user_pb.ROLE_ADMIN)

        await refused(me(b, doomed), "USER_NOT_ACTIVE")
        await refused(me(b, leaving), "TOKEN_REVOKED")
        await b.users.ListUsers(listing, metadata=promoted.metadata)


async def test_a_replica_sharing_redis_never_answers_a_stale_current_user(
    postgres: Database, tmp_path: Path
) -> None:
    await redis_up()
    async with replicas(postgres, tmp_path, REDIS_URL) as (_, a, b):
        user = await new_user(a, "traveller")
        first = await me(b, user)
        assert await me(b, user) == first  # b read the account, then answered from memory
        await rename(a, user, "Renamed Elsewhere")
        assert (await me(b, user)).user.full_name == "Renamed Elsewhere"


async def test_without_redis_a_replica_reads_the_database_when_told_to(
    postgres: Database, tmp_path: Path
) -> None:
    # No shared cache: AUTH_STATE_CACHE_SECONDS=0 makes every process read the database.
    async with replicas(postgres, tmp_path, None, auth_state_cache_seconds=0) as (first, a, b):
        admin, doomed = await new_admin(first, a), await new_user(a, "doomed")
        await me(b, doomed)
        await delete(a, admin, doomed)
        await refused(me(b, doomed), "USER_NOT_ACTIVE")


async def test_a_deletion_during_a_redis_outage_still_applies_everywhere(
    postgres: Database, tmp_path: Path
) -> None:
    await redis_up()
    parts = urlsplit(REDIS_URL)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    await proxy.start()
    prefix = f"agentmesh-test-{uuid.uuid4().hex}:"
    try:
        through = f"redis://127.0.0.1:{proxy.port}/0"
        async with replicas(postgres, tmp_path, through, redis_key_prefix=prefix) as (
            first,
            a,
            b,
        ):
            admin = await new_admin(first, a)
            seen, unseen = await new_user(a, "seen"), await new_user(a, "unseen")
            for account in (seen, unseen):
                await me(b, account)  # cached in Redis as active
            await proxy.stop()
            for account in (seen, unseen):
                await delete(a, admin, account)  # their writes to Redis fail
            await refused(me(b, seen), "USER_NOT_ACTIVE")  # the database answers
            await proxy.start()
            # The second replica saw Redis fail: it trusts no copy older than that.
            await refused(me(b, seen), "USER_NOT_ACTIVE")
            await me(a, admin)  # the first replica's next write repeats its failed ones
            # A replica that never saw the outage trusts Redis, which holds the deletions now.
            async with running_app(
                postgres.url,
                tmp_path / "c",
                services=["auth", "users"],
                index_target=f"127.0.0.1:{first.grpc_port}",
                index_token=INDEX_TOKEN,
                redis_url=through,
                redis_key_prefix=prefix,
            ) as (_, c):
                await refused(me(c, unseen), "USER_NOT_ACTIVE")
    finally:
        with contextlib.suppress(AssertionError):
            await proxy.stop()


@pytest.mark.parametrize("store", ["in_process", "redis"])
async def test_a_cached_state_is_never_replaced_by_an_older_one(store: str) -> None:
    client = None
    if store == "redis":
        await redis_up()
        client = Redis.from_url(REDIS_URL)
        cache: InProcessStateCache | RedisStateCache = RedisStateCache(
            client, f"agentmesh-test-{uuid.uuid4().hex}:", 30.0
        )
    else:
        cache = InProcessStateCache(30.0)
    try:
        user_id = uuid.uuid4()
        session = uuid.uuid4()
        changed = AuthState(5, "active", Role.ADMIN, frozenset({session}))
        await cache.offer(user_id, changed)
        # A fill that read the database before the change was committed comes too late.
        await cache.offer(user_id, AuthState(4, "active", Role.USER))
        assert await cache.get(user_id) == changed
        await cache.offer(user_id, DELETED)
        await cache.offer(user_id, AuthState(6, "active", Role.USER))
        assert await cache.get(user_id) == DELETED
    finally:
        if client is not None:
            await client.aclose()
