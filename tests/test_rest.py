"""The REST/JSON API through a real Envoy (grpc_json_transcoder), and gRPC through it."""

import json
from typing import Any

import aiohttp
import pytest
from agentmesh.auth.v1 import user_service_pb2 as users_pb

from server.envoy import EnvoySidecar
from server.main import SERVICE_NAMES, Application
from tests.harness import PASSWORD, Stubs, new_admin, unique_email

JSON = dict[str, Any]


async def call(
    rest: aiohttp.ClientSession,
    method: str,
    path: str,
    body: JSON | None = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, JSON, Any]:
    all_headers = {**(headers or {})}
    if token:
        all_headers["authorization"] = f"Bearer {token}"
    async with rest.request(method, path, json=body, headers=all_headers) as response:
        text = await response.text()
        return response.status, (json.loads(text) if text else {}), response.headers


def details_of(body: JSON, type_suffix: str) -> JSON:
    return next(d for d in body["details"] if d["@type"].endswith(type_suffix))


async def test_account_flow_over_rest(rest: aiohttp.ClientSession) -> None:
    email = unique_email("rest")
    status, body, _ = await call(
        rest,
        "POST",
        "/v1/auth/register",
        {"email": email, "password": PASSWORD, "full_name": "Rest"},
    )
    assert status == 200 and body["user"]["email"] == email and body["user"]["role"] == "ROLE_USER"

    status, tokens, _ = await call(
        rest, "POST", "/v1/auth/login", {"email": email, "password": PASSWORD}
    )
    assert status == 200 and tokens["token_type"] == "Bearer" and tokens["expires_in"] == 900

    status, body, headers = await call(rest, "GET", "/v1/users/me", token=tokens["access_token"])
    assert status == 200 and body["user"]["email"] == email and headers["x-request-id"]

    status, body, _ = await call(
        rest, "PATCH", "/v1/users/me", {"full_name": "Renamed"}, token=tokens["access_token"]
    )
    assert status == 200 and body["user"]["full_name"] == "Renamed"

    status, rotated, _ = await call(
        rest, "POST", "/v1/auth/refresh", {"refresh_token": tokens["refresh_token"]}
    )
    assert status == 200 and rotated["refresh_token"] != tokens["refresh_token"]

    status, body, _ = await call(
        rest,
        "POST",
        "/v1/auth/logout",
        {"refresh_token": rotated["refresh_token"]},
        token=rotated["access_token"],
    )
    assert status == 200 and body == {}
    status, body, _ = await call(
        rest, "POST", "/v1/auth/refresh", {"refresh_token": rotated["refresh_token"]}
    )
    assert status == 401 and details_of(body, "ErrorInfo")["reason"] == "TOKEN_REVOKED"


async def test_validation_errors_are_400_with_field_violations(rest: aiohttp.ClientSession) -> None:
    status, body, _ = await call(
        rest, "POST", "/v1/auth/register", {"email": "nope", "password": "short"}
    )
    assert status == 400
    assert body["code"] == 3
    fields = {v["field"] for v in details_of(body, "BadRequest")["field_violations"]}
    assert fields == {"email", "password"}
    assert details_of(body, "ErrorInfo") == {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": "INVALID_ARGUMENT",
        "domain": "agentmesh",
        "metadata": {},
    }


async def test_unauthenticated_forbidden_and_not_found(
    app: Application, stubs: Stubs, rest: aiohttp.ClientSession
) -> None:
    status, body, _ = await call(rest, "GET", "/v1/users/me")
    assert status == 401 and body["code"] == 16

    status, tokens, _ = await call(
        rest, "POST", "/v1/auth/login", {"email": "x@example.com", "password": "wrong one!"}
    )
    assert status == 401

    email = unique_email("restuser")
    await call(rest, "POST", "/v1/auth/register", {"email": email, "password": PASSWORD})
    _, tokens, _ = await call(
        rest, "POST", "/v1/auth/login", {"email": email, "password": PASSWORD}
    )
    status, body, _ = await call(rest, "GET", "/v1/users", token=tokens["access_token"])
    assert status == 403 and details_of(body, "ErrorInfo")["reason"] == "ADMIN_REQUIRED"

    admin = await new_admin(app, stubs)
    status, body, _ = await call(
        rest, "GET", "/v1/users/00000000-0000-0000-0000-000000000000", token=admin.access_token
    )
    assert status == 404 and body["code"] == 5
    status, body, _ = await call(rest, "GET", "/v1/users?page_size=1", token=admin.access_token)
    assert status == 200 and len(body["users"]) == 1 and body["next_page_token"]


async def test_unknown_paths_and_parameters_are_rejected(rest: aiohttp.ClientSession) -> None:
    status, body, _ = await call(rest, "GET", "/v1/no/such/thing")
    assert status == 404 and body == {
        "code": 5,
        "message": "Could not resolve /v1/no/such/thing to a method.",
    }
    status, body, _ = await call(rest, "GET", "/v1/users/me?debug=true")
    assert status == 400 and body["code"] == 3 and "debug" in body["message"]


async def test_health_endpoint(rest: aiohttp.ClientSession) -> None:
    status, body, _ = await call(rest, "GET", "/health")
    assert status == 200
    assert body["status"] == "SERVING"
    assert body["services"] == dict.fromkeys(SERVICE_NAMES, "SERVING")


async def test_request_id_from_client_is_kept(rest: aiohttp.ClientSession) -> None:
    status, _, headers = await call(
        rest, "GET", "/v1/users/me", headers={"x-request-id": "rest-trace-7"}
    )
    assert status == 401 and headers["x-request-id"] == "rest-trace-7"


@pytest.mark.parametrize(
    ("origin", "allowed"), [("https://app.example.com", True), ("https://evil.example.net", False)]
)
async def test_cors(rest: aiohttp.ClientSession, origin: str, allowed: bool) -> None:
    headers = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    async with rest.options("/v1/auth/login", headers=headers) as response:
        allow_origin = response.headers.get("access-control-allow-origin")
    if allowed:
        assert allow_origin == origin
    else:
        assert allow_origin is None


async def test_grpc_passes_through_the_same_listener(envoy: EnvoySidecar, stubs: Stubs) -> None:
    through_envoy = Stubs.connect(f"127.0.0.1:{envoy.port}")
    try:
        email = unique_email("via-envoy")
        from agentmesh.auth.v1 import auth_service_pb2 as auth_pb

        await through_envoy.auth.Register(auth_pb.RegisterRequest(email=email, password=PASSWORD))
        tokens = await through_envoy.auth.Login(
            auth_pb.LoginRequest(email=email, password=PASSWORD)
        )
        me = await through_envoy.users.GetCurrentUser(
            users_pb.GetCurrentUserRequest(),
            metadata=(("authorization", f"Bearer {tokens.access_token}"),),
        )
        assert me.user.email == email
    finally:
        await through_envoy.channel.close()
