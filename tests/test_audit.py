"""The audit trail (issue 18 item 4): what the auth and knowledge services record, the
administrators' listing over gRPC and REST (through Envoy), and retention."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.audit.v1 import audit_pb2
from agentmesh.audit.v1 import audit_service_pb2 as audit_pb
from agentmesh.audit.v1 import audit_service_pb2_grpc as audit_grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import delete, insert, select

from server.main import Application
from services.audit.models import AuditRecord
from services.audit.retention import AuditRetention
from tests.harness import PASSWORD, Account, Stubs, new_admin, new_user, unique_email
from tests.knowledge import upload
from tests.rpc_errors import error_info, field_violations
from tests.test_rest import call, details_of

LIST = "/v1/audit/events"


def audit_stub(stubs: Stubs) -> audit_grpc.AuditServiceAsyncStub:
    return audit_grpc.AuditServiceStub(stubs.channel)


async def events(stubs: Stubs, admin: Account, **filters: Any) -> list[audit_pb2.AuditEvent]:
    """Every event the filters select, following the pages."""
    found: list[audit_pb2.AuditEvent] = []
    token = ""
    while True:
        page = await audit_stub(stubs).ListAuditEvents(
            audit_pb.ListAuditEventsRequest(page_token=token, **filters), metadata=admin.metadata
        )
        found += page.events
        token = page.next_page_token
        if not token:
            return found


def timestamp(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def test_login_success_and_failure_are_recorded_with_request_id_and_client_ip(
    app: Application, stubs: Stubs
) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs, "audited")
    ok_id, bad_id, ghost_id = (f"audit-{uuid.uuid4().hex}" for _ in range(3))
    await stubs.auth.Login(
        auth_pb.LoginRequest(email=user.email, password=PASSWORD),
        metadata=(("x-request-id", ok_id),),
    )
    for email, request_id in ((user.email, bad_id), (unique_email("nobody"), ghost_id)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.auth.Login(
                auth_pb.LoginRequest(email=email, password="not the password"),
                metadata=(("x-request-id", request_id),),
            )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    logins = await events(stubs, admin, actions=["login"], target_id=user.user_id)
    by_request = {e.request_id: e for e in logins}
    ok, bad = by_request[ok_id], by_request[bad_id]
    assert ok.outcome == audit_pb2.AUDIT_OUTCOME_SUCCESS
    assert ok.actor_id == ok.target_id == user.user_id and ok.target_type == "user"
    assert ok.client_ip == "127.0.0.1" and ok.actor_key_id == ""
    assert bad.outcome == audit_pb2.AUDIT_OUTCOME_FAILURE
    assert bad.actor_id == user.user_id and bad.client_ip == "127.0.0.1"
    assert dict(bad.data) == {"reason": "invalid_credentials"}

    # An unknown email: anonymous, no target, and the email itself is nowhere.
    failures = await events(
        stubs, admin, actions=["login"], outcome=audit_pb2.AUDIT_OUTCOME_FAILURE
    )
    ghost = next(e for e in failures if e.request_id == ghost_id)
    assert ghost.actor_id == "" and ghost.target_id == "" and ghost.client_ip == "127.0.0.1"
    assert dict(ghost.data) == {"reason": "invalid_credentials"}
    assert "nobody" not in str(ghost)


async def test_password_change_and_logout_are_recorded(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs, "changer")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stubs.auth.ChangePassword(
            auth_pb.ChangePasswordRequest(current_password="wrong", new_password="n" * 16),
            metadata=user.metadata,
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    new_password = f"fresh {uuid.uuid4().hex} pass"
    await stubs.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(current_password=PASSWORD, new_password=new_password),
        metadata=user.metadata,
    )
    changes = await events(stubs, admin, actions=["password_changed"], actor_id=user.user_id)
    assert [(e.outcome, dict(e.data)) for e in changes] == [
        (audit_pb2.AUDIT_OUTCOME_SUCCESS, {}),
        (audit_pb2.AUDIT_OUTCOME_FAILURE, {"reason": "wrong_password"}),
    ]
    assert all(e.target_id == user.user_id and e.request_id for e in changes)

    login = await stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password=new_password))
    await stubs.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=login.refresh_token),
        metadata=(("authorization", f"Bearer {login.access_token}"),),
    )
    [logout] = await events(stubs, admin, actions=["logout"], actor_id=user.user_id)
    assert logout.outcome == audit_pb2.AUDIT_OUTCOME_SUCCESS
    assert dict(logout.data) == {"all_sessions": False}

    # No row anywhere holds either password.
    async with app.domain.sessions() as s:
        rows = (await s.scalars(select(AuditRecord))).all()
    dumped = " ".join(
        repr({c.name: getattr(r, c.key) for c in AuditRecord.__table__.c}) for r in rows
    )
    assert user.user_id in dumped
    assert PASSWORD not in dumped and new_password not in dumped and "n" * 16 not in dumped


async def test_a_deleted_document_is_recorded(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    owner = await new_user(stubs, "deleter")
    uploaded = await upload(stubs, owner, "notes.txt", b"Some notes to delete again.")
    document_id = uploaded.document.document_id
    await stubs.kb.DeleteDocument(
        kb.DeleteDocumentRequest(document_id=document_id), metadata=owner.metadata
    )
    [deleted] = await events(stubs, admin, actions=["document_deleted"], target_id=document_id)
    assert deleted.actor_id == owner.user_id and deleted.target_type == "document"
    assert dict(deleted.data) == {"owner_id": owner.user_id}


async def _plant(app: Application, actor: uuid.UUID, times: list[datetime]) -> None:
    """Records of `actor` at `times` (role changes on a made-up target)."""
    rows = [
        {
            "occurred_at": at,
            "action": "role_changed",
            "outcome": "success",
            "actor_id": actor,
            "target_type": "user",
            "target_id": str(uuid.uuid4()),
            "data": {"n": n},
        }
        for n, at in enumerate(times)
    ]
    async with app.domain.sessions.begin() as s:
        await s.execute(insert(AuditRecord), rows)


async def test_filters_and_paging(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    actor = uuid.uuid4()
    now = datetime.now(UTC).replace(microsecond=0)
    # Seven records, two of them at the same instant (the id breaks the tie).
    times = [now - timedelta(minutes=m) for m in (1, 2, 3, 3, 4, 5, 6)]
    await _plant(app, actor, times)

    seen: list[audit_pb2.AuditEvent] = []
    token = ""
    pages = 0
    while True:
        page = await audit_stub(stubs).ListAuditEvents(
            audit_pb.ListAuditEventsRequest(actor_id=str(actor), page_size=2, page_token=token),
            metadata=admin.metadata,
        )
        assert len(page.events) <= 2
        seen += page.events
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 4 and len(seen) == 7 and len({e.id for e in seen}) == 7
    keys = [(e.time.ToDatetime(), e.id) for e in seen]
    assert keys == sorted(keys, reverse=True)  # newest first, every row once

    ranged = await events(
        stubs,
        admin,
        actor_id=str(actor),
        start_time=timestamp(now - timedelta(minutes=4)),
        end_time=timestamp(now - timedelta(minutes=2)),
    )
    assert sorted(e.data.fields["n"].number_value for e in ranged) == [
        2,
        3,
        4,
    ]  # 3, 3 and 4 minutes ago
    assert await events(stubs, admin, actor_id=str(actor), actions=["login"]) == []
    assert (
        len(await events(stubs, admin, actor_id=str(actor), actions=["login", "role_changed"])) == 7
    )
    failures = await events(
        stubs, admin, actor_id=str(actor), outcome=audit_pb2.AUDIT_OUTCOME_FAILURE
    )
    assert failures == []
    target = seen[0].target_id
    [one] = await events(stubs, admin, target_id=target)
    assert one.id == seen[0].id


@pytest.mark.parametrize(
    ("fields", "violated"),
    [
        ({"actions": ["login", "teleported"]}, "actions"),
        ({"actor_id": "not-a-uuid"}, "actor_id"),
        ({"target_id": "42"}, "target_id"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "garbage!"}, "page_token"),
        ({"outcome": 7}, "outcome"),
        (
            {
                "start_time": Timestamp(seconds=2_000_000_000),
                "end_time": Timestamp(seconds=1_000_000_000),
            },
            "end_time",
        ),
    ],
)
async def test_bad_filters_are_invalid_argument(
    app: Application, stubs: Stubs, fields: dict[str, Any], violated: str
) -> None:
    admin = await new_admin(app, stubs)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit_stub(stubs).ListAuditEvents(
            audit_pb.ListAuditEventsRequest(**fields), metadata=admin.metadata
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violated in field_violations(refused.value)


async def test_the_listing_is_for_administrators_only(app: Application, stubs: Stubs) -> None:
    user = await new_user(stubs, "curious")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await audit_stub(stubs).ListAuditEvents(
            audit_pb.ListAuditEventsRequest(actor_id=user.user_id), metadata=user.metadata
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(refused.value).reason == "ADMIN_REQUIRED"
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await audit_stub(stubs).ListAuditEvents(audit_pb.ListAuditEventsRequest())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_listing_over_rest(
    app: Application, stubs: Stubs, rest: aiohttp.ClientSession
) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs, "restaudit")
    status, body, _ = await call(
        rest, "GET", f"{LIST}?actor_id={user.user_id}", token=user.access_token
    )
    assert status == 403 and details_of(body, "ErrorInfo")["reason"] == "ADMIN_REQUIRED"

    actor = uuid.uuid4()
    now = datetime.now(UTC).replace(microsecond=0)
    await _plant(app, actor, [now - timedelta(seconds=s) for s in (10, 20, 30)])
    status, first, _ = await call(
        rest,
        "GET",
        f"{LIST}?actor_id={actor}&actions=role_changed&page_size=2",
        token=admin.access_token,
    )
    assert status == 200, first
    assert [e["data"]["n"] for e in first["events"]] == [0, 1]
    assert first["events"][0]["outcome"] == "AUDIT_OUTCOME_SUCCESS"
    assert first["events"][0]["actor_id"] == str(actor)
    status, second, _ = await call(
        rest,
        "GET",
        f"{LIST}?actor_id={actor}&page_size=2&page_token={first['next_page_token']}",
        token=admin.access_token,
    )
    assert status == 200 and [e["data"]["n"] for e in second["events"]] == [2]
    assert second["next_page_token"] == ""

    status, body, _ = await call(rest, "GET", f"{LIST}?actor_id=nope", token=admin.access_token)
    assert status == 400
    violations = details_of(body, "BadRequest")["field_violations"]
    assert [v["field"] for v in violations] == ["actor_id"]


async def test_retention_purges_old_records_only(app: Application, stubs: Stubs) -> None:
    actor = uuid.uuid4()
    now = datetime.now(UTC).replace(microsecond=0)
    old = [now - timedelta(days=d) for d in (31, 45, 400)]
    recent = [now - timedelta(days=d) for d in (29, 1)]
    await _plant(app, actor, old + recent)
    try:
        # A small batch, so the purge takes several rounds.
        purged = await AuditRetention(app.domain.sessions, days=30, batch=2).purge(now)
        assert purged >= 3
        async with app.domain.sessions() as s:
            left = (await s.scalars(select(AuditRecord).where(AuditRecord.actor_id == actor))).all()
        assert sorted(r.occurred_at for r in left) == sorted(recent)
        # 0 days keeps everything.
        assert (
            await AuditRetention(app.domain.sessions, days=0).purge(now + timedelta(days=999)) == 0
        )
        async with app.domain.sessions() as s:
            kept = (
                await s.scalars(select(AuditRecord.id).where(AuditRecord.actor_id == actor))
            ).all()
        assert len(kept) == 2
    finally:
        async with app.domain.sessions.begin() as s:
            await s.execute(delete(AuditRecord).where(AuditRecord.actor_id == actor))
