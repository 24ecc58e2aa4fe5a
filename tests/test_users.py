"""UserService over gRPC: profiles, administration, the access table."""

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from google.protobuf import field_mask_pb2

from server.main import Application
from tests.backends import Database
from tests.harness import PASSWORD, Stubs, new_admin, new_user, running_app
from tests.rpc_errors import error_info, field_violations
from tests.test_auth import expect_code

ADMIN_CALLS = {
    "ListUsers": lambda stubs, uid, md: stubs.users.ListUsers(
        users_pb.ListUsersRequest(), metadata=md
    ),
    "GetUser": lambda stubs, uid, md: stubs.users.GetUser(
        users_pb.GetUserRequest(user_id=uid), metadata=md
    ),
    "UpdateUser": lambda stubs, uid, md: stubs.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=user_pb.User(user_id=uid, role=user_pb.ROLE_ADMIN),
            update_mask=field_mask_pb2.FieldMask(paths=["role"]),
        ),
        metadata=md,
    ),
    "DeleteUser": lambda stubs, uid, md: stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=uid), metadata=md
    ),
}


@pytest.mark.parametrize("rpc", sorted(ADMIN_CALLS))
async def test_users_cannot_call_admin_rpcs(stubs: Stubs, rpc: str) -> None:
    user, other = await new_user(stubs, "plain"), await new_user(stubs, "victim")
    error = await expect_code(
        ADMIN_CALLS[rpc](stubs, other.user_id, user.metadata), grpc.StatusCode.PERMISSION_DENIED
    )
    assert error_info(error).reason == "ADMIN_REQUIRED"
    # Nothing changed: the other account is still there and still a user.
    me = await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=other.metadata)
    assert me.user.role == user_pb.ROLE_USER


async def test_admin_manages_users(app: Application, stubs: Stubs) -> None:
    admin, user = await new_admin(app, stubs), await new_user(stubs, "managed")
    fetched = await stubs.users.GetUser(
        users_pb.GetUserRequest(user_id=user.user_id), metadata=admin.metadata
    )
    assert fetched.user.email == user.email

    promoted = await stubs.users.UpdateUser(
        users_pb.UpdateUserRequest(
            user=user_pb.User(user_id=user.user_id, role=user_pb.ROLE_ADMIN, full_name="Promoted"),
            update_mask=field_mask_pb2.FieldMask(paths=["role", "full_name"]),
        ),
        metadata=admin.metadata,
    )
    assert promoted.user.role == user_pb.ROLE_ADMIN and promoted.user.full_name == "Promoted"

    await stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=user.user_id), metadata=admin.metadata
    )
    await expect_code(
        stubs.users.GetUser(users_pb.GetUserRequest(user_id=user.user_id), metadata=admin.metadata),
        grpc.StatusCode.NOT_FOUND,
    )
    # The deleted account's unexpired access token is refused (tests/test_auth_revocation.py).
    await expect_code(
        stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=user.metadata),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_admin_lookups_validate_ids(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    error = await expect_code(
        stubs.users.GetUser(
            users_pb.GetUserRequest(user_id="../etc/passwd"), metadata=admin.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field_violations(error) == {"user_id": ["must be a UUID"]}
    await expect_code(
        stubs.users.DeleteUser(
            users_pb.DeleteUserRequest(user_id=str(uuid.uuid4())), metadata=admin.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_list_users_paginates_with_opaque_tokens(app: Application, stubs: Stubs) -> None:
    admin = await new_admin(app, stubs)
    for _ in range(3):
        await new_user(stubs, "listed")
    seen: list[str] = []
    token = ""
    while True:
        page = await stubs.users.ListUsers(
            users_pb.ListUsersRequest(page_size=2, page_token=token), metadata=admin.metadata
        )
        assert len(page.users) <= 2
        seen.extend(u.user_id for u in page.users)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) >= 4
    created = [
        u.created_at.ToDatetime()
        for u in (
            await stubs.users.ListUsers(
                users_pb.ListUsersRequest(page_size=200), metadata=admin.metadata
            )
        ).users
    ]
    assert created == sorted(created)
    for bad in (
        users_pb.ListUsersRequest(page_token="bm90LWEtY3Vyc29y"),
        users_pb.ListUsersRequest(page_size=-1),
    ):
        error = await expect_code(
            stubs.users.ListUsers(bad, metadata=admin.metadata), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert set(field_violations(error)) <= {"page_token", "page_size"}


async def test_update_current_user(stubs: Stubs) -> None:
    user, other = await new_user(stubs, "self"), await new_user(stubs, "taken")
    new_email = f"renamed-{uuid.uuid4().hex[:8]}@example.com"
    updated = await stubs.users.UpdateCurrentUser(
        users_pb.UpdateCurrentUserRequest(
            user=user_pb.User(full_name="New Name", email=new_email),
            update_mask=field_mask_pb2.FieldMask(paths=["full_name", "email"]),
        ),
        metadata=user.metadata,
    )
    assert (updated.user.full_name, updated.user.email) == ("New Name", new_email)

    # An empty mask means "the populated fields" (AIP-134).
    implied = await stubs.users.UpdateCurrentUser(
        users_pb.UpdateCurrentUserRequest(user=user_pb.User(full_name="Implied")),
        metadata=user.metadata,
    )
    assert implied.user.full_name == "Implied" and implied.user.email == new_email

    taken = await expect_code(
        stubs.users.UpdateCurrentUser(
            users_pb.UpdateCurrentUserRequest(
                user=user_pb.User(email=other.email),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            ),
            metadata=user.metadata,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error_info(taken).reason == "EMAIL_TAKEN"


@pytest.mark.parametrize(
    ("user", "paths", "field"),
    [
        (user_pb.User(role=user_pb.ROLE_ADMIN), ["role"], "update_mask"),
        (user_pb.User(role=user_pb.ROLE_ADMIN), [], "update_mask"),
        (user_pb.User(user_id=str(uuid.uuid4())), ["user_id"], "update_mask"),
        (user_pb.User(), [], "update_mask"),
        (user_pb.User(email="nope"), ["email"], "user.email"),
        (user_pb.User(full_name="x" * 201), ["full_name"], "user.full_name"),
    ],
)
async def test_users_cannot_raise_their_role_or_send_bad_updates(
    stubs: Stubs, user: user_pb.User, paths: list[str], field: str
) -> None:
    account = await new_user(stubs, "escalate")
    error = await expect_code(
        stubs.users.UpdateCurrentUser(
            users_pb.UpdateCurrentUserRequest(
                user=user, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            metadata=account.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert field in field_violations(error)
    me = await stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(), metadata=account.metadata
    )
    assert me.user.role == user_pb.ROLE_USER
    assert me.user.full_name == "Escalate"


@pytest.fixture
async def fresh_app(database: Database, tmp_path: Path) -> AsyncIterator[tuple[Application, Stubs]]:
    """An application over its own empty database (same backend as `database`)."""
    db = Database(database.backend, tmp_path / "db")
    await db.create()
    await db.migrate()
    async with running_app(db.url, tmp_path / "data") as running:
        yield running
    await db.drop()


async def test_the_last_admin_cannot_be_removed(fresh_app: tuple[Application, Stubs]) -> None:
    app, stubs = fresh_app
    admin = await new_admin(app, stubs)
    error = await expect_code(
        stubs.users.DeleteUser(
            users_pb.DeleteUserRequest(user_id=admin.user_id), metadata=admin.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_info(error).reason == "LAST_ADMIN"
    demote = users_pb.UpdateUserRequest(
        user=user_pb.User(user_id=admin.user_id, role=user_pb.ROLE_USER),
        update_mask=field_mask_pb2.FieldMask(paths=["role"]),
    )
    await expect_code(
        stubs.users.UpdateUser(demote, metadata=admin.metadata), grpc.StatusCode.FAILED_PRECONDITION
    )
    disable = users_pb.DisableUserRequest(user_id=admin.user_id)
    error = await expect_code(
        stubs.users.DisableUser(disable, metadata=admin.metadata),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_info(error).reason == "LAST_ADMIN"
    leave = users_pb.DeleteCurrentUserRequest(current_password=PASSWORD)
    error = await expect_code(
        stubs.users.DeleteCurrentUser(leave, metadata=admin.metadata),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert error_info(error).reason == "LAST_ADMIN"
    second = await new_admin(app, stubs)
    # A disabled administrator administers nothing: the first is still the last active one.
    await stubs.users.DisableUser(
        users_pb.DisableUserRequest(user_id=second.user_id), metadata=admin.metadata
    )
    await expect_code(
        stubs.users.DeleteUser(
            users_pb.DeleteUserRequest(user_id=admin.user_id), metadata=admin.metadata
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await stubs.users.EnableUser(
        users_pb.EnableUserRequest(user_id=second.user_id), metadata=admin.metadata
    )
    await stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=admin.user_id), metadata=second.metadata
    )
    listed = await stubs.users.ListUsers(users_pb.ListUsersRequest(), metadata=second.metadata)
    assert [u.email for u in listed.users] == [second.email]
