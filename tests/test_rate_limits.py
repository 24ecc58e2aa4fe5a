"""Rate limiting through the real server: per user, per client IP, stricter for the
credential RPCs, in process and on the real Redis (including Redis going away mid-test),
and HTTP 429 through Envoy."""

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb

from server.rate_limits import ClientAddress
from services.auth.principal import Role
from services.auth.tokens import TokenCodec, TokenSettings
from tests.harness import PASSWORD, TEST_JWT_SECRET, Account, Stubs, envoy_for, login, new_user
from tests.limited import REDIS_URL, exhausted, limited_app, redis_up
from tests.rpc_errors import quota_violations, retry_delay
from tests.tcp_proxy import proxy_to


async def me(stubs: Stubs, account: Account) -> None:
    await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=account.metadata)


async def refused(call: Any) -> grpc.aio.AioRpcError:
    return await exhausted(call, "RATE_LIMITED")


@pytest.mark.parametrize("store", ["in_process", "redis"])
async def test_a_user_over_the_limit_is_refused_with_retry_info(tmp_path: Path, store: str) -> None:
    extra = {}
    if store == "redis":
        await redis_up()
        extra["redis_url"] = REDIS_URL
    async with limited_app(tmp_path, rate_limit_per_user=5, **extra) as (_, stubs):
        user, other = await new_user(stubs), await new_user(stubs)
        for _ in range(5):
            await me(stubs, user)
        error = await refused(me(stubs, user))
        assert 0 < retry_delay(error) <= 60
        assert [subject for subject, _ in quota_violations(error)] == [f"user:{user.user_id}"]
        await me(stubs, other)  # another user has a window of their own


async def test_redis_limit_is_exact_under_concurrency(tmp_path: Path) -> None:
    await redis_up()
    async with limited_app(
        tmp_path, redis_url=REDIS_URL, rate_limit_per_user=50, rate_limit_timeout_seconds=2.0
    ) as (_, stubs):
        user = await new_user(stubs)
        results = await asyncio.gather(
            *(me(stubs, user) for _ in range(200)), return_exceptions=True
        )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(errors) == 50
    assert {e.code() for e in errors if isinstance(e, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.RESOURCE_EXHAUSTED
    }
    assert len(errors) == 150


async def test_the_ip_limit_covers_every_user_behind_it(tmp_path: Path) -> None:
    async with limited_app(tmp_path, rate_limit_per_ip=6) as (_, stubs):
        alice, bob = await new_user(stubs), await new_user(stubs)  # credential RPCs: own window
        for account in (alice, bob, alice, bob, alice, bob):
            await me(stubs, account)
        error = await refused(me(stubs, bob))
        assert [subject for subject, _ in quota_violations(error)] == ["ip:127.0.0.1"]


async def test_credential_rpcs_have_a_stricter_window(tmp_path: Path) -> None:
    async with limited_app(tmp_path, rate_limit_credentials_per_ip=3) as (app, stubs):
        email = f"guess-{uuid.uuid4().hex[:8]}@example.com"
        await app.domain.auth.register(email=email, password=PASSWORD, full_name="Target")
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stubs.auth.Login(auth_pb.LoginRequest(email=email, password="x" * 12))
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Even the right password waits now: guessing is what this window stops.
        await refused(login(stubs, email))


async def test_rest_clients_get_429_and_cannot_spoof_their_address(tmp_path: Path) -> None:
    async with limited_app(tmp_path, rate_limit_per_ip=2) as (app, stubs):
        sidecar = envoy_for(app, tmp_path / "envoy")
        await sidecar.start()
        try:
            user = await new_user(stubs)
            async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{sidecar.port}") as rest:

                async def get(claimed_ip: str) -> tuple[int, Any]:
                    headers = {
                        "authorization": f"Bearer {user.access_token}",
                        "x-forwarded-for": claimed_ip,
                    }
                    async with rest.get("/v1/users/me", headers=headers) as response:
                        return response.status, await response.json()

                assert [(await get("203.0.113.7"))[0] for _ in range(2)] == [200, 200]
                status, body = await get("203.0.113.7")
                assert status == 429
                details = {d["@type"].rsplit(".", 1)[-1]: d for d in body["details"]}
                assert "RetryInfo" in details
                subject = details["QuotaFailure"]["violations"][0]["subject"]
                # Envoy appends the address it really saw, and that one counts: a client
                # claiming another address in x-forwarded-for gets no fresh window.
                assert subject.startswith("ip:") and subject != "ip:203.0.113.7"
                status, body = await get("198.51.100.9")
                assert status == 429
                again = {d["@type"].rsplit(".", 1)[-1]: d for d in body["details"]}
                assert again["QuotaFailure"]["violations"][0]["subject"] == subject
        finally:
            await sidecar.stop()


async def test_a_trusted_proxys_forwarded_address_is_the_client(tmp_path: Path) -> None:
    # A direct gRPC caller on loopback is a trusted proxy by default: what it forwards counts.
    async with limited_app(tmp_path, rate_limit_per_ip=1) as (_, stubs):
        user = await new_user(stubs)

        async def me_as(client_ip: str) -> None:
            await stubs.users.GetCurrentUser(
                users_pb.GetCurrentUserRequest(),
                metadata=(*user.metadata, ("x-forwarded-for", client_ip)),
            )

        await me_as("198.51.100.4")
        await me_as("198.51.100.5")  # another client behind the proxy
        error = await refused(me_as("198.51.100.4"))
        assert [subject for subject, _ in quota_violations(error)] == ["ip:198.51.100.4"]


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    addresses = ClientAddress(("127.0.0.0/8", "10.0.0.0/8"))
    assert addresses.of("ipv4:127.0.0.1:5555", "198.51.100.4, 10.1.2.3") == "198.51.100.4"
    assert addresses.of("ipv4:127.0.0.1:5555", "1.1.1.1, 198.51.100.4") == "198.51.100.4"
    assert addresses.of("ipv4:203.0.113.9:5555", "198.51.100.4") == "203.0.113.9"
    assert addresses.of("ipv6:[2001:db8::1]:443", None) == "2001:db8::1"
    assert addresses.of("ipv4:127.0.0.1:1", "10.0.0.1") == "10.0.0.1"  # only proxies seen


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_going_away_follows_the_setting_and_recovers(
    tmp_path: Path, fail_open: bool
) -> None:
    await redis_up()
    async with (
        proxy_to(REDIS_URL, 6379) as proxy,
        limited_app(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            rate_limit_per_user=3,
            rate_limit_fail_open=fail_open,
        ) as (app, stubs),
    ):
        user = await new_user(stubs)
        for _ in range(3):
            await me(stubs, user)
        await refused(me(stubs, user))

        await proxy.stop()
        if fail_open:  # admitted without a decision, counted
            for _ in range(3):
                await me(stubs, user)
            assert app.domain.limiter.failures >= 3
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
            ):
                scrape = await response.text()
            counted = re.search(
                r"^agentmesh_rate_limit_decision_failures_total (\S+)$", scrape, re.M
            )
            assert counted is not None and float(counted.group(1)) >= 3
        else:  # refused without a decision: not RATE_LIMITED, no QuotaFailure
            error = await exhausted(me(stubs, user), "RATE_LIMITER_UNAVAILABLE")
            assert retry_delay(error) > 0

        await proxy.start()  # Redis is back: the same window is enforced again
        await refused(me(stubs, user))


def from_ip(address: str) -> tuple[tuple[str, str], ...]:
    """Metadata of a call a trusted proxy forwards for `address` (tests run on loopback)."""
    return (("x-forwarded-for", address),)


@pytest.mark.parametrize("store", ["in_process", "redis"])
async def test_guessing_one_accounts_password_from_many_addresses_is_throttled(
    tmp_path: Path, store: str
) -> None:
    extra: dict[str, Any] = {}
    if store == "redis":
        await redis_up()
        extra["redis_url"] = REDIS_URL
    async with limited_app(
        tmp_path, rate_limit_credentials_per_ip=100, rate_limit_credentials_per_account=3, **extra
    ) as (app, stubs):
        email = f"Target-{uuid.uuid4().hex[:8]}@Example.com"
        await app.domain.auth.register(email=email, password=PASSWORD, full_name="Target")
        bystander = await new_user(stubs)
        for n in range(3):  # each from an address of its own, the per-IP window never fills
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await stubs.auth.Login(
                    auth_pb.LoginRequest(email=email, password="x" * 12),
                    metadata=from_ip(f"198.51.100.{n}"),
                )
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The same account however it is spelled, from yet another address, even with the
        # right password: the account's window is full.
        error = await refused(
            stubs.auth.Login(
                auth_pb.LoginRequest(email=f"  {email.lower()} ", password=PASSWORD),
                metadata=from_ip("203.0.113.50"),
            )
        )
        assert 0 < retry_delay(error) <= 60
        [(subject, _)] = quota_violations(error)
        assert subject.startswith("account:") and "target" not in subject.lower()
        # Other accounts are not affected, from the same addresses.
        await stubs.auth.Login(
            auth_pb.LoginRequest(email=bystander.email, password=PASSWORD),
            metadata=from_ip("198.51.100.0"),
        )
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
        ):
            scrape = await response.text()
        assert re.search(r'^agentmesh_rate_limited_total\{scope="account"\} 1\.0$', scrape, re.M)
        assert "target-" not in scrape.lower()
        if store == "redis":
            assert app.domain.limiter_redis is not None
            keys = await app.domain.limiter_redis.keys(f"{app.settings.redis_key_prefix}*")
            assert keys and not any(b"target" in key.lower() for key in keys)


async def test_password_changes_are_limited_per_account(tmp_path: Path) -> None:
    async with limited_app(tmp_path, rate_limit_credentials_per_account=2) as (_, stubs):
        user = await new_user(stubs)
        wrong = auth_pb.ChangePasswordRequest(
            current_password="not the password", new_password="another passphrase entirely"
        )
        for n in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stubs.auth.ChangePassword(
                    wrong, metadata=(*user.metadata, *from_ip(f"198.51.100.{n}"))
                )
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        error = await refused(
            stubs.auth.ChangePassword(wrong, metadata=(*user.metadata, *from_ip("203.0.113.9")))
        )
        assert [subject for subject, _ in quota_violations(error)] == [
            f"account:user:{user.user_id}"
        ]


def expired_token() -> str:
    """An access token signed with the test key that expired an hour ago."""
    codec = TokenCodec(
        TokenSettings(
            secret=TEST_JWT_SECRET,
            issuer="agentmesh",
            audience="agentmesh-api",
            access_ttl=timedelta(minutes=15),
            refresh_ttl=timedelta(days=1),
        )
    )
    past = datetime.now(UTC) - timedelta(hours=2)
    return codec.issue_access(
        user_id=uuid.uuid4(), role=Role.USER, session_id=uuid.uuid4(), now=past
    )


BAD_TOKENS = {
    "missing": (),
    "invalid": (("authorization", "Bearer not-a-token"),),
    "expired": (("authorization", f"Bearer {expired_token()}"),),
}


@pytest.mark.parametrize("store", ["in_process", "redis"])
async def test_a_flood_of_bad_tokens_is_limited_per_address(tmp_path: Path, store: str) -> None:
    extra: dict[str, Any] = {}
    if store == "redis":
        await redis_up()
        extra["redis_url"] = REDIS_URL
    async with limited_app(tmp_path, rate_limit_per_ip=20, **extra) as (app, stubs):
        user = await new_user(stubs)
        kinds = list(BAD_TOKENS.values())
        results = await asyncio.gather(
            *(
                stubs.users.GetCurrentUser(
                    users_pb.GetCurrentUserRequest(),
                    metadata=(*kinds[n % len(kinds)], *from_ip("203.0.113.66")),
                )
                for n in range(60)
            ),
            return_exceptions=True,
        )
        codes = [r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(codes) == 60
        assert codes.count(grpc.StatusCode.UNAUTHENTICATED) == 20
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 40
        error = await refused(
            stubs.users.GetCurrentUser(
                users_pb.GetCurrentUserRequest(), metadata=from_ip("203.0.113.66")
            )
        )
        assert 0 < retry_delay(error) <= 60
        assert [subject for subject, _ in quota_violations(error)] == ["ip:203.0.113.66"]
        # The window is the address's: a valid token from there is refused too, and other
        # addresses are untouched.
        await refused(
            stubs.users.GetCurrentUser(
                users_pb.GetCurrentUserRequest(),
                metadata=(*user.metadata, *from_ip("203.0.113.66")),
            )
        )
        await stubs.users.GetCurrentUser(
            users_pb.GetCurrentUserRequest(), metadata=(*user.metadata, *from_ip("203.0.113.67"))
        )
        assert app.domain.limiter.failures == 0


@pytest.mark.parametrize("credentials_fail_open", [False, True])
async def test_credential_rpcs_fail_closed_while_redis_is_away(
    tmp_path: Path, credentials_fail_open: bool
) -> None:
    await redis_up()
    async with (
        proxy_to(REDIS_URL, 6379) as proxy,
        limited_app(
            tmp_path,
            redis_url=f"redis://127.0.0.1:{proxy.port}/0",
            rate_limit_fail_open=True,
            rate_limit_credentials_fail_open=credentials_fail_open,
        ) as (_, stubs),
    ):
        user = await new_user(stubs)
        await me(stubs, user)

        await proxy.stop()
        await me(stubs, user)  # ordinary calls follow RATE_LIMIT_FAIL_OPEN: admitted
        if credentials_fail_open:
            await login(stubs, user.email)
        else:  # no password can be tried while nothing counts the tries
            for call in (
                login(stubs, user.email),
                stubs.auth.RefreshToken(
                    auth_pb.RefreshTokenRequest(refresh_token=user.refresh_token)
                ),
            ):
                error = await exhausted(call, "RATE_LIMITER_UNAVAILABLE")
                assert retry_delay(error) > 0

        await proxy.start()  # Redis is back: signing in works again at once
        await login(stubs, user.email)
