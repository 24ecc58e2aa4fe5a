"""API keys through the real server (issue 18, items 1 and 2): created, listed and revoked
over gRPC and REST (Envoy), presented as `authorization: Bearer` on the one credential path
as tokens, with read-only keys, revocation and expiry effective on the next call, a
disabled owner refused at once, keys of service accounts managed by administrators, rate
limits charged to the owner, and the secret never in logs, metrics, usage events or the
audit trail."""

import asyncio
import logging
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from a2a.types import a2a_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_pb2
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from google.protobuf import text_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update

from server.access import READ_ONLY_RPCS, RPC_ACCESS, TOKEN_ONLY_RPCS, Access, KeyUse, key_use
from server.main import Application
from services.audit.models import AuditRecord
from services.auth.models import ApiKey, User
from services.auth.principal import Role
from services.db import utcnow
from services.usage_events.models import Event
from tests.attack import bearer, contract_methods, error_info_of, invoke, method_path
from tests.backends import Database
from tests.fake_llm import FakeLlm, Script
from tests.harness import (
    PASSWORD,
    Account,
    Stubs,
    new_admin,
    new_user,
    running_app,
    unique_email,
)
from tests.langfuse_recorder import serving, span_attributes
from tests.limited import limited_app
from tests.rpc_errors import error_info, field_violations, quota_violations

# The agent over A2A (issue 22) is in the access table too: a2a-sdk's descriptors.
A2A = a2a_pb2.DESCRIPTOR.services_by_name["A2AService"].methods
METHODS = {method_path(m): m for m in [*contract_methods(), *A2A]}
ME = users_pb.GetCurrentUserRequest()


async def create_key(
    stubs: Stubs, account: Account, name: str = "ci", **fields: Any
) -> keys_pb.CreateApiKeyResponse:
    response: keys_pb.CreateApiKeyResponse = await stubs.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name=name, **fields), metadata=account.metadata
    )
    return response


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    assert error_info(caught.value).reason == reason, error_info(caught.value)
    return caught.value


async def me_with(stubs: Stubs, key: str) -> user_pb2.User:
    response = await stubs.users.GetCurrentUser(ME, metadata=bearer(key))
    return response.user


async def set_user(app: Application, user_id: str, **values: Any) -> None:
    """Change who may act as an account the way every such change does (AuthStates)."""
    uid = uuid.UUID(user_id)
    async with app.domain.auth_states.changing(uid) as s:
        await s.execute(update(User).where(User.id == uid).values(**values))


async def service_account(app: Application, role: Role = Role.USER) -> str:
    """A service account as an administrator's CreateUser makes it: no password."""
    user = User(email=unique_email("svc"), full_name="Robot", password_hash=None, kind="service")
    user.role = role
    async with app.domain.sessions.begin() as s:
        s.add(user)
    return str(user.id)


# --- the credential ---------------------------------------------------------------------


async def test_a_key_acts_as_its_owner_over_grpc_and_rest(
    app: Application, stubs: Stubs, rest: aiohttp.ClientSession
) -> None:
    owner = await new_user(stubs, "keyed")
    created = await create_key(stubs, owner, "deploy bot")
    secret, key = created.secret, created.api_key
    assert secret.startswith(f"am_{key.prefix}_") and len(key.prefix) == 8
    assert key.name == "deploy bot" and key.user_id == owner.user_id and not key.read_only
    assert (await me_with(stubs, secret)).user_id == owner.user_id

    async with rest.get("/v1/users/me", headers={"authorization": f"Bearer {secret}"}) as r:
        assert r.status == 200 and (await r.json())["user"]["user_id"] == owner.user_id
    headers = {"authorization": f"Bearer {owner.access_token}"}
    async with rest.post(
        "/v1/api-keys", json={"name": "from rest", "read_only": True}, headers=headers
    ) as r:
        body = await r.json()
        assert r.status == 200, body
        assert body["api_key"]["read_only"] is True and body["secret"].startswith("am_")
    async with rest.get("/v1/api-keys", headers=headers) as r:
        listed = await r.json()
        assert r.status == 200 and "secret" not in str(listed)
        assert {k["name"] for k in listed["api_keys"]} == {"deploy bot", "from rest"}
    async with rest.delete(f"/v1/api-keys/{key.api_key_id}", headers=headers) as r:
        assert r.status == 200 and (await r.json())["api_key"]["revoked_at"]
    async with rest.get("/v1/users/me", headers={"authorization": f"Bearer {secret}"}) as r:
        assert r.status == 401


async def test_a_listing_shows_the_prefix_and_last_use_never_the_secret(
    app: Application, stubs: Stubs
) -> None:
    owner = await new_user(stubs, "lister")
    created = [await create_key(stubs, owner, f"key {i}") for i in range(3)]
    await me_with(stubs, created[0].secret)
    await app.domain.api_keys.credentials.flush()  # the background writer's job, now

    first = await stubs.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(page_size=2), metadata=owner.metadata
    )
    rest = await stubs.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(page_size=2, page_token=first.next_page_token),
        metadata=owner.metadata,
    )
    assert first.next_page_token and not rest.next_page_token
    listed = [*first.api_keys, *rest.api_keys]
    assert [k.name for k in listed] == ["key 2", "key 1", "key 0"]  # newest first
    shown = text_format.MessageToString(first) + text_format.MessageToString(rest)
    for made in created:
        assert made.secret not in shown and made.secret.split("_", 2)[2] not in shown
        assert made.api_key.prefix in shown
    used = {k.name: k.HasField("last_used_at") for k in listed}
    assert used == {"key 0": True, "key 1": False, "key 2": False}


async def test_bad_requests_are_invalid_argument_with_field_violations(stubs: Stubs) -> None:
    owner = await new_user(stubs, "badkeys")
    past = Timestamp()
    past.FromDatetime(datetime.now(UTC) - timedelta(minutes=1))
    for fields, field in (
        ({"name": "  "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"name": "late", "expires_at": past}, "expires_at"),
        ({"name": "other", "user_id": "not-a-uuid"}, "user_id"),
    ):
        error = await refused(
            stubs.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(**fields), metadata=owner.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
        )
        assert field in field_violations(error), (fields, field_violations(error))
    error = await refused(
        stubs.keys.RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(api_key_id="nope"), metadata=owner.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert "api_key_id" in field_violations(error)
    listed = await stubs.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=owner.metadata)
    assert not listed.api_keys  # nothing half-made


async def test_an_unknown_or_wrong_key_is_unauthenticated_alike(stubs: Stubs) -> None:
    owner = await new_user(stubs, "wrong")
    secret = (await create_key(stubs, owner)).secret
    prefix = secret[: len("am_") + 8]
    for bad in (
        prefix + "_" + "A" * 43,  # the right prefix, another secret
        "am_ZZZZZZZZ_" + "A" * 43,  # no such prefix
        "am_short",
        secret + "x",
    ):
        await refused(
            stubs.users.GetCurrentUser(ME, metadata=bearer(bad)),
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_INVALID",
        )
    assert (await me_with(stubs, secret)).user_id == owner.user_id


async def test_a_revoked_key_is_refused_on_the_next_call(app: Application, stubs: Stubs) -> None:
    owner = await new_user(stubs, "revoker")
    created = await create_key(stubs, owner)
    kept = await create_key(stubs, owner, "kept")
    await me_with(stubs, created.secret)  # cached in the process now
    revoked = await stubs.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id),
        metadata=owner.metadata,
    )
    assert revoked.api_key.HasField("revoked_at")
    await refused(
        stubs.users.GetCurrentUser(ME, metadata=bearer(created.secret)),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_REVOKED",
    )
    again = await stubs.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id),
        metadata=owner.metadata,
    )
    assert again.api_key.revoked_at == revoked.api_key.revoked_at
    assert (await me_with(stubs, kept.secret)).user_id == owner.user_id
    async with app.domain.sessions() as s:
        actions = (
            await s.execute(
                select(AuditRecord.action, AuditRecord.outcome, AuditRecord.data).where(
                    AuditRecord.target_id == created.api_key.api_key_id
                )
            )
        ).all()
    assert sorted((a, o) for a, o, _ in actions) == [
        ("api_key_created", "success"),
        ("api_key_revoked", "success"),
    ]
    assert all(d["prefix"] == created.api_key.prefix for _, _, d in actions)


async def test_an_expired_key_is_refused(stubs: Stubs) -> None:
    owner = await new_user(stubs, "expiring")
    soon = Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1.5))
    created = await create_key(stubs, owner, expires_at=soon)
    assert created.api_key.expires_at == soon
    assert (await me_with(stubs, created.secret)).user_id == owner.user_id
    await asyncio.sleep(1.6)
    await refused(
        stubs.users.GetCurrentUser(ME, metadata=bearer(created.secret)),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_EXPIRED",
    )


# --- what a key may do ------------------------------------------------------------------


def test_every_rpc_is_classified_for_keys() -> None:
    methods = set(RPC_ACCESS)
    assert methods >= READ_ONLY_RPCS and methods >= TOKEN_ONLY_RPCS
    assert not READ_ONLY_RPCS & TOKEN_ONLY_RPCS
    for path in RPC_ACCESS:
        name = path.rsplit("/", 1)[1]
        reads = name.startswith(("Get", "List", "Search", "Export")) or name == "AttachRun"
        assert (key_use(path) is KeyUse.READ) == reads, f"{path}: read or write?"


def _writes() -> list[str]:
    return sorted(
        path
        for path, access in RPC_ACCESS.items()
        if access in (Access.USER, Access.ADMIN) and key_use(path) is not KeyUse.READ
    )


async def test_a_read_only_key_never_writes(app: Application, stubs: Stubs) -> None:
    owner = await new_user(stubs, "reader")
    await set_user(app, owner.user_id, role=Role.ADMIN)  # the admin writes are refused too
    secret = (await create_key(stubs, owner, read_only=True)).secret
    assert _writes()
    for path in _writes():
        method = METHODS[path]
        outcome = await invoke(stubs.channel, method, b"", bearer(secret))
        info = error_info_of(outcome)
        expected = "API_KEY_NOT_ALLOWED" if path in TOKEN_ONLY_RPCS else "API_KEY_READ_ONLY"
        assert outcome.code == grpc.StatusCode.PERMISSION_DENIED, f"{path}: {outcome}"
        assert info is not None and info.reason == expected, f"{path}: {info}"
    # A real write, not only an empty one, and it changed nothing.
    await refused(
        stubs.users.UpdateCurrentUser(
            users_pb.UpdateCurrentUserRequest(user=user_pb2.User(full_name="Changed")),
            metadata=bearer(secret),
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_READ_ONLY",
    )
    me = await me_with(stubs, secret)
    assert me.full_name != "Changed"
    # Reads work: none is refused for the key's sake.
    for path in sorted(READ_ONLY_RPCS):
        if RPC_ACCESS[path] in (Access.USER, Access.ADMIN):
            outcome = await invoke(stubs.channel, METHODS[path], b"", bearer(secret))
            assert outcome.code not in (
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAUTHENTICATED,
            ), f"{path}: {outcome}"
    listed = await stubs.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=bearer(secret))
    assert len(listed.api_keys) == 1


async def test_a_key_cannot_manage_keys_or_the_password(stubs: Stubs) -> None:
    owner = await new_user(stubs, "nomanage")
    created = await create_key(stubs, owner)
    key = bearer(created.secret)
    await refused(
        stubs.keys.CreateApiKey(keys_pb.CreateApiKeyRequest(name="child"), metadata=key),
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_NOT_ALLOWED",
    )
    await refused(
        stubs.keys.RevokeApiKey(
            keys_pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id), metadata=key
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_NOT_ALLOWED",
    )
    await refused(
        stubs.auth.ChangePassword(
            auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password="y" * 16),
            metadata=key,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "API_KEY_NOT_ALLOWED",
    )
    listed = await stubs.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=key)
    assert [k.api_key_id for k in listed.api_keys] == [created.api_key.api_key_id]
    assert not listed.api_keys[0].HasField("revoked_at")


async def test_a_disabled_owner_and_a_demotion_apply_on_the_next_call(
    app: Application, stubs: Stubs
) -> None:
    owner = await new_user(stubs, "disabled")
    await set_user(app, owner.user_id, role=Role.ADMIN)
    secret = (await create_key(stubs, owner)).secret
    await stubs.users.ListUsers(users_pb.ListUsersRequest(page_size=1), metadata=bearer(secret))
    await set_user(app, owner.user_id, role=Role.USER)
    await refused(
        stubs.users.ListUsers(users_pb.ListUsersRequest(page_size=1), metadata=bearer(secret)),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    await set_user(app, owner.user_id, disabled_at=utcnow())
    await refused(
        stubs.users.GetCurrentUser(ME, metadata=bearer(secret)),
        grpc.StatusCode.UNAUTHENTICATED,
        "USER_NOT_ACTIVE",
    )
    await set_user(app, owner.user_id, disabled_at=None)
    assert (await me_with(stubs, secret)).user_id == owner.user_id


# --- whose keys -------------------------------------------------------------------------


async def test_no_one_reaches_another_users_keys(app: Application, stubs: Stubs) -> None:
    owner, intruder = await new_user(stubs, "owner"), await new_user(stubs, "intruder")
    admin = await new_admin(app, stubs)
    created = await create_key(stubs, owner)
    key_id = created.api_key.api_key_id
    for account in (intruder, admin):  # an administrator manages service accounts' only
        theirs = await refused(
            stubs.keys.RevokeApiKey(
                keys_pb.RevokeApiKeyRequest(api_key_id=key_id), metadata=account.metadata
            ),
            grpc.StatusCode.NOT_FOUND,
            "API_KEY_NOT_FOUND",
        )
        ghost = await refused(
            stubs.keys.RevokeApiKey(
                keys_pb.RevokeApiKeyRequest(api_key_id=str(uuid.uuid4())),
                metadata=account.metadata,
            ),
            grpc.StatusCode.NOT_FOUND,
            "API_KEY_NOT_FOUND",
        )
        assert theirs.details() == ghost.details()
    for request in (
        keys_pb.CreateApiKeyRequest(name="for them", user_id=owner.user_id),
        keys_pb.CreateApiKeyRequest(name="for nobody", user_id=str(uuid.uuid4())),
    ):
        await refused(
            stubs.keys.CreateApiKey(request, metadata=intruder.metadata),
            grpc.StatusCode.PERMISSION_DENIED,
            "ADMIN_REQUIRED",
        )
    await refused(
        stubs.keys.ListApiKeys(
            keys_pb.ListApiKeysRequest(user_id=owner.user_id), metadata=intruder.metadata
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    await refused(
        stubs.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="person", user_id=owner.user_id),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_A_SERVICE_ACCOUNT",
    )
    mine = await stubs.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=intruder.metadata)
    assert not mine.api_keys
    assert (await me_with(stubs, created.secret)).user_id == owner.user_id


async def test_an_administrator_manages_a_service_accounts_keys(
    app: Application, stubs: Stubs
) -> None:
    admin = await new_admin(app, stubs)
    robot = await service_account(app)
    created = await create_key(stubs, admin, "robot key", user_id=robot)
    assert created.api_key.user_id == robot
    assert (await me_with(stubs, created.secret)).user_id == robot
    # It acts under its own role: a user's.
    await refused(
        stubs.users.ListUsers(users_pb.ListUsersRequest(), metadata=bearer(created.secret)),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    listed = await stubs.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(user_id=robot), metadata=admin.metadata
    )
    assert [k.api_key_id for k in listed.api_keys] == [created.api_key.api_key_id]
    own = await stubs.keys.ListApiKeys(keys_pb.ListApiKeysRequest(), metadata=admin.metadata)
    assert created.api_key.api_key_id not in {k.api_key_id for k in own.api_keys}
    await stubs.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id),
        metadata=admin.metadata,
    )
    await refused(
        stubs.users.GetCurrentUser(ME, metadata=bearer(created.secret)),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_REVOKED",
    )
    await refused(
        stubs.keys.CreateApiKey(
            keys_pb.CreateApiKeyRequest(name="nobody", user_id=str(uuid.uuid4())),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )


# --- charged to the owner, and never shown --------------------------------------------


async def test_a_keys_calls_count_against_its_owners_rate_limit(tmp_path: Path) -> None:
    async with limited_app(tmp_path, rate_limit_per_user=6) as (_, stubs):
        owner = await new_user(stubs, "limited")
        secret = (await create_key(stubs, owner)).secret  # the owner's first call
        for _ in range(2):  # four more, by token and by key in turn
            await stubs.users.GetCurrentUser(ME, metadata=owner.metadata)
            await me_with(stubs, secret)
        await me_with(stubs, secret)  # the sixth: the limit
        error = await refused(
            stubs.users.GetCurrentUser(ME, metadata=bearer(secret)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )
        assert [subject for subject, _ in quota_violations(error)] == [f"user:{owner.user_id}"]
        await refused(
            stubs.users.GetCurrentUser(ME, metadata=owner.metadata),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED",
        )


async def _metrics(app: Application) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        return await response.text()


async def test_the_secret_is_never_logged_counted_or_recorded(
    app: Application, stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    owner = await new_user(stubs, "secretive")
    with caplog.at_level(logging.DEBUG):
        created = await create_key(stubs, owner)
        secret, key_id = created.secret, created.api_key.api_key_id
        await me_with(stubs, secret)
        wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
        await refused(
            stubs.users.GetCurrentUser(ME, metadata=bearer(wrong)),
            grpc.StatusCode.UNAUTHENTICATED,
            "API_KEY_INVALID",
        )
        await app.domain.events.flush()
        await app.domain.api_keys.credentials.flush()
    hidden: list[str] = [secret, secret.split("_", 2)[2], wrong.split("_", 2)[2]]
    logged = caplog.text + "\n".join(repr(vars(r)) for r in caplog.records)
    metrics = await _metrics(app)
    async with app.domain.sessions() as s:
        events = (
            await s.scalars(
                select(Event).where(Event.user_id == uuid.UUID(owner.user_id), Event.kind == "rpc")
            )
        ).all()
        audit = (await s.scalars(select(AuditRecord).where(AuditRecord.target_id == key_id))).all()
        stored = await s.scalar(select(ApiKey.secret_hash).where(ApiKey.id == uuid.UUID(key_id)))
    keyed = [e for e in events if e.data and e.data.get("key_id") == key_id]
    assert [e.rpc for e in keyed] == ["/agentmesh.auth.v1.UserService/GetCurrentUser"]
    recorded = repr([vars(e) for e in events]) + repr([vars(a) for a in audit]) + str(stored)
    assert audit and stored and len(stored) == 64

    def show(text: str) -> bool:
        return any(h in text for h in hidden)

    assert not show(logged), "a key's secret reached the log"
    assert not show(metrics) and key_id not in metrics, "a key reached /metrics"
    assert not show(recorded), "a key's secret was stored"


async def test_a_key_survives_the_owners_token_sign_out(stubs: Stubs) -> None:
    """A key is its own credential: signing a session out leaves it working."""
    owner = await new_user(stubs, "signout")
    secret = (await create_key(stubs, owner)).secret
    await stubs.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=owner.refresh_token), metadata=owner.metadata
    )
    assert (await me_with(stubs, secret)).user_id == owner.user_id


async def test_a_keys_agent_run_is_traced_without_its_secret(
    database: Database, llm: FakeLlm, tmp_path: Path
) -> None:
    with serving() as langfuse:
        async with running_app(
            database.url,
            tmp_path,
            llm_base_url=llm.base_url,
            llm_model="scripted-model",
            llm_max_retries=0,
            intent_confidence=1.01,
            langfuse_host=langfuse.url,
            langfuse_public_key="pk-test",
            langfuse_secret_key="sk-test",
        ) as (_, stubs):
            llm.reset(Script(intent="general", answer="Hello."))
            owner = await new_user(stubs, "traced")
            secret = (await create_key(stubs, owner)).secret
            reply = await stubs.agent.Query(
                agent_pb.QueryRequest(query="Say hello."), metadata=bearer(secret)
            )
        spans = langfuse.spans()  # stopping the application flushed the tracer
    assert spans and reply.run_id
    assert all(span_attributes(s)["user.id"] == owner.user_id for s in spans)
    exported = b"".join(export.request.SerializeToString() for export in langfuse.exports)
    assert secret.encode() not in exported
    assert secret.split("_", 2)[2].encode() not in exported
