"""AuthService over gRPC: the token lifecycle, token forgery, password policy."""

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import argon2
import grpc
import jwt
import pytest
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from sqlalchemy import select, update

from server.main import Application
from services.auth.models import User
from services.auth.principal import Role
from services.auth.tokens import TokenCodec, TokenSettings
from services.errors import Unauthenticated
from tests.backends import Database
from tests.harness import (
    PASSWORD,
    TEST_JWT_SECRET,
    Account,
    Stubs,
    login,
    new_user,
    running_app,
    unique_email,
)
from tests.rpc_errors import error_info, field_violations

ME = users_pb.GetCurrentUserRequest()


async def me(stubs: Stubs, token: str) -> users_pb.GetCurrentUserResponse:
    return await stubs.users.GetCurrentUser(ME, metadata=(("authorization", f"Bearer {token}"),))


async def expect_code(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == code, raised.value.details()
    return raised.value


async def test_register_login_me_refresh_logout(stubs: Stubs) -> None:
    email = unique_email("flow")
    registered = await stubs.auth.Register(
        auth_pb.RegisterRequest(email=email.upper(), password=PASSWORD, full_name="  Flow User ")
    )
    assert registered.user.email == email  # normalized to lower case
    assert registered.user.full_name == "Flow User"
    assert registered.user.role == user_pb.ROLE_USER
    assert uuid.UUID(registered.user.user_id)

    login_response = await stubs.auth.Login(auth_pb.LoginRequest(email=email, password=PASSWORD))
    assert login_response.token_type == "Bearer"
    assert login_response.expires_in == 900
    assert login_response.refresh_expires_in == 30 * 24 * 3600
    assert login_response.user.user_id == registered.user.user_id

    profile = await me(stubs, login_response.access_token)
    assert profile.user.email == email

    rotated = await stubs.auth.RefreshToken(
        auth_pb.RefreshTokenRequest(refresh_token=login_response.refresh_token)
    )
    assert rotated.refresh_token != login_response.refresh_token
    assert (await me(stubs, rotated.access_token)).user.user_id == registered.user.user_id

    metadata = (("authorization", f"Bearer {rotated.access_token}"),)
    await stubs.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=rotated.refresh_token), metadata=metadata
    )
    error = await expect_code(
        stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=rotated.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "TOKEN_REVOKED"
    # The session's access token stopped with it; logging it out again from another
    # session is not an error.
    revoked = await expect_code(me(stubs, rotated.access_token), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(revoked).reason == "TOKEN_REVOKED"
    other = await login(stubs, email)
    await stubs.auth.Logout(
        auth_pb.LogoutRequest(refresh_token=rotated.refresh_token), metadata=other.metadata
    )


async def test_refresh_token_reuse_revokes_the_family(stubs: Stubs) -> None:
    account = await new_user(stubs, "reuse")
    first = await stubs.auth.RefreshToken(
        auth_pb.RefreshTokenRequest(refresh_token=account.refresh_token)
    )
    second = await stubs.auth.RefreshToken(
        auth_pb.RefreshTokenRequest(refresh_token=first.refresh_token)
    )

    # The stolen, already-exchanged first token is replayed...
    error = await expect_code(
        stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=account.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "REFRESH_TOKEN_REUSED"
    # ...so the newest token of the family stops working too.
    await expect_code(
        stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=second.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    # Another session (another family) of the same user is untouched.
    other = await login(stubs, account.email)
    await stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=other.refresh_token))


async def test_concurrent_refreshes_of_one_token_admit_one(stubs: Stubs) -> None:
    account = await new_user(stubs, "race")
    request = auth_pb.RefreshTokenRequest(refresh_token=account.refresh_token)
    results = await asyncio.gather(
        *(stubs.auth.RefreshToken(request) for _ in range(5)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, auth_pb.RefreshTokenResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert all(e.code() == grpc.StatusCode.UNAUTHENTICATED for e in losers) and len(losers) == 4
    # The documented rule: no grace window, so the losers' replay revoked the family.
    await expect_code(
        stubs.auth.RefreshToken(
            auth_pb.RefreshTokenRequest(refresh_token=winners[0].refresh_token)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )


async def test_logout_all_sessions(stubs: Stubs) -> None:
    first = await new_user(stubs, "everywhere")
    second = await login(stubs, first.email)
    await stubs.auth.Logout(auth_pb.LogoutRequest(all_sessions=True), metadata=first.metadata)
    for account in (first, second):
        await expect_code(
            stubs.auth.RefreshToken(
                auth_pb.RefreshTokenRequest(refresh_token=account.refresh_token)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )


async def test_logout_refuses_another_users_refresh_token(stubs: Stubs) -> None:
    alice, mallory = await new_user(stubs, "alice"), await new_user(stubs, "mallory")
    error = await expect_code(
        stubs.auth.Logout(
            auth_pb.LogoutRequest(refresh_token=alice.refresh_token), metadata=mallory.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "refresh_token" in field_violations(error)
    await stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=alice.refresh_token))


def _access_claims(**overrides: object) -> dict[str, object]:
    """The claims of a well-formed admin access token, with `overrides` applied."""
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": "agentmesh",
        "aud": "agentmesh-api",
        "iat": now,
        "exp": now + 600,
        "jti": str(uuid.uuid4()),
        "token_use": "access",
        "role": "admin",
        **overrides,
    }
    return claims


def _sign(payload: dict[str, object], secret: str = TEST_JWT_SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers={"typ": "at+jwt"})


def _forge(claims: dict[str, object], *, secret: str = TEST_JWT_SECRET) -> str:
    return _sign(_access_claims(**claims), secret)


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _alg_none(claims: dict[str, object]) -> str:
    return f"{_b64({'alg': 'none', 'typ': 'at+jwt'})}.{_b64(_access_claims(**claims))}."


def _without_exp(claims: dict[str, object]) -> str:
    return _sign({k: v for k, v in _access_claims(**claims).items() if k != "exp"})


def _tamper(token: str) -> str:
    """`token` with its payload edited (role → admin) after signing."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "admin"
    return f"{header}.{_b64(claims)}.{signature}"


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("expired", "TOKEN_EXPIRED"),
        ("tampered", "TOKEN_INVALID"),
        ("alg_none", "TOKEN_INVALID"),
        ("wrong_secret", "TOKEN_INVALID"),
        ("refresh_as_access", "TOKEN_WRONG_TYPE"),
        ("wrong_audience", "TOKEN_INVALID"),
        ("wrong_issuer", "TOKEN_INVALID"),
        ("no_exp", "TOKEN_INVALID"),
        ("garbage", "TOKEN_INVALID"),
    ],
)
async def test_bad_access_tokens_are_refused(stubs: Stubs, case: str, reason: str) -> None:
    account = await new_user(stubs, "forger")
    sub: dict[str, object] = {"sub": account.user_id}
    now = int(time.time())
    tokens: dict[str, Callable[[], str]] = {
        "expired": lambda: _forge({**sub, "iat": now - 3600, "exp": now - 1800}),
        "tampered": lambda: _tamper(account.access_token),
        "alg_none": lambda: _alg_none(sub),
        "wrong_secret": lambda: _forge(sub, secret="another-secret-" + "y" * 40),
        "refresh_as_access": lambda: account.refresh_token,
        "wrong_audience": lambda: _forge({**sub, "aud": "someone-else"}),
        "wrong_issuer": lambda: _forge({**sub, "iss": "evil"}),
        "no_exp": lambda: _without_exp(sub),
        "garbage": lambda: "not-a-jwt",
    }
    error = await expect_code(me(stubs, tokens[case]()), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == reason


async def test_a_token_verified_once_still_expires() -> None:
    """Access tokens are verified once and remembered (issue 17); the memory keeps no
    token past its expiry."""
    codec = TokenCodec(
        TokenSettings(
            secret="s" * 32,
            issuer="agentmesh",
            audience="agentmesh",
            access_ttl=timedelta(seconds=1),
            refresh_ttl=timedelta(hours=1),
            leeway=timedelta(0),
        )
    )
    user_id = uuid.uuid4()
    token = codec.issue_access(
        user_id=user_id, role=Role.USER, session_id=uuid.uuid4(), now=datetime.now(UTC)
    )
    assert codec.decode_access(token) == codec.decode_access(token)  # the second from memory
    assert codec.decode_access(token).user_id == user_id
    await asyncio.sleep(1.1)
    with pytest.raises(Unauthenticated) as caught:
        codec.decode_access(token)
    assert caught.value.reason == "TOKEN_EXPIRED"
    with pytest.raises(Unauthenticated):  # and the memory forgot it
        codec.decode_access(token)


async def test_access_token_is_not_a_refresh_token(stubs: Stubs) -> None:
    account = await new_user(stubs, "wrongtype")
    error = await expect_code(
        stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=account.access_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_info(error).reason == "TOKEN_WRONG_TYPE"


async def test_missing_token_is_unauthenticated(stubs: Stubs) -> None:
    error = await expect_code(stubs.users.GetCurrentUser(ME), grpc.StatusCode.UNAUTHENTICATED)
    assert error_info(error).reason == "TOKEN_MISSING"
    error = await expect_code(
        stubs.users.GetCurrentUser(ME, metadata=(("authorization", "Basic dXNlcjpwYXNz"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert error_info(error).domain == "agentmesh"


async def test_registration_validation_carries_field_violations(stubs: Stubs) -> None:
    error = await expect_code(
        stubs.auth.Register(
            auth_pb.RegisterRequest(email="not-an-email", password="short", full_name="x\x07y")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    violations = field_violations(error)
    assert set(violations) == {"email", "password", "full_name"}
    assert any("at least 10 characters" in d for d in violations["password"])
    assert error_info(error).reason == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        ("aaaaaaaaaaaaaaa", "different characters"),
        ("x" * 129 + "abcde", "at most 128"),
        ("{local}-is-my-password", "email"),
    ],
)
async def test_password_policy(stubs: Stubs, password: str, problem: str) -> None:
    email = unique_email("policy")
    password = password.replace("{local}", email.split("@")[0])
    error = await expect_code(
        stubs.auth.Register(auth_pb.RegisterRequest(email=email, password=password)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert any(problem in d for d in field_violations(error)["password"])


async def test_duplicate_email_is_already_exists(stubs: Stubs) -> None:
    account = await new_user(stubs, "dup")
    error = await expect_code(
        stubs.auth.Register(
            auth_pb.RegisterRequest(email=account.email.upper(), password=PASSWORD)
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    assert error_info(error).reason == "EMAIL_TAKEN"


async def test_wrong_password_and_unknown_email_look_alike(stubs: Stubs) -> None:
    account = await new_user(stubs, "login")
    wrong = await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest(email=account.email, password=PASSWORD + "!")),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    unknown = await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest(email=unique_email("ghost"), password=PASSWORD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert wrong.details() == unknown.details()
    assert error_info(wrong).reason == error_info(unknown).reason == "INVALID_CREDENTIALS"
    # Emails are matched in the canonical form they were stored in.
    await login(stubs, f"  {account.email.upper()} ")
    empty = await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest()), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert set(field_violations(empty)) == {"email", "password"}


async def test_change_password_revokes_sessions(stubs: Stubs) -> None:
    account: Account = await new_user(stubs, "changer")
    error = await expect_code(
        stubs.auth.ChangePassword(
            auth_pb.ChangePasswordRequest(
                current_password="wrong password!", new_password="a new good passphrase"
            ),
            metadata=account.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert error_info(error).reason == "WRONG_PASSWORD"
    await stubs.auth.ChangePassword(
        auth_pb.ChangePasswordRequest(
            current_password=PASSWORD, new_password="a new good passphrase"
        ),
        metadata=account.metadata,
    )
    await expect_code(
        stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=account.refresh_token)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await expect_code(
        stubs.auth.Login(auth_pb.LoginRequest(email=account.email, password=PASSWORD)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    await login(stubs, account.email, "a new good passphrase")


async def test_revocation_and_sessions_survive_a_restart(
    database: Database, tmp_path: Path
) -> None:
    """Revocation lives in the database: a restarted server still refuses a revoked
    refresh token, and still honours the live ones (same secret, same database)."""
    async with running_app(database.url, tmp_path) as (_, stubs):
        revoked, live = await new_user(stubs, "restart"), await new_user(stubs, "survivor")
        await stubs.auth.Logout(
            auth_pb.LogoutRequest(refresh_token=revoked.refresh_token), metadata=revoked.metadata
        )

    async with running_app(database.url, tmp_path) as (_, stubs):
        await expect_code(
            stubs.auth.RefreshToken(
                auth_pb.RefreshTokenRequest(refresh_token=revoked.refresh_token)
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        await stubs.auth.RefreshToken(auth_pb.RefreshTokenRequest(refresh_token=live.refresh_token))
        assert (await me(stubs, live.access_token)).user.user_id == live.user_id


async def test_login_upgrades_weak_password_hashes(app: Application, stubs: Stubs) -> None:
    account = await new_user(stubs, "legacy")
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash(PASSWORD)
    async with app.domain.sessions.begin() as s:
        await s.execute(update(User).where(User.email == account.email).values(password_hash=weak))

    await login(stubs, account.email)

    async with app.domain.sessions() as s:
        stored = await s.scalar(select(User.password_hash).where(User.email == account.email))
    assert stored is not None and stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    await login(stubs, account.email)  # the upgraded hash verifies
