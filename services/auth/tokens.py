"""JWT access and refresh tokens (RFC 8725 practices).

The algorithm is pinned here and never read from a token; every token carries `iss`,
`aud`, `exp`, `iat`, `sub`, `jti` and an explicit type in both the `typ` header and the
`token_use` claim, so an access token can never pass as a refresh token or back. An access
token also names its session (`sid`, the refresh-token family it came from), so revoking
a session stops its access tokens at once (services/auth/auth_state.py).
"""

import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import jwt

from services.auth.principal import Role
from services.errors import Unauthenticated

ALGORITHM = "HS256"
ACCESS_TYPE = "at+jwt"  # RFC 9068
REFRESH_TYPE = "rt+jwt"
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti", "token_use"]
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class AccessClaims:
    user_id: uuid.UUID
    role: Role
    token_id: uuid.UUID
    expires_at: datetime
    session_id: uuid.UUID | None = None  # None in tokens issued before sessions were named


@dataclass(frozen=True)
class RefreshClaims:
    user_id: uuid.UUID
    token_id: uuid.UUID
    family_id: uuid.UUID
    expires_at: datetime


@dataclass(frozen=True)
class TokenSettings:
    secret: str
    issuer: str
    audience: str
    access_ttl: timedelta
    refresh_ttl: timedelta
    leeway: timedelta = timedelta(seconds=10)


class TokenCodec:
    """Signs and verifies agentmesh tokens."""

    def __init__(self, settings: TokenSettings, verified_entries: int = 10_000) -> None:
        if len(settings.secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes")
        self._s = settings
        # Access tokens whose signature and claims were verified, by their exact text: a
        # token is the same token on every call, so it is verified once (issue 17). Only
        # its expiry is checked again; whether its account or session still may act is the
        # auth state's to say, on every call (services/auth/auth_state.py).
        self._verified: OrderedDict[str, AccessClaims] = OrderedDict()
        self._verified_entries = verified_entries

    @property
    def access_ttl(self) -> timedelta:
        return self._s.access_ttl

    @property
    def refresh_ttl(self) -> timedelta:
        return self._s.refresh_ttl

    def issue_access(
        self, *, user_id: uuid.UUID, role: Role, session_id: uuid.UUID, now: datetime
    ) -> str:
        claims = {
            "sub": str(user_id),
            "role": role.value,
            "sid": str(session_id),
            "token_use": "access",
        }
        return self._encode(claims, ACCESS_TYPE, now=now, ttl=self._s.access_ttl)

    def issue_refresh(
        self, *, user_id: uuid.UUID, token_id: uuid.UUID, family_id: uuid.UUID, now: datetime
    ) -> str:
        claims = {"sub": str(user_id), "fam": str(family_id), "token_use": "refresh"}
        return self._encode(claims, REFRESH_TYPE, now=now, ttl=self._s.refresh_ttl, jti=token_id)

    def decode_access(self, token: str) -> AccessClaims:
        verified = self._verified.get(token)
        if verified is not None:
            if verified.expires_at + self._s.leeway <= datetime.now(UTC):
                del self._verified[token]
                raise Unauthenticated("token expired", reason="TOKEN_EXPIRED")
            self._verified.move_to_end(token)
            return verified
        claims = self._verify_access(token)
        self._verified[token] = claims
        if len(self._verified) > self._verified_entries:
            self._verified.popitem(last=False)
        return claims

    def _verify_access(self, token: str) -> AccessClaims:
        claims = self._decode(token, ACCESS_TYPE, "access", verify_exp=True)
        try:
            return AccessClaims(
                user_id=uuid.UUID(claims["sub"]),
                role=Role(claims["role"]),
                token_id=uuid.UUID(claims["jti"]),
                expires_at=datetime.fromtimestamp(float(claims["exp"]), UTC),
                session_id=uuid.UUID(claims["sid"]) if "sid" in claims else None,
            )
        except (KeyError, ValueError, TypeError, AttributeError):
            raise Unauthenticated("malformed access token", reason="TOKEN_INVALID") from None

    def decode_refresh(self, token: str, *, verify_exp: bool = True) -> RefreshClaims:
        claims = self._decode(token, REFRESH_TYPE, "refresh", verify_exp=verify_exp)
        try:
            return RefreshClaims(
                user_id=uuid.UUID(claims["sub"]),
                token_id=uuid.UUID(claims["jti"]),
                family_id=uuid.UUID(claims["fam"]),
                expires_at=datetime.fromtimestamp(float(claims["exp"]), UTC),
            )
        except (KeyError, ValueError, TypeError):
            raise Unauthenticated("malformed refresh token", reason="TOKEN_INVALID") from None

    def _encode(
        self,
        claims: dict[str, str],
        typ: str,
        *,
        now: datetime,
        ttl: timedelta,
        jti: uuid.UUID | None = None,
    ) -> str:
        payload = {
            **claims,
            "iss": self._s.issuer,
            "aud": self._s.audience,
            "iat": now,
            "exp": now + ttl,
            "jti": str(jti or uuid.uuid4()),
        }
        return jwt.encode(payload, self._s.secret, algorithm=ALGORITHM, headers={"typ": typ})

    def _decode(self, token: str, typ: str, use: str, *, verify_exp: bool) -> dict[str, str]:
        try:
            decoded = jwt.decode_complete(
                token,
                self._s.secret,
                algorithms=[ALGORITHM],
                audience=self._s.audience,
                issuer=self._s.issuer,
                leeway=self._s.leeway,
                options={"require": REQUIRED_CLAIMS, "verify_exp": verify_exp},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError:
            raise Unauthenticated("invalid token", reason="TOKEN_INVALID") from None
        if decoded["header"].get("typ") != typ or decoded["payload"].get("token_use") != use:
            raise Unauthenticated(f"wrong token type: expected {use}", reason="TOKEN_WRONG_TYPE")
        payload: dict[str, str] = decoded["payload"]
        return payload
