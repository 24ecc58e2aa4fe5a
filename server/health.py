"""Per-service health (grpc.health.v1) with a readable snapshot for the HTTP /health view."""

from collections.abc import Iterable

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""  # the whole server, by the health-checking protocol's convention


class ServiceHealth:
    """Wraps the gRPC health servicer and remembers what it was told."""

    def __init__(self, services: Iterable[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self._status = {name: NOT_SERVING for name in (OVERALL, *services)}
        self._shutting_down = False

    async def set_all(
        self, status: "health_pb2.HealthCheckResponse.ServingStatus.ValueType"
    ) -> None:
        for name in self._status:
            await self.set(name, status)

    async def set(
        self, service: str, status: "health_pb2.HealthCheckResponse.ServingStatus.ValueType"
    ) -> None:
        if self._shutting_down:
            return
        self._status[service] = status
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
