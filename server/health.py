"""Per-service health (grpc.health.v1) with a readable snapshot for the HTTP /health view."""

from collections.abc import Collection, Iterable, Mapping

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""  # the whole server, by the health-checking protocol's convention


class ServiceHealth:
    """Wraps the gRPC health servicer and remembers what it was told.

    Each service is SERVING once the process serves and while every dependency it `needs`
    (by the names of the runtime monitor's probes: database, redis, qdrant) answers its
    last probe; the whole server ("") while every probed dependency does. Envoy's health
    checks and load balancers then route around a replica that lost its database, and back
    once the probe answers again."""

    def __init__(
        self, services: Iterable[str], needs: Mapping[str, Collection[str]] | None = None
    ) -> None:
        self.servicer = health.aio.HealthServicer()
        self._needs = {name: frozenset((needs or {}).get(name, ())) for name in services}
        self._status = {name: NOT_SERVING for name in (OVERALL, *self._needs)}
        self._published: set[str] = set()  # told to the servicer at least once
        self._down: frozenset[str] = frozenset()
        self._serving = False
        self._shutting_down = False

    async def start_serving(self) -> None:
        """The process serves: every service whose dependencies are up reports SERVING."""
        self._serving = True
        await self._publish()

    async def follow(self, up: Mapping[str, bool]) -> None:
        """Take the latest probe results (dependency name → answered)."""
        self._down = frozenset(name for name, answered in up.items() if not answered)
        await self._publish()

    async def _publish(self) -> None:
        for name, needs in self._needs.items():
            await self._set(name, self._serving and not needs & self._down)
        await self._set(OVERALL, self._serving and not self._down)

    async def _set(self, service: str, serving: bool) -> None:
        if self._shutting_down:
            return
        status = SERVING if serving else NOT_SERVING
        if self._status[service] != status or service not in self._published:
            self._status[service] = status
            self._published.add(service)
            await self.servicer.set(service, status)

    async def shutdown(self) -> None:
        """Report NOT_SERVING for everything, permanently (SIGTERM)."""
        self._shutting_down = True
        self._status = dict.fromkeys(self._status, NOT_SERVING)
        await self.servicer.enter_graceful_shutdown()

    def snapshot(self) -> dict[str, str]:
        """Service name → status name, with "" (the whole server) included."""
        return {
            name: health_pb2.HealthCheckResponse.ServingStatus.Name(s)
            for name, s in self._status.items()
        }

    @property
    def serving(self) -> bool:
        return bool(self._status[OVERALL] == SERVING)
