"""Groups (issue 23, item 1) against the real server, over gRPC and REST through Envoy:
administrators make groups and managers; managers change members; members only look and
leave; a group is invisible (NOT_FOUND) to anyone outside it."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import json
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.teams.v1 import group_pb2
from agentmesh.teams.v1 import group_service_pb2 as groups_pb
from agentmesh.teams.v1 import group_service_pb2_grpc as groups_grpc
from google.protobuf import field_mask_pb2
from sqlalchemy import func, select

from server.main import Application
from services.audit.models import AuditRecord
from services.teams.models import GroupMember
from tests.harness import Account, Stubs, new_admin, new_user, unique_email
from tests.rpc_errors import error_info, field_violations

MEMBER = group_pb2.GROUP_ROLE_MEMBER
MANAGER = group_pb2.GROUP_ROLE_MANAGER


@pytest.fixture(scope="module")
def groups(stubs: Stubs) -> groups_grpc.GroupServiceAsyncStub:
    return groups_grpc.GroupServiceStub(stubs.channel)


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    assert error_info(caught.value).reason == reason, error_info(caught.value)
    return caught.value


async def create(
    groups: groups_grpc.GroupServiceAsyncStub, admin: Account, name: str = ""
) -> group_pb2.Group:
    response = await groups.CreateGroup(
        groups_pb.CreateGroupRequest(name=name or unique_email("group"), description="Ours."),
        metadata=admin.metadata,
    )
    return response.group


async def add(
    groups: groups_grpc.GroupServiceAsyncStub,
    by: Account,
    group: group_pb2.Group,
    who: Account,
    role: group_pb2.GroupRole.ValueType = group_pb2.GROUP_ROLE_UNSPECIFIED,
) -> group_pb2.GroupMember:
    response = await groups.AddGroupMember(
        groups_pb.AddGroupMemberRequest(group_id=group.group_id, user_id=who.user_id, role=role),
        metadata=by.metadata,
    )
    return response.member


async def member_ids(
    groups: groups_grpc.GroupServiceAsyncStub, by: Account, group: group_pb2.Group
) -> dict[str, int]:
    response = await groups.ListGroupMembers(
        groups_pb.ListGroupMembersRequest(group_id=group.group_id), metadata=by.metadata
    )
    return {m.user_id: m.role for m in response.members}


async def test_admin_makes_a_group_members_and_a_manager_who_manages_members(
    app: Application, stubs: Stubs, groups: groups_grpc.GroupServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    manager = await new_user(stubs, "manager")
    member = await new_user(stubs, "member")
    newcomer = await new_user(stubs, "newcomer")
    group = await create(groups, admin)
    assert group.member_count == 0 and group.caller_role == group_pb2.GROUP_ROLE_UNSPECIFIED

    added = await add(groups, admin, group, manager, MANAGER)
    assert (added.user_id, added.email, added.role) == (manager.user_id, manager.email, MANAGER)
    assert added.full_name == "Manager" and added.HasField("added_at")
    # A manager adds a member: the default role is member.
    assert (await add(groups, manager, group, member)).role == MEMBER
    assert await member_ids(groups, member, group) == {
        manager.user_id: MANAGER,
        member.user_id: MEMBER,
    }
    seen = await groups.GetGroup(
        groups_pb.GetGroupRequest(group_id=group.group_id), metadata=manager.metadata
    )
    assert seen.group.member_count == 2 and seen.group.caller_role == MANAGER

    # The manager removes the member, and adds them back.
    await groups.RemoveGroupMember(
        groups_pb.RemoveGroupMemberRequest(group_id=group.group_id, user_id=member.user_id),
        metadata=manager.metadata,
    )
    assert member.user_id not in await member_ids(groups, manager, group)
    await add(groups, manager, group, member)

    # A plain member can change no one's membership.
    for call in (
        groups.AddGroupMember(
            groups_pb.AddGroupMemberRequest(group_id=group.group_id, user_id=newcomer.user_id),
            metadata=member.metadata,
        ),
        groups.RemoveGroupMember(
            groups_pb.RemoveGroupMemberRequest(group_id=group.group_id, user_id=manager.user_id),
            metadata=member.metadata,
        ),
        groups.SetGroupMemberRole(
            groups_pb.SetGroupMemberRoleRequest(
                group_id=group.group_id, user_id=member.user_id, role=MANAGER
            ),
            metadata=member.metadata,
        ),
    ):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "GROUP_MANAGER_REQUIRED")
    # A manager cannot make a manager, nor remove another one: an administrator's choice.
    other_manager = await new_user(stubs, "second")
    await add(groups, admin, group, other_manager, MANAGER)
    await refused(
        groups.AddGroupMember(
            groups_pb.AddGroupMemberRequest(
                group_id=group.group_id, user_id=newcomer.user_id, role=MANAGER
            ),
            metadata=manager.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    for call in (
        groups.SetGroupMemberRole(
            groups_pb.SetGroupMemberRoleRequest(
                group_id=group.group_id, user_id=member.user_id, role=MANAGER
            ),
            metadata=manager.metadata,
        ),
        groups.RemoveGroupMember(
            groups_pb.RemoveGroupMemberRequest(
                group_id=group.group_id, user_id=other_manager.user_id
            ),
            metadata=manager.metadata,
        ),
    ):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    assert await member_ids(groups, admin, group) == {
        manager.user_id: MANAGER,
        member.user_id: MEMBER,
        other_manager.user_id: MANAGER,
    }
    # The administrator promotes; a manager steps down; a member leaves.
    promoted = await groups.SetGroupMemberRole(
        groups_pb.SetGroupMemberRoleRequest(
            group_id=group.group_id, user_id=member.user_id, role=MANAGER
        ),
        metadata=admin.metadata,
    )
    assert promoted.member.role == MANAGER
    stepped = await groups.SetGroupMemberRole(
        groups_pb.SetGroupMemberRoleRequest(
            group_id=group.group_id, user_id=other_manager.user_id, role=MEMBER
        ),
        metadata=other_manager.metadata,
    )
    assert stepped.member.role == MEMBER
    await groups.RemoveGroupMember(
        groups_pb.RemoveGroupMemberRequest(group_id=group.group_id, user_id=other_manager.user_id),
        metadata=other_manager.metadata,
    )
    assert set(await member_ids(groups, admin, group)) == {manager.user_id, member.user_id}

    # Every change is in the audit trail, the member's refused attempts too.
    async with app.domain.sessions() as s:
        rows = (
            await s.execute(
                select(AuditRecord.action, AuditRecord.outcome).where(
                    AuditRecord.target_id == group.group_id
                )
            )
        ).all()
    recorded = {(a, o) for a, o in rows}
    assert {
        ("group_created", "success"),
        ("group_member_added", "success"),
        ("group_member_removed", "success"),
        ("group_member_role_changed", "success"),
        ("group_member_added", "failure"),
        ("group_member_removed", "failure"),
        ("group_member_role_changed", "failure"),
    } <= recorded


async def test_a_group_is_not_found_for_anyone_outside_it(
    app: Application, stubs: Stubs, groups: groups_grpc.GroupServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    insider, outsider = await new_user(stubs, "insider"), await new_user(stubs, "outsider")
    group = await create(groups, admin)
    await add(groups, admin, group, insider, MANAGER)
    ghost = "00000000-0000-4000-8000-000000000000"
    for group_id in (group.group_id, ghost):
        for call in (
            groups.GetGroup(
                groups_pb.GetGroupRequest(group_id=group_id), metadata=outsider.metadata
            ),
            groups.ListGroupMembers(
                groups_pb.ListGroupMembersRequest(group_id=group_id), metadata=outsider.metadata
            ),
            groups.AddGroupMember(
                groups_pb.AddGroupMemberRequest(group_id=group_id, user_id=outsider.user_id),
                metadata=outsider.metadata,
            ),
            groups.RemoveGroupMember(
                groups_pb.RemoveGroupMemberRequest(group_id=group_id, user_id=insider.user_id),
                metadata=outsider.metadata,
            ),
            groups.SetGroupMemberRole(
                groups_pb.SetGroupMemberRoleRequest(
                    group_id=group_id, user_id=outsider.user_id, role=MANAGER
                ),
                metadata=outsider.metadata,
            ),
        ):
            # The same answer for a real group as for none: no existence oracle.
            await refused(call, grpc.StatusCode.NOT_FOUND, "GROUP_NOT_FOUND")
    assert set(await member_ids(groups, admin, group)) == {insider.user_id}


async def test_each_user_lists_only_their_groups_and_an_administrator_all(
    app: Application, stubs: Stubs, groups: groups_grpc.GroupServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs, "lister")
    mine = [await create(groups, admin) for _ in range(3)]
    others = await create(groups, admin)
    for group in mine:
        await add(groups, admin, group, user)
    seen, token = [], ""
    while True:
        page = await groups.ListGroups(
            groups_pb.ListGroupsRequest(page_size=2, page_token=token), metadata=user.metadata
        )
        seen += [(g.group_id, g.caller_role, g.member_count) for g in page.groups]
        token = page.next_page_token
        if not token:
            break
    assert seen == [(g.group_id, MEMBER, 1) for g in mine]
    listed = await groups.ListGroups(
        groups_pb.ListGroupsRequest(page_size=200), metadata=admin.metadata
    )
    assert {g.group_id for g in [*mine, others]} <= {g.group_id for g in listed.groups}
    assert all(g.caller_role == group_pb2.GROUP_ROLE_UNSPECIFIED for g in listed.groups)


async def test_deleting_a_user_or_a_group_deletes_their_memberships(
    app: Application, stubs: Stubs, groups: groups_grpc.GroupServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    leaving, staying = await new_user(stubs, "leaving"), await new_user(stubs, "staying")
    group = await create(groups, admin)
    await add(groups, admin, group, leaving, MANAGER)
    await add(groups, admin, group, staying)
    await stubs.users.DeleteUser(
        users_pb.DeleteUserRequest(user_id=leaving.user_id), metadata=admin.metadata
    )
    assert set(await member_ids(groups, staying, group)) == {staying.user_id}
    seen = await groups.GetGroup(
        groups_pb.GetGroupRequest(group_id=group.group_id), metadata=staying.metadata
    )
    assert seen.group.member_count == 1

    await groups.DeleteGroup(
        groups_pb.DeleteGroupRequest(group_id=group.group_id), metadata=admin.metadata
    )
    await refused(
        groups.GetGroup(
            groups_pb.GetGroupRequest(group_id=group.group_id), metadata=admin.metadata
        ),
        grpc.StatusCode.NOT_FOUND,
        "GROUP_NOT_FOUND",
    )
    listed = await groups.ListGroups(groups_pb.ListGroupsRequest(), metadata=staying.metadata)
    assert not listed.groups
    async with app.domain.sessions() as s:
        left = await s.scalar(
            select(func.count())
            .select_from(GroupMember)
            .where(
                GroupMember.user_id.in_([uuid.UUID(leaving.user_id), uuid.UUID(staying.user_id)])
            )
        )
    assert left == 0


async def test_validation_errors_name_their_fields_and_duplicates_already_exist(
    app: Application, stubs: Stubs, groups: groups_grpc.GroupServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs, "dup")
    error = await refused(
        groups.CreateGroup(
            groups_pb.CreateGroupRequest(name=" ", description="x" * 1001), metadata=admin.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(field_violations(error)) == {"name", "description"}
    error = await refused(
        groups.AddGroupMember(
            groups_pb.AddGroupMemberRequest(group_id="nope", user_id="nope"),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(field_violations(error)) == {"group_id", "user_id"}

    group = await create(groups, admin, name="Platform " + unique_email("team"))
    error = await refused(
        groups.SetGroupMemberRole(
            groups_pb.SetGroupMemberRoleRequest(group_id=group.group_id, user_id=user.user_id),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(field_violations(error)) == {"role"}
    error = await refused(
        groups.UpdateGroup(
            groups_pb.UpdateGroupRequest(
                group=group_pb2.Group(group_id=group.group_id, name="renamed"),
                update_mask=field_mask_pb2.FieldMask(paths=["member_count"]),
            ),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert set(field_violations(error)) == {"update_mask"}

    # Names are unique regardless of case; members are unique per group.
    await refused(
        groups.CreateGroup(
            groups_pb.CreateGroupRequest(name=group.name.upper()), metadata=admin.metadata
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "GROUP_NAME_TAKEN",
    )
    other = await create(groups, admin)
    await refused(
        groups.UpdateGroup(
            groups_pb.UpdateGroupRequest(
                group=group_pb2.Group(group_id=other.group_id, name=group.name.lower())
            ),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "GROUP_NAME_TAKEN",
    )
    await add(groups, admin, group, user)
    await refused(
        add(groups, admin, group, user), grpc.StatusCode.ALREADY_EXISTS, "ALREADY_A_MEMBER"
    )
    await refused(
        groups.AddGroupMember(
            groups_pb.AddGroupMemberRequest(
                group_id=group.group_id, user_id="00000000-0000-4000-8000-000000000000"
            ),
            metadata=admin.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    # Only administrators create groups (the access table).
    await refused(
        groups.CreateGroup(groups_pb.CreateGroupRequest(name="mine"), metadata=user.metadata),
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )


async def rest_call(
    rest: aiohttp.ClientSession, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}"}
    async with rest.request(method, path, json=body, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else {}


async def test_groups_over_rest(
    app: Application, stubs: Stubs, rest: aiohttp.ClientSession
) -> None:
    admin, manager, member, outsider = (
        await new_admin(app, stubs),
        await new_user(stubs, "restmanager"),
        await new_user(stubs, "restmember"),
        await new_user(stubs, "restoutsider"),
    )
    name = "REST " + unique_email("team")
    status, body = await rest_call(
        rest, "POST", "/v1/groups", admin.access_token, {"name": name, "description": "Via Envoy"}
    )
    assert status == 200 and body["group"]["name"] == name, body
    group_id = body["group"]["group_id"]
    members = f"/v1/groups/{group_id}/members"
    status, body = await rest_call(
        rest,
        "POST",
        members,
        admin.access_token,
        {"user_id": manager.user_id, "role": "GROUP_ROLE_MANAGER"},
    )
    assert status == 200 and body["member"]["role"] == "GROUP_ROLE_MANAGER", body
    status, body = await rest_call(
        rest, "POST", members, manager.access_token, {"user_id": member.user_id}
    )
    assert status == 200 and body["member"]["role"] == "GROUP_ROLE_MEMBER", body
    status, body = await rest_call(
        rest, "DELETE", f"{members}/{manager.user_id}", member.access_token
    )
    assert status == 403, body
    status, body = await rest_call(rest, "GET", members, outsider.access_token)
    assert status == 404, body
    status, body = await rest_call(
        rest,
        "POST",
        f"{members}/{member.user_id}:setRole",
        admin.access_token,
        {"role": "GROUP_ROLE_MANAGER"},
    )
    assert status == 200 and body["member"]["role"] == "GROUP_ROLE_MANAGER", body
    status, body = await rest_call(
        rest, "PATCH", f"/v1/groups/{group_id}", admin.access_token, {"description": "Renamed"}
    )
    assert status == 200 and body["group"]["description"] == "Renamed", body
    assert body["group"]["name"] == name and body["group"]["member_count"] == 2
    status, body = await rest_call(rest, "GET", "/v1/groups", member.access_token)
    assert status == 200 and [g["group_id"] for g in body["groups"]] == [group_id], body
    status, body = await rest_call(
        rest, "POST", "/v1/groups", admin.access_token, {"name": "", "description": ""}
    )
    assert status == 400, body
    violations = next(d for d in body["details"] if d["@type"].endswith("BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["name"]
    status, body = await rest_call(rest, "DELETE", f"/v1/groups/{group_id}", admin.access_token)
    assert status == 200 and body == {}
    status, body = await rest_call(rest, "GET", f"/v1/groups/{group_id}", member.access_token)
    assert status == 404, body
