"""UserService: profiles and account administration."""

from typing import Any

from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc
from google.protobuf import field_mask_pb2

from server.request_context import current_principal
from server.servicers.agent import conversation_to_proto, message_to_proto
from server.servicers.converters import (
    KIND_TO_PROTO,
    ROLE_TO_PROTO,
    feedback_to_proto,
    to_timestamp,
    user_to_proto,
)
from server.servicers.knowledge import document_to_proto
from services.accounts.export import AccountExport, AccountExports
from services.auth.users import (
    NewUser,
    UserChanges,
    UserKind,
    UserService,
    require_user_id,
)
from services.errors import Violations

ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}
KIND_FROM_PROTO = {v: UserKind(k) for k, v in KIND_TO_PROTO.items()}
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


def export_to_proto(export: AccountExport) -> users_pb.ExportCurrentUserResponse:
    return users_pb.ExportCurrentUserResponse(
        user=user_to_proto(export.user),
        conversations=[
            users_pb.ExportedConversation(
                conversation=conversation_to_proto(c.conversation, len(c.messages)),
                messages=[message_to_proto(m) for m in c.messages],
            )
            for c in export.conversations
        ],
        feedback=[feedback_to_proto(f) for f in export.feedback],
        documents=[document_to_proto(d) for d in export.documents],
        exported_at=to_timestamp(export.exported_at),
        truncated=export.truncated,
    )


class UserServicer(users_grpc.UserServiceServicer):
    def __init__(self, users: UserService, exports: AccountExports) -> None:
        self._users = users
        self._exports = exports

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
            current_principal(), user_id, changes_from_proto(request.user, request.update_mask)
        )
        return users_pb.UpdateUserResponse(user=user_to_proto(user))

    async def DeleteUser(
        self, request: users_pb.DeleteUserRequest, context: Any
    ) -> users_pb.DeleteUserResponse:
        await self._users.delete(current_principal(), require_user_id(request.user_id))
        return users_pb.DeleteUserResponse()

    async def CreateUser(
        self, request: users_pb.CreateUserRequest, context: Any
    ) -> users_pb.CreateUserResponse:
        new = NewUser(
            email=request.email,
            full_name=request.full_name,
            role=ROLE_FROM_PROTO.get(request.role),
            kind=KIND_FROM_PROTO.get(request.kind),
        )
        created = await self._users.create(current_principal(), new)
        response = users_pb.CreateUserResponse(user=user_to_proto(created.user))
        if created.invitation is not None:
            response.invitation_token = created.invitation.token
            response.invitation_expires_at.CopyFrom(to_timestamp(created.invitation.expires_at))
        return response

    async def DisableUser(
        self, request: users_pb.DisableUserRequest, context: Any
    ) -> users_pb.DisableUserResponse:
        user = await self._users.set_disabled(
            current_principal(), require_user_id(request.user_id), disabled=True
        )
        return users_pb.DisableUserResponse(user=user_to_proto(user))

    async def EnableUser(
        self, request: users_pb.EnableUserRequest, context: Any
    ) -> users_pb.EnableUserResponse:
        user = await self._users.set_disabled(
            current_principal(), require_user_id(request.user_id), disabled=False
        )
        return users_pb.EnableUserResponse(user=user_to_proto(user))

    async def ExportCurrentUser(
        self, request: users_pb.ExportCurrentUserRequest, context: Any
    ) -> users_pb.ExportCurrentUserResponse:
        return export_to_proto(await self._exports.export(current_principal()))

    async def DeleteCurrentUser(
        self, request: users_pb.DeleteCurrentUserRequest, context: Any
    ) -> users_pb.DeleteCurrentUserResponse:
        await self._users.delete_current(
            current_principal(), current_password=request.current_password
        )
        return users_pb.DeleteCurrentUserResponse()
