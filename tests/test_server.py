"""The server's cross-cutting behaviour: the access table, error mapping, request ids,
health and reflection."""

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from sqlalchemy import text

from server.a2a_descriptors import SERVICE as A2A_SERVICE
from server.access import RPC_ACCESS, Access
from server.logs import RequestContextFilter
from server.main import SERVICE_NAMES, Application, build_application
from server.served import INDEXING
from services.db import create_engine
from tests.backends import Database
from tests.harness import (
    PASSWORD,
    Stubs,
    new_user,
    running_app,
    settings_for,
    unique_email,
)
from tests.rpc_errors import error_info
from tests.test_auth import expect_code


def _all_methods() -> set[str]:
    pool = descriptor_pool.Default()
    return {
        f"/{name}/{method.name}"
        # The public services, the agent over A2A (issue 22) and the internal one.
        for name in [*SERVICE_NAMES, A2A_SERVICE, INDEXING.name]
        for method in pool.FindServiceByName(name).methods
    }


def test_every_rpc_is_in_the_access_table_and_nothing_else() -> None:
    assert _all_methods() == set(RPC_ACCESS)
    public = {m for m, access in RPC_ACCESS.items() if access is Access.PUBLIC}
    assert public == {
        "/agentmesh.auth.v1.AuthService/Register",
        "/agentmesh.auth.v1.AuthService/Login",
        "/agentmesh.auth.v1.AuthService/RefreshToken",
        "/agentmesh.auth.v1.AuthService/AcceptInvitation",
    }


async def test_a_method_missing_from_the_access_table_is_refused(
    database: Database, tmp_path: Path
) -> None:
    calls: list[bytes] = []

    def ping(request: bytes, context: object) -> bytes:
        calls.append(request)
        return b"pong"

    app = build_application(settings_for(database.url, tmp_path))
    app.server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.v1.Probe", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
            ),
        )
    )
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                probe: Any = channel.unary_unary("/test.v1.Probe/Ping")
                await probe(b"ping")
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(raised.value).reason == "METHOD_NOT_ALLOWED"
        assert calls == []
    finally:
        await app.stop(grace=0)


async def test_unexpected_failures_are_internal_without_details(
    database: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A table vanishing under a running server makes queries fail inside SQLAlchemy: the
    client gets a generic INTERNAL (never UNKNOWN, never the SQL), the log gets the traceback."""
    empty = Database(database.backend, tmp_path / "db")
    await empty.create()
    await empty.migrate()
    try:
        async with running_app(empty.url, tmp_path / "data") as (_, stubs):
            engine = create_engine(empty.url)
            async with engine.begin() as connection:
                await connection.execute(text("ALTER TABLE users RENAME TO users_gone"))
            await engine.dispose()
            with caplog.at_level(logging.ERROR, logger="agentmesh.rpc"):
                error = await expect_code(
                    stubs.auth.Register(
                        auth_pb.RegisterRequest(email=unique_email(), password=PASSWORD)
                    ),
                    grpc.StatusCode.INTERNAL,
                )
    finally:
        await empty.drop()
    assert error.details() == "internal error; see the server log for this request id"
    assert error_info(error).reason == "INTERNAL"
    assert "users" not in (error.details() or "")
    assert "Traceback" not in (error.debug_error_string() or "")
    failure = next(r for r in caplog.records if r.getMessage().startswith("unhandled error"))
    assert failure.exc_info is not None


async def test_request_ids_are_echoed(stubs: Stubs) -> None:
    user = await new_user(stubs, "traced")
    call = stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(),
        metadata=(*user.metadata, ("x-request-id", "client-chosen-42")),
    )
    await call
    assert dict(await call.initial_metadata())["x-request-id"] == "client-chosen-42"

    # An unsafe id (log injection) is replaced by a generated one.
    call = stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(),
        metadata=(*user.metadata, ("x-request-id", "bad id {INJECTED}")),
    )
    await call
    echoed = dict(await call.initial_metadata())["x-request-id"]
    assert uuid.UUID(hex=str(echoed))

    # Failed calls carry the id too, so a client can quote it: in the trailers, since a call
    # refused before its answer sends no headers (see server/request_log.py).
    failed = stubs.users.GetCurrentUser(
        users_pb.GetCurrentUserRequest(), metadata=(("x-request-id", "failing-1"),)
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await failed
    assert dict(await failed.trailing_metadata())["x-request-id"] == "failing-1"


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_rpc_log_lines_carry_request_user_and_code(
    stubs: Stubs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentmesh.rpc")
    handler = RecordingHandler()
    records = handler.records
    handler.addFilter(RequestContextFilter())  # as the production handler does
    rpc_log = logging.getLogger("agentmesh.rpc")
    rpc_log.addHandler(handler)
    user = await new_user(stubs, "logged")
    try:
        await stubs.users.GetCurrentUser(
            users_pb.GetCurrentUserRequest(),
            metadata=(*user.metadata, ("x-request-id", "log-line-check")),
        )
    finally:
        rpc_log.removeHandler(handler)
    line = next(r for r in records if getattr(r, "request_id", None) == "log-line-check")
    assert line.getMessage() == "rpc finished"
    assert line.rpc == "/agentmesh.auth.v1.UserService/GetCurrentUser"  # type: ignore[attr-defined]
    assert line.code == "OK"  # type: ignore[attr-defined]
    assert line.user_id == user.user_id  # type: ignore[attr-defined]
    assert line.latency_ms > 0  # type: ignore[attr-defined]


async def test_health_reports_each_service(stubs: Stubs) -> None:
    for service in ["", *SERVICE_NAMES]:
        response = await stubs.health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    await expect_code(
        stubs.health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")),
        grpc.StatusCode.NOT_FOUND,
    )


def _reflected_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


async def test_reflection_lists_every_service(app: Application) -> None:
    # The reflection client is synchronous: keep it off the event loop that serves it.
    services = await asyncio.to_thread(_reflected_services, f"127.0.0.1:{app.grpc_port}")
    assert {*SERVICE_NAMES, "grpc.health.v1.Health"} <= services
