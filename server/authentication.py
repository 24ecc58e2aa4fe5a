"""Who makes a call: the access table's decision for its method and, for a user method,
the principal of its `authorization: Bearer <credential>`: an access token or an API key.

One credential path for both. An API key (`am_...`, services/auth/api_keys.py) stands for
its owner: it is checked (known, right secret, not revoked, not expired) and then, as for
a token, its account must still exist and be enabled, and the access table is checked
against the account's current role (`AuthStates`: one cache read per call). A key may
also be limited by the method's key use (server/access.py): a read-only key calls only the
methods that change nothing, and no key manages credentials (keys, the password).

A valid token signature is not enough either: its session must not be revoked. SERVICE
methods take the service credential instead, and act for no user. A refusal raises the
DomainError the call ends with (UNAUTHENTICATED or PERMISSION_DENIED); the call pipeline
first charges it to the client's rate limit (server/interceptors.py)."""

import hmac

from server.access import Access, KeyUse
from services.auth.api_keys import KeyCredentials, is_api_key
from services.auth.auth_state import AuthStates
from services.auth.principal import Principal
from services.auth.tokens import TokenCodec
from services.errors import PermissionDenied, Unauthenticated


class Authentication:
    def __init__(
        self,
        tokens: TokenCodec,
        states: AuthStates,
        service_token: str,
        keys: KeyCredentials | None = None,
    ) -> None:
        self._tokens = tokens
        self._states = states
        self._service_token = service_token.encode()
        self._keys = keys  # None: API keys are not accepted

    async def principal(
        self,
        access: Access | None,
        authorization: str | None,
        key_use: KeyUse = KeyUse.WRITE,
    ) -> Principal | None:
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
        if self._keys is not None and is_api_key(token):
            principal = await self._keys.principal(token)
            _check_key_use(principal, key_use)
        else:
            principal = await self._states.principal(self._tokens.decode_access(token))
        if access is Access.ADMIN and not principal.is_admin:
            raise PermissionDenied("this method is for administrators", reason="ADMIN_REQUIRED")
        return principal


def _check_key_use(principal: Principal, key_use: KeyUse) -> None:
    if key_use is KeyUse.TOKEN_ONLY:
        raise PermissionDenied(
            "this method needs an access token, not an API key", reason="API_KEY_NOT_ALLOWED"
        )
    if key_use is KeyUse.WRITE and principal.read_only:
        raise PermissionDenied("this API key is read-only", reason="API_KEY_READ_ONLY")
