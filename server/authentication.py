"""Who makes a call: the access table's decision for its method and, for a user method,
the principal of its `authorization: Bearer <access token>`.

A valid signature is not enough: the token's account must still exist and be enabled and
its session must not be revoked (`AuthStates`: one cache read per call), and the access
table is checked against the account's current role. SERVICE methods take the service
credential instead, and act for no user. A refusal raises the DomainError the call ends
with (UNAUTHENTICATED or PERMISSION_DENIED); the call pipeline first charges it to the
client's rate limit (server/interceptors.py)."""

import hmac

from server.access import Access
from services.auth.auth_state import AuthStates
from services.auth.principal import Principal
from services.auth.tokens import TokenCodec
from services.errors import PermissionDenied, Unauthenticated


class Authentication:
    def __init__(self, tokens: TokenCodec, states: AuthStates, service_token: str) -> None:
        self._tokens = tokens
        self._states = states
        self._service_token = service_token.encode()

    async def principal(self, access: Access | None, authorization: str | None) -> Principal | None:
        """The caller of a method open to `access`; None for a public or service method."""
        if access is None:
            raise PermissionDenied(
                "this method is not open to any caller", reason="METHOD_NOT_ALLOWED"
            )
        if access is Access.PUBLIC:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("missing bearer token", reason="TOKEN_MISSING")
        if access is Access.SERVICE:
            if not hmac.compare_digest(token.encode(), self._service_token):
                raise Unauthenticated("not the service credential", reason="TOKEN_INVALID")
            return None
        principal = await self._states.principal(self._tokens.decode_access(token))
        if access is Access.ADMIN and not principal.is_admin:
            raise PermissionDenied("this method is for administrators", reason="ADMIN_REQUIRED")
        return principal
