"""Running agentmesh for tests: the real application on free ports, its stubs, Envoy."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc
from agentmesh.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc
from grpc_health.v1 import health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from server.config import Settings
from server.envoy import EnvoySidecar, envoy_config
from server.main import Application, build_application
from services.auth.principal import Role

TEST_JWT_SECRET = "test-secret-" + "x" * 40
PASSWORD = "correct horse battery staple"


def settings_for(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "grpc_port": 0,
        "metrics_port": 0,
        "mcp_port": 0,
        "http_port": 0,
        "envoy_admin_port": 0,
        "jwt_secret": TEST_JWT_SECRET,
        "log_format": "text",
        "shutdown_grace_seconds": 1.0,
        # Every test talks from 127.0.0.1: limits that only the rate-limit tests reach.
        "rate_limit_per_user": 1_000_000,
        "rate_limit_per_ip": 1_000_000,
        "rate_limit_credentials_per_ip": 1_000_000,
        "rate_limit_credentials_per_account": 1_000_000,
        # Load shedding too: only tests/test_transport.py reaches it.
        "max_concurrent_rpcs": 1_000_000,
        "max_concurrent_runs": 1_000_000,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@dataclass
class Stubs:
    """Generated stubs over one channel."""

    channel: grpc.aio.Channel
    auth: auth_grpc.AuthServiceAsyncStub
    users: users_grpc.UserServiceAsyncStub
    keys: keys_grpc.ApiKeyServiceAsyncStub
    agent: agent_grpc.AgentServiceAsyncStub
    kb: kb_grpc.KnowledgeBaseServiceAsyncStub
    health: Any  # grpc_health ships no type information

    @classmethod
    def connect(cls, target: str) -> Stubs:
        channel = grpc.aio.insecure_channel(target)
        return cls(
            channel=channel,
            auth=auth_grpc.AuthServiceStub(channel),
            users=users_grpc.UserServiceStub(channel),
            keys=keys_grpc.ApiKeyServiceStub(channel),
            agent=agent_grpc.AgentServiceStub(channel),
            kb=kb_grpc.KnowledgeBaseServiceStub(channel),
            health=health_pb2_grpc.HealthStub(channel),
        )


@dataclass
class Account:
    user_id: str
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.access_token}"),)


def unique_email(prefix: str = "user") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@example.com"


async def login(stubs: Stubs, email: str, password: str = PASSWORD) -> Account:
    response = await stubs.auth.Login(auth_pb.LoginRequest(email=email, password=password))
    return Account(
        user_id=response.user.user_id,
        email=email,
        password=password,
        access_token=response.access_token,
        refresh_token=response.refresh_token,
    )


async def new_user(stubs: Stubs, prefix: str = "user") -> Account:
    """Register a fresh account through the API and log it in."""
    email = unique_email(prefix)
    await stubs.auth.Register(
        auth_pb.RegisterRequest(email=email, password=PASSWORD, full_name=prefix.title())
    )
    return await login(stubs, email)


async def new_admin(app: Application, stubs: Stubs) -> Account:
    """Create an administrator the way `agentmesh create-admin` does, then log in."""
    email = unique_email("admin")
    await app.domain.auth.register(
        email=email, password=PASSWORD, full_name="Admin", role=Role.ADMIN
    )
    return await login(stubs, email)


@contextlib.asynccontextmanager
async def running_app(
    database_url: str, data_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[Application, Stubs]]:
    """A started application over `database_url` with stubs connected to it; stopped on exit."""
    app = build_application(settings_for(database_url, data_dir, **overrides))
    await app.start()
    stubs = Stubs.connect(f"127.0.0.1:{app.grpc_port}")
    try:
        yield app, stubs
    finally:
        await stubs.channel.close()
        await app.stop(grace=0)


def envoy_for(
    app: Application, workdir: Path, cors_origins: list[str] | None = None
) -> EnvoySidecar:
    """An Envoy sidecar on free ports in front of a running test application."""
    loopback = "127.0.0.1"
    settings = app.settings.model_copy(
        update={
            "http_host": loopback,
            "http_port": 0,
            "envoy_admin_port": 0,
            "grpc_host": loopback,
            "metrics_host": loopback,
            "cors_allowed_origins": cors_origins or [],
        }
    )
    config = envoy_config(
        settings, grpc_port=app.grpc_port, ops_port=app.ops.port, mcp_port=app.mcp_port
    )
    return EnvoySidecar(settings.resolved_envoy_binary, config, workdir)


async def rpc_count(app: Application, sample_name: str, method: str) -> float:
    """The application's own /metrics: the sum of `sample_name` (grpc_server_started_total,
    grpc_server_handled_total, ...) over the samples of RPC `method` (its short name)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        text = await response.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name and sample.labels.get("grpc_method") == method
    )
