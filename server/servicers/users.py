"""UserService: profiles and account administration."""

from typing import Any

from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc
from google.protobuf import field_mask_pb2

from server.request_context import current_principal
from server.servicers.converters import ROLE_TO_PROTO, user_to_proto
from services.auth.users import UserChanges, UserService, require_user_id
from services.errors import Violations

ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
MASKABLE = ("full_name", "email", "role")


def changes_from_proto(user: user_pb.User, mask: field_mask_pb2.FieldMask) -> UserChanges:
    """The changes a field mask asks for. An empty mask means every populated field
    (AIP-134), which lets REST clients PATCH with just a body."""
    paths = list(mask.paths) or [
        name
        for name, value in (
            ("full_name", user.full_name),
            ("email", user.email),
            ("role", user.role),
        )
        if value
    ]
    violations = Violations()
    for path in paths:
        if path not in MASKABLE:
            violations.add("update_mask", f"unknown or read-only field: {path}")
    if "role" in paths and user.role not in ROLE_FROM_PROTO:
        violations.add("user.role", "must be ROLE_USER or ROLE_ADMIN")
    violations.raise_if_any()
    return UserChanges(
        full_name=user.full_name if "full_name" in paths else None,
        email=user.email if "email" in paths else None,
        role=ROLE_FROM_PROTO[user.role] if "role" in paths else None,
    )


class UserServicer(users_grpc.UserServiceServicer):
    def __init__(self, users: UserService) -> None:
        self._users = users

    async def GetCurrentUser(
        self, request: users_pb.GetCurrentUserRequest, context: Any
    ) -> users_pb.GetCurrentUserResponse:
        user = await self._users.get_current(current_principal())
        return users_pb.GetCurrentUserResponse(user=user_to_proto(user))

    async def UpdateCurrentUser(
        self, request: users_pb.UpdateCurrentUserRequest, context: Any
    ) -> users_pb.UpdateCurrentUserResponse:
        changes = changes_from_proto(request.user, request.update_mask)
        user = await self._users.update_current(current_principal(), changes)
        return users_pb.UpdateCurrentUserResponse(user=user_to_proto(user))

    async def ListUsers(
        self, request: users_pb.ListUsersRequest, context: Any
    ) -> users_pb.ListUsersResponse:
        page = await self._users.list(
            requested_page_size=request.page_size, page_token=request.page_token
        )
        return users_pb.ListUsersResponse(
            users=[user_to_proto(u) for u in page.users], next_page_token=page.next_page_token
        )

    async def GetUser(
        self, request: users_pb.GetUserRequest, context: Any
    ) -> users_pb.GetUserResponse:
        user = await self._users.get(require_user_id(request.user_id))
        return users_pb.GetUserResponse(user=user_to_proto(user))

    async def UpdateUser(
        self, request: users_pb.UpdateUserRequest, context: Any
    ) -> users_pb.UpdateUserResponse:
        user_id = require_user_id(request.user.user_id, field="user.user_id")
        user = await self._users.update(
            user_id, changes_from_proto(request.user, request.update_mask)
        )
        return users_pb.UpdateUserResponse(user=user_to_proto(user))

    async def DeleteUser(
        self, request: users_pb.DeleteUserRequest, context: Any
    ) -> users_pb.DeleteUserResponse:
        await self._users.delete(require_user_id(request.user_id))
        return users_pb.DeleteUserResponse()
