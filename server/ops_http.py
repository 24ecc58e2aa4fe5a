"""The operations HTTP server (METRICS_PORT): /metrics for Prometheus and /health, a plain
JSON view of gRPC health for load balancers and humans (Envoy routes /health here), and
A2A's Agent Card (Envoy routes /.well-known/agent-card.json here)."""

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from server.health import ServiceHealth


class OpsServer:
    def __init__(
        self,
        health: ServiceHealth,
        registry: CollectorRegistry,
        host: str,
        port: int,
        agent_card: dict[str, object] | None = None,
    ) -> None:
        self._health = health
        app = web.Application()
        app.router.add_get("/health", self._health_view)
        self._agent_card = agent_card
        if agent_card is not None:  # A2A's Agent Card (server/a2a_card.py), public
            app.router.add_get("/.well-known/agent-card.json", self._agent_card_view)
        app.router.add_get("/metrics", make_aiohttp_handler(registry))
        self._runner = web.AppRunner(app, access_log=None)
        self._host, self._port = host, port
        self.port = 0

    async def _health_view(self, _request: web.Request) -> web.Response:
        snapshot = self._health.snapshot()
        body = {"status": snapshot[""], "services": {k: v for k, v in snapshot.items() if k}}
        return web.json_response(body, status=200 if self._health.serving else 503)

    async def _agent_card_view(self, _request: web.Request) -> web.Response:
        return web.json_response(self._agent_card)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()
