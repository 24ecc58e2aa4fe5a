"""AuthService: registration, login and the token lifecycle."""

from typing import Any

from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc

from server.request_context import current_principal
from server.servicers.converters import user_to_proto
from services.auth.invitations import Invitations
from services.auth.service import AuthService, TokenPair

TOKEN_TYPE = "Bearer"


def _token_fields(pair: TokenPair) -> dict[str, Any]:
    return {
        "access_token": pair.access_token,
        "refresh_token": pair.refresh_token,
        "token_type": TOKEN_TYPE,
        "expires_in": pair.expires_in,
        "refresh_expires_in": pair.refresh_expires_in,
    }


class AuthServicer(auth_grpc.AuthServiceServicer):
    def __init__(self, auth: AuthService, invitations: Invitations) -> None:
        self._auth = auth
        self._invitations = invitations

    async def Register(
        self, request: auth_pb.RegisterRequest, context: Any
    ) -> auth_pb.RegisterResponse:
        user = await self._auth.register(
            email=request.email, password=request.password, full_name=request.full_name
        )
        return auth_pb.RegisterResponse(user=user_to_proto(user))

    async def Login(self, request: auth_pb.LoginRequest, context: Any) -> auth_pb.LoginResponse:
        pair = await self._auth.login(email=request.email, password=request.password)
        return auth_pb.LoginResponse(**_token_fields(pair), user=user_to_proto(pair.user))

    async def RefreshToken(
        self, request: auth_pb.RefreshTokenRequest, context: Any
    ) -> auth_pb.RefreshTokenResponse:
        pair = await self._auth.refresh(refresh_token=request.refresh_token)
        return auth_pb.RefreshTokenResponse(**_token_fields(pair))

    async def Logout(self, request: auth_pb.LogoutRequest, context: Any) -> auth_pb.LogoutResponse:
        await self._auth.logout(
            current_principal(),
            refresh_token=request.refresh_token,
            all_sessions=request.all_sessions,
        )
        return auth_pb.LogoutResponse()

    async def ChangePassword(
        self, request: auth_pb.ChangePasswordRequest, context: Any
    ) -> auth_pb.ChangePasswordResponse:
        await self._auth.change_password(
            current_principal(),
            current_password=request.current_password,
            new_password=request.new_password,
        )
        return auth_pb.ChangePasswordResponse()

    async def AcceptInvitation(
        self, request: auth_pb.AcceptInvitationRequest, context: Any
    ) -> auth_pb.AcceptInvitationResponse:
        pair = await self._invitations.accept(
            token=request.invitation_token, password=request.password
        )
        return auth_pb.AcceptInvitationResponse(
            **_token_fields(pair), user=user_to_proto(pair.user)
        )
