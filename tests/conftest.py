"""Shared fixtures: one migrated database and one running application per backend
(SQLite, PostgreSQL), reached through real stubs and a real Envoy."""

from collections.abc import AsyncIterator

import aiohttp
import pytest

from server.envoy import EnvoySidecar
from server.main import Application, build_application
from tests.backends import BACKENDS, Database
from tests.fake_llm import FakeLlm
from tests.harness import Stubs, envoy_for, settings_for


@pytest.fixture(scope="session", params=BACKENDS)
async def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Database]:
    db = Database(request.param, tmp_path_factory.mktemp("sqlite"))
    await db.create()
    await db.migrate()
    yield db
    await db.drop()


@pytest.fixture(scope="session")
async def app(
    database: Database, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Application]:
    application = build_application(settings_for(database.url, tmp_path_factory.mktemp("data")))
    await application.start()
    yield application
    await application.stop(grace=0)


@pytest.fixture(scope="session")
async def stubs(app: Application) -> AsyncIterator[Stubs]:
    connected = Stubs.connect(f"127.0.0.1:{app.grpc_port}")
    yield connected
    await connected.channel.close()


@pytest.fixture(scope="session")
async def envoy(
    app: Application, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EnvoySidecar]:
    sidecar = envoy_for(
        app, tmp_path_factory.mktemp("envoy"), cors_origins=["https://app.example.com"]
    )
    await sidecar.start()
    yield sidecar
    await sidecar.stop()


@pytest.fixture(scope="session")
async def rest(envoy: EnvoySidecar) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client whose relative URLs go to Envoy's public listener."""
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{envoy.port}") as session:
        yield session


@pytest.fixture(scope="module")
async def llm() -> AsyncIterator[FakeLlm]:
    """The scripted OpenAI-compatible LLM server, one per test module (a module that needs a
    fresh one per test defines its own)."""
    server = FakeLlm()
    await server.start()
    yield server
    await server.stop()
