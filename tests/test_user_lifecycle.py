"""Issue 18, items 2, 3 and 5 against the real server (gRPC, and REST through Envoy):
administrators create people (with an invitation) and service accounts, disable and enable
accounts, change roles; a person exports and deletes their own account."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import json
import uuid
from datetime import timedelta
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.feedback.v1 import feedback_pb2 as fb
from agentmesh.feedback.v1 import feedback_service_pb2 as fb_service
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import select, update

from server.main import Application
from services.audit.models import AuditRecord
from services.auth.models import Invitation, User
from services.auth.principal import Role
from services.db import utcnow
from tests.harness import PASSWORD, Account, Stubs, new_admin, new_user, unique_email
from tests.knowledge import ingest, search
from tests.rpc_errors import error_info, field_violations
from tests.test_auth import expect_code

NEW_PASSWORD = "a fresh and long passphrase"


def _me(stubs: Stubs, account: Account) -> Any:
    return stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=account.metadata)


async def _create(
    stubs: Stubs,
    admin: Account,
    kind: user_pb.UserKind.ValueType = user_pb.USER_KIND_PERSON,
    role: user_pb.Role.ValueType = user_pb.ROLE_USER,
) -> users_pb.CreateUserResponse:
    response: users_pb.CreateUserResponse = await stubs.users.CreateUser(
        users_pb.CreateUserRequest(
            email=unique_email("created"), full_name="Created", role=role, kind=kind
        ),
        metadata=admin.metadata,
    )
    return response


async def _accept(stubs: Stubs, token: str, password: str = NEW_PASSWORD) -> Any:
    return await stubs.auth.AcceptInvitation(
        auth_pb.AcceptInvitationRequest(invitation_token=token, password=password)
    )


async def _audit(app: Application, action: str, target_id: str) -> list[AuditRecord]:
    async with app.domain.sessions() as s:
        rows = await s.scalars(
            select(AuditRecord)
            .where(AuditRecord.action == action, AuditRecord.target_id == target_id)
            .order_by(AuditRecord.id)
        )
        return list(rows.all())


def _account(user_id: str, email: str, tokens: Any) -> Account:
    return Account(user_id, email, NEW_PASSWORD, tokens.access_token, tokens.refresh_token)


# --- creating people and service accounts ------------------------------------------------


async def test_admin_creates_a_person_who_accepts_the_invitation_and_logs_in(
    app: Application, stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    admin = await new_admin(app, stubs)
    created = await _create(stubs, admin, role=user_pb.ROLE_ADMIN)
    user = created.user
    assert user.kind == user_pb.USER_KIND_PERSON and user.role == user_pb.ROLE_ADMIN
    assert not user.disabled and created.invitation_token
    lifetime = created.invitation_expires_at.ToDatetime() - created.user.created_at.ToDatetime()
    assert abs(lifetime - timedelta(hours=72)) < timedelta(minutes=1)
    # Not yet signed up: no password works.
    await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password=NEW_PASSWORD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )

    accepted = await _accept(stubs, created.invitation_token)
    assert accepted.user.user_id == user.user_id and accepted.token_type == "Bearer"
    me = await _me(stubs, _account(user.user_id, user.email, accepted))
    assert me.user.email == user.email
    login = await stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password=NEW_PASSWORD))
    assert login.user.user_id == user.user_id

    # Used once: never again.
    error = await expect_code(
        _accept(stubs, created.invitation_token, "another long passphrase"),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "INVITATION_USED"
    await stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password=NEW_PASSWORD))

    created_rows = await _audit(app, "user_created", user.user_id)
    assert [(r.actor_id, r.outcome) for r in created_rows] == [
        (uuid.UUID(admin.user_id), "success")
    ]
    accepted_rows = await _audit(app, "invitation_accepted", user.user_id)
    assert [r.outcome for r in accepted_rows] == ["success", "failure"]
    # The token is a secret: it is in no log line and no audit record.
    assert created.invitation_token not in caplog.text
    assert all(created.invitation_token not in json.dumps(r.data) for r in accepted_rows)
    async with app.domain.sessions() as s:
        stored = await s.scalar(
            select(Invitation.token_hash).where(Invitation.user_id == uuid.UUID(user.user_id))
        )
    assert stored and created.invitation_token not in stored


async def test_expired_and_unknown_invitations_are_refused(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    created = await _create(stubs, admin)
    async with app.domain.sessions.begin() as s:
        await s.execute(
            update(Invitation)
            .where(Invitation.user_id == uuid.UUID(created.user.user_id))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    error = await expect_code(
        _accept(stubs, created.invitation_token), grpc.StatusCode.UNAUTHENTICATED
    )
    assert error_info(error).reason == "INVITATION_EXPIRED"
    error = await expect_code(_accept(stubs, "inv_" + "x" * 43), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == "INVITATION_INVALID"
    # Nothing was written: the account still has no password.
    async with app.domain.sessions() as s:
        user = await s.get(User, uuid.UUID(created.user.user_id))
    assert user is not None and user.password_hash is None


async def test_bad_invitation_input_is_refused_without_using_the_invitation(
    app: Application, stubs: Stubs
) -> None:
    admin = await new_admin(app, stubs)
    created = await _create(stubs, admin)
    error = await expect_code(
        stubs.auth.AcceptInvitation(auth_pb.AcceptInvitationRequest()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"invitation_token", "password"}
    error = await expect_code(
        _accept(stubs, created.invitation_token, "short"), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert "password" in field_violations(error)
    # The refusal did not spend the invitation.
    accepted = await _accept(stubs, created.invitation_token)
    assert accepted.user.user_id == created.user.user_id


async def test_a_service_account_can_never_sign_in(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    created = await _create(stubs, admin, kind=user_pb.USER_KIND_SERVICE)
    assert created.user.kind == user_pb.USER_KIND_SERVICE
    assert not created.invitation_token and not created.HasField("invitation_expires_at")
    async with app.domain.sessions() as s:
        invitations = (
            await s.scalars(
                select(Invitation).where(Invitation.user_id == uuid.UUID(created.user.user_id))
            )
        ).all()
        user = await s.get(User, uuid.UUID(created.user.user_id))
    assert not invitations and user is not None and user.password_hash is None
    for password in ("", PASSWORD, NEW_PASSWORD):
        await expect_code(
            stubs.auth.Login(
                auth_pb.LoginRequest(email=created.user.email, password=password or "x")
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    rows = await _audit(app, "service_account_created", created.user.user_id)
    assert [r.data for r in rows] == [{"role": "user", "kind": "service"}]


async def test_create_user_validates_and_refuses_a_taken_email(
    app: Application, stubs: Stubs
) -> None:
    admin = await new_admin(app, stubs)
    error = await expect_code(
        stubs.users.CreateUser(
            users_pb.CreateUserRequest(email="not an email", full_name="x" * 201),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"email", "full_name", "role", "kind"}
    existing = await new_user(stubs, "existing")
    error = await expect_code(
        stubs.users.CreateUser(
            users_pb.CreateUserRequest(
                email=existing.email.upper(), role=user_pb.ROLE_USER, kind=user_pb.USER_KIND_PERSON
            ),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error_info(error).reason == "EMAIL_TAKEN"


USER_ADMIN_CALLS = {
    "CreateUser": lambda stubs, uid, md: stubs.users.CreateUser(
        users_pb.CreateUserRequest(
            email=unique_email("sneaky"), role=user_pb.ROLE_ADMIN, kind=user_pb.USER_KIND_SERVICE
        ),
        metadata=md,
    ),
    "DisableUser": lambda stubs, uid, md: stubs.users.DisableUser(
        users_pb.DisableUserRequest(user_id=uid), metadata=md
    ),
    "EnableUser": lambda stubs, uid, md: stubs.users.EnableUser(
        users_pb.EnableUserRequest(user_id=uid), metadata=md
    ),
}


@pytest.mark.parametrize("rpc", sorted(USER_ADMIN_CALLS))
async def test_non_admins_cannot_create_disable_or_enable(stubs: Stubs, rpc: str) -> None:
    user, other = await new_user(stubs, "plain"), await new_user(stubs, "target")
    error = await expect_code(
        USER_ADMIN_CALLS[rpc](stubs, other.user_id, user.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "ADMIN_REQUIRED"
    assert not (await _me(stubs, other)).user.disabled


# --- disabling, enabling, demotion ---------------------------------------------------------


async def test_a_disabled_user_is_refused_at_once_and_works_again_when_enabled(
    app: Application, stubs: Stubs
) -> None:
    admin, user = await new_admin(app, stubs), await new_user(stubs, "disabled")
    await _me(stubs, user)  # its auth state is cached now
    disabled = await stubs.users.DisableUser(
        users_pb.DisableUserRequest(user_id=user.user_id), metadata=admin.metadata
    )
    assert disabled.user.disabled
    error = await expect_code(_me(stubs, user), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == "USER_NOT_ACTIVE"
    await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password=PASSWORD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # Disabling twice is fine; the listing shows it.
    again = await stubs.users.DisableUser(
        users_pb.DisableUserRequest(user_id=user.user_id), metadata=admin.metadata
    )
    assert again.user.disabled

    enabled = await stubs.users.EnableUser(
        users_pb.EnableUserRequest(user_id=user.user_id), metadata=admin.metadata
    )
    assert not enabled.user.disabled
    assert (await _me(stubs, user)).user.user_id == user.user_id  # the same, unexpired token
    await stubs.auth.Login(auth_pb.LoginRequest(email=user.email, password=PASSWORD))
    actions = [
        r.action
        for action in ("user_disabled", "user_enabled")
        for r in await _audit(app, action, user.user_id)
    ]
    assert actions == ["user_disabled", "user_disabled", "user_enabled"]


async def test_disable_and_enable_validate_the_id(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    error = await expect_code(
        stubs.users.DisableUser(
            users_pb.DisableUserRequest(user_id="nope"), metadata=admin.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "user_id" in field_violations(error)
    error = await expect_code(
        stubs.users.EnableUser(
            users_pb.EnableUserRequest(user_id=str(uuid.uuid4())), metadata=admin.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    assert error_info(error).reason == "USER_NOT_FOUND"


async def test_a_demoted_admin_is_refused_on_the_very_next_call(
    app: Application, stubs: Stubs
) -> None:
    admin, demoted = await new_admin(app, stubs), await new_admin(app, stubs)
    await stubs.users.ListUsers(users_pb.ListUsersRequest(page_size=1), metadata=demoted.metadata)
    await stubs.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=user_pb.User(user_id=demoted.user_id, role=user_pb.ROLE_USER),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=admin.metadata,
    )
    error = await expect_code(
        stubs.users.ListUsers(users_pb.ListUsersRequest(page_size=1), metadata=demoted.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "ADMIN_REQUIRED"
    assert (await _me(stubs, demoted)).user.role == user_pb.ROLE_USER
    rows = await _audit(app, "role_changed", demoted.user_id)
    assert [(r.actor_id, r.data) for r in rows] == [
        (uuid.UUID(admin.user_id), {"from": "admin", "to": "user"})
    ]


# --- a person's own data -------------------------------------------------------------------


async def _with_data(stubs: Stubs, account: Account, secret: str) -> dict[str, str]:
    """A conversation with an answer and feedback on it, and a ready document."""
    reply = await stubs.agent.Query(
        agent_pb.QueryRequest(query=f"Remember {secret}"),
        metadata=account.metadata,
    )
    feedback = fb_grpc.FeedbackServiceStub(stubs.channel)
    await feedback.SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=reply.message.message_id, rating=fb.RATING_THUMBS_UP, comment=secret
        ),
        metadata=account.metadata,
    )
    document = await ingest(stubs, account, f"{secret}.txt", f"Notes on {secret}.".encode())
    return {
        "conversation_id": reply.conversation_id,
        "message_id": reply.message.message_id,
        "document_id": document.document_id,
    }


async def test_export_holds_my_data_and_nothing_of_anyone_elses(
    app: Application, stubs: Stubs
) -> None:
    me, other = await new_user(stubs, "exporter"), await new_user(stubs, "bystander")
    mine = await _with_data(stubs, me, "tangerine")
    theirs = await _with_data(stubs, other, "obsidian")
    export = await stubs.users.ExportCurrentUser(
        users_pb.ExportCurrentUserRequest(), metadata=me.metadata
    )
    assert export.user.user_id == me.user_id and not export.truncated
    [conversation] = export.conversations
    assert conversation.conversation.conversation_id == mine["conversation_id"]
    assert [m.role for m in conversation.messages] == [
        agent_pb2.MESSAGE_ROLE_USER,
        agent_pb2.MESSAGE_ROLE_ASSISTANT,
    ]
    assert mine["message_id"] in {m.message_id for m in conversation.messages}
    assert "tangerine" in conversation.messages[0].content
    assert [(f.message_id, f.comment) for f in export.feedback] == [
        (mine["message_id"], "tangerine")
    ]
    assert [d.document_id for d in export.documents] == [mine["document_id"]]
    assert export.documents[0].owner_id == me.user_id
    text = str(export)
    assert not any(value in text for value in (*theirs.values(), other.user_id, "obsidian"))
    rows = await _audit(app, "account_exported", me.user_id)
    assert [r.actor_id for r in rows] == [uuid.UUID(me.user_id)]


async def test_export_and_create_over_rest(
    app: Application, stubs: Stubs, rest: aiohttp.ClientSession
) -> None:
    admin = await new_admin(app, stubs)
    email = unique_email("rest-created")
    async with rest.post(
        "/v1/users",
        json={"email": email, "role": "ROLE_USER", "kind": "USER_KIND_PERSON"},
        headers={"authorization": f"Bearer {admin.access_token}"},
    ) as response:
        created = await response.json()
        assert response.status == 200, created
    assert created["user"]["kind"] == "USER_KIND_PERSON" and created["invitation_token"]
    async with rest.post(
        "/v1/auth/invitations:accept",
        json={"invitation_token": created["invitation_token"], "password": NEW_PASSWORD},
    ) as response:
        tokens = await response.json()
        assert response.status == 200, tokens
    async with rest.get(
        "/v1/users/me:export", headers={"authorization": f"Bearer {tokens['access_token']}"}
    ) as response:
        exported = json.loads(await response.text())
        assert response.status == 200, exported
        assert response.content_type == "application/json"
    assert exported["user"]["email"] == email and exported["exported_at"]
    async with rest.post(
        "/v1/users",
        json={"email": "nope"},
        headers={"authorization": f"Bearer {admin.access_token}"},
    ) as response:
        assert response.status == 400


async def test_self_delete_removes_everything_and_stops_the_tokens(
    app: Application, stubs: Stubs
) -> None:
    me, other = await new_user(stubs, "leaver"), await new_user(stubs, "stayer")
    mine = await _with_data(stubs, me, "marmalade")
    await _with_data(stubs, other, "marmalade")
    assert await app.domain.knowledge.indexed_chunks(uuid.UUID(mine["document_id"])) > 0

    error = await expect_code(
        stubs.users.DeleteCurrentUser(
            users_pb.DeleteCurrentUserRequest(current_password="wrong password"),
            metadata=me.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "WRONG_PASSWORD"
    assert (await _me(stubs, me)).user.user_id == me.user_id  # still there

    await stubs.users.DeleteCurrentUser(
        users_pb.DeleteCurrentUserRequest(current_password=PASSWORD), metadata=me.metadata
    )
    error = await expect_code(_me(stubs, me), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == "USER_NOT_ACTIVE"
    await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest(email=me.email, password=PASSWORD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert await app.domain.knowledge.indexed_chunks(uuid.UUID(mine["document_id"])) == 0
    async with app.domain.sessions() as s:
        assert await s.get(User, uuid.UUID(me.user_id)) is None
    # The other account's data is untouched.
    hits = await search(stubs, other, "marmalade")
    assert hits and all(h.document_id != mine["document_id"] for h in hits)
    rows = await _audit(app, "user_deleted", me.user_id)
    assert [(r.outcome, r.actor_id, (r.data or {}).get("self")) for r in rows] == [
        ("failure", uuid.UUID(me.user_id), True),
        ("success", uuid.UUID(me.user_id), True),
    ]


async def test_a_service_account_cannot_delete_itself(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    created = await _create(stubs, admin, kind=user_pb.USER_KIND_SERVICE)
    # A service account holds no token of its own (it uses keys); one is minted here the way
    # the server mints them, to show the refusal does not depend on the credential.
    token = app.domain.tokens.issue_access(
        user_id=uuid.UUID(created.user.user_id),
        role=Role.USER,
        session_id=uuid.uuid4(),
        now=utcnow(),
    )
    service = Account(created.user.user_id, created.user.email, "", token, "")
    error = await expect_code(
        stubs.users.DeleteCurrentUser(
            users_pb.DeleteCurrentUserRequest(current_password="anything at all"),
            metadata=service.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "SERVICE_ACCOUNT"
    fetched = await stubs.users.GetUser(
        users_pb.GetUserRequest(user_id=created.user.user_id), metadata=admin.metadata
    )
    assert fetched.user.kind == user_pb.USER_KIND_SERVICE


async def test_a_service_account_works_with_keys_and_follows_its_lifecycle(
    app: Application, stubs: Stubs
) -> None:
    admin = await new_admin(app, stubs)
    robot = (await _create(stubs, admin, kind=user_pb.USER_KIND_SERVICE)).user
    created = await stubs.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="robot", user_id=robot.user_id), metadata=admin.metadata
    )
    key = (("authorization", f"Bearer {created.secret}"),)
    me = await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=key)
    assert me.user.user_id == robot.user_id and me.user.kind == user_pb.USER_KIND_SERVICE

    await stubs.users.DisableUser(
        users_pb.DisableUserRequest(user_id=robot.user_id), metadata=admin.metadata
    )
    error = await expect_code(
        stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=key),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "USER_NOT_ACTIVE"
    await stubs.users.EnableUser(
        users_pb.EnableUserRequest(user_id=robot.user_id), metadata=admin.metadata
    )
    await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=key)

    # A key never deletes its account; an administrator does, and the key stops.
    error = await expect_code(
        stubs.users.DeleteCurrentUser(
            users_pb.DeleteCurrentUserRequest(current_password="anything at all"), metadata=key
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "API_KEY_NOT_ALLOWED"
    await stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=robot.user_id), metadata=admin.metadata
    )
    await expect_code(
        stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=key),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    rows = await _audit(app, "user_deleted", robot.user_id)
    assert [(r.actor_id, r.data) for r in rows] == [
        (uuid.UUID(admin.user_id), {"self": False, "kind": "service"})
    ]
