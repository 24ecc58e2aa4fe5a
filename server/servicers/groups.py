"""GroupService: groups of accounts and their members (served with the users' service)."""

from typing import Any

from agentmesh.teams.v1 import group_pb2 as group_pb
from agentmesh.teams.v1 import group_service_pb2 as groups_pb
from agentmesh.teams.v1 import group_service_pb2_grpc as groups_grpc
from google.protobuf import field_mask_pb2

from server.request_context import current_principal
from server.servicers.converters import to_timestamp
from services.errors import Violations
from services.teams.groups import GroupChanges, GroupRole, GroupService, GroupView, MemberView

ROLE_TO_PROTO = {
    GroupRole.MEMBER: group_pb.GROUP_ROLE_MEMBER,
    GroupRole.MANAGER: group_pb.GROUP_ROLE_MANAGER,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
MASKABLE = ("name", "description")


def group_to_proto(view: GroupView) -> group_pb.Group:
    return group_pb.Group(
        group_id=str(view.group.id),
        name=view.group.name,
        description=view.group.description,
        created_at=to_timestamp(view.group.created_at),
        member_count=view.member_count,
        caller_role=(
            ROLE_TO_PROTO[view.caller_role]
            if view.caller_role is not None
            else group_pb.GROUP_ROLE_UNSPECIFIED
        ),
    )


def member_to_proto(member: MemberView) -> group_pb.GroupMember:
    return group_pb.GroupMember(
        user_id=str(member.user_id),
        email=member.email,
        full_name=member.full_name,
        role=ROLE_TO_PROTO[member.role],
        added_at=to_timestamp(member.added_at),
    )


def changes_from_proto(group: group_pb.Group, mask: field_mask_pb2.FieldMask) -> GroupChanges:
    """The changes a field mask asks for; an empty mask means every populated field
    (AIP-134), which lets REST clients PATCH with just a body."""
    paths = list(mask.paths) or [
        name for name, value in (("name", group.name), ("description", group.description)) if value
    ]
    violations = Violations()
    for path in paths:
        if path not in MASKABLE:
            violations.add("update_mask", f"unknown or read-only field: {path}")
    violations.raise_if_any()
    return GroupChanges(
        name=group.name if "name" in paths else None,
        description=group.description if "description" in paths else None,
    )


class GroupServicer(groups_grpc.GroupServiceServicer):
    def __init__(self, groups: GroupService) -> None:
        self._groups = groups

    async def CreateGroup(
        self, request: groups_pb.CreateGroupRequest, context: Any
    ) -> groups_pb.CreateGroupResponse:
        view = await self._groups.create(
            current_principal(), name=request.name, description=request.description
        )
        return groups_pb.CreateGroupResponse(group=group_to_proto(view))

    async def GetGroup(
        self, request: groups_pb.GetGroupRequest, context: Any
    ) -> groups_pb.GetGroupResponse:
        view = await self._groups.get(current_principal(), request.group_id)
        return groups_pb.GetGroupResponse(group=group_to_proto(view))

    async def ListGroups(
        self, request: groups_pb.ListGroupsRequest, context: Any
    ) -> groups_pb.ListGroupsResponse:
        page = await self._groups.list(
            current_principal(),
            requested_page_size=request.page_size,
            page_token=request.page_token,
        )
        return groups_pb.ListGroupsResponse(
            groups=[group_to_proto(g) for g in page.groups], next_page_token=page.next_page_token
        )

    async def UpdateGroup(
        self, request: groups_pb.UpdateGroupRequest, context: Any
    ) -> groups_pb.UpdateGroupResponse:
        changes = changes_from_proto(request.group, request.update_mask)
        view = await self._groups.update(current_principal(), request.group.group_id, changes)
        return groups_pb.UpdateGroupResponse(group=group_to_proto(view))

    async def DeleteGroup(
        self, request: groups_pb.DeleteGroupRequest, context: Any
    ) -> groups_pb.DeleteGroupResponse:
        await self._groups.delete(current_principal(), request.group_id)
        return groups_pb.DeleteGroupResponse()

    async def ListGroupMembers(
        self, request: groups_pb.ListGroupMembersRequest, context: Any
    ) -> groups_pb.ListGroupMembersResponse:
        page = await self._groups.members(
            current_principal(),
            request.group_id,
            requested_page_size=request.page_size,
            page_token=request.page_token,
        )
        return groups_pb.ListGroupMembersResponse(
            members=[member_to_proto(m) for m in page.members],
            next_page_token=page.next_page_token,
        )

    async def AddGroupMember(
        self, request: groups_pb.AddGroupMemberRequest, context: Any
    ) -> groups_pb.AddGroupMemberResponse:
        member = await self._groups.add_member(
            current_principal(), request.group_id, request.user_id, role_from_proto(request.role)
        )
        return groups_pb.AddGroupMemberResponse(member=member_to_proto(member))

    async def RemoveGroupMember(
        self, request: groups_pb.RemoveGroupMemberRequest, context: Any
    ) -> groups_pb.RemoveGroupMemberResponse:
        await self._groups.remove_member(current_principal(), request.group_id, request.user_id)
        return groups_pb.RemoveGroupMemberResponse()

    async def SetGroupMemberRole(
        self, request: groups_pb.SetGroupMemberRoleRequest, context: Any
    ) -> groups_pb.SetGroupMemberRoleResponse:
        member = await self._groups.set_role(
            current_principal(), request.group_id, request.user_id, role_from_proto(request.role)
        )
        return groups_pb.SetGroupMemberRoleResponse(member=member_to_proto(member))


def role_from_proto(role: group_pb.GroupRole.ValueType) -> GroupRole | None:
    """The role a request names; None when unset (or a number this server does not know)."""
    return ROLE_FROM_PROTO.get(role)
