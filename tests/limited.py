"""Applications with small limits for the rate-limit and quota tests, and the Redis they
may use (AGENTMESH_TEST_REDIS_URL, default the local server; missing Redis skips on a
laptop and fails under CI=true)."""

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from server import migrations
from server.main import Application
from tests.backends import require_service
from tests.harness import Stubs, running_app
from tests.rpc_errors import error_info

REDIS_URL = os.environ.get("AGENTMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
GENEROUS = 1_000_000


async def redis_up() -> None:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except Exception:
        require_service(f"Redis is not reachable at {REDIS_URL}")
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def limited_app(tmp_path: Path, **settings: Any) -> AsyncIterator[tuple[Application, Stubs]]:
    url = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await asyncio.to_thread(migrations.upgrade, url)
    limits = {
        "rate_limit_per_user": GENEROUS,
        "rate_limit_per_ip": GENEROUS,
        "rate_limit_credentials_per_ip": GENEROUS,
        "rate_limit_credentials_per_account": GENEROUS,
        "redis_key_prefix": f"agentmesh-test-{uuid.uuid4().hex}:",
        **settings,
    }
    async with running_app(url, tmp_path / "data", **limits) as running:
        yield running


async def exhausted(call: Awaitable[Any], reason: str) -> grpc.aio.AioRpcError:
    """The RESOURCE_EXHAUSTED error `call` fails with, checked to carry `reason`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == reason
    return caught.value
