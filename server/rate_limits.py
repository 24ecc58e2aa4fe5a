"""The rate-limiting interceptor: sliding windows per user and per client IP, stricter
ones for the credential RPCs, decided by the configured limiter (Redis or in-process).

The client IP is the peer address, or, when the peer is a trusted proxy (the Envoy
sidecar on loopback by default), the right-most x-forwarded-for address that is not a
trusted proxy itself, as Envoy appends the address it saw.
"""

import ipaddress
from dataclasses import dataclass
from typing import Any

from server.errors import rich_status
from server.interceptors import (
    Context,
    StreamCall,
    UnaryCall,
    WrappingInterceptor,
    abort,
    metadata_value,
)
from server.request_context import current_request
from services.errors import QuotaViolation, ResourceExhausted
from services.limits import RateLimiter
from services.usage_events.recorder import EventKind, EventRecorder

# Guessing passwords and minting tokens get their own, much smaller budget per IP.
CREDENTIAL_RPCS = frozenset(
    {
        "/agentmesh.auth.v1.AuthService/Register",
        "/agentmesh.auth.v1.AuthService/Login",
        "/agentmesh.auth.v1.AuthService/RefreshToken",
    }
)
# Probes and tooling are never limited.
# Probes, grpcurl's reflection, and agentmesh's own processes on the internal indexing
# service (authenticated by the service credential before this interceptor runs, and paced
# by the ingestion queue).
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/agentmesh.indexing.")


@dataclass(frozen=True)
class RateLimits:
    window_seconds: float = 60.0
    per_user: int = 600
    per_ip: int = 1200
    credentials_per_ip: int = 20
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


def _address(peer: str) -> str:
    """The IP of a gRPC peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`, `unix:...`)."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class ClientAddress:
    """Works out the client IP of a call from its peer and x-forwarded-for."""

    def __init__(self, trusted_proxies: tuple[str, ...]) -> None:
        self._trusted = [ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies]

    def _is_trusted(self, raw: str) -> bool:
        try:
            address = ipaddress.ip_address(raw)
        except ValueError:
            return False
        return any(address in network for network in self._trusted)

    def of(self, peer: str, forwarded_for: str | None) -> str:
        address = _address(peer)
        if not forwarded_for or not self._is_trusted(address):
            return address
        hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else address


@dataclass(frozen=True)
class WindowCheck:
    """One window a call counts against: its limiter key, its limit, whom it limits (for
    QuotaFailure) and its scope (user, ip or credentials: events and metrics)."""

    key: str
    limit: int
    subject: str
    scope: str


class RateLimitInterceptor(WrappingInterceptor):
    """Refuses a call over any of its limits with RESOURCE_EXHAUSTED (HTTP 429 through
    Envoy), RetryInfo and a QuotaFailure naming the limit."""

    def __init__(self, limiter: RateLimiter, limits: RateLimits, events: EventRecorder) -> None:
        self._limiter = limiter
        self._limits = limits
        self._events = events
        self._addresses = ClientAddress(limits.trusted_proxies)

    def _checks(self, context: Context, method: str) -> list[WindowCheck]:
        """Every window this call counts against."""
        info = current_request.get()
        peer = info.peer if info is not None and info.peer else context.peer()
        ip = self._addresses.of(peer, metadata_value(context, "x-forwarded-for"))
        if info is not None:
            info.client_ip = ip
        limits = self._limits
        if method in CREDENTIAL_RPCS:
            return [
                WindowCheck(f"auth-ip:{ip}", limits.credentials_per_ip, f"ip:{ip}", "credentials")
            ]
        checks = [WindowCheck(f"ip:{ip}", limits.per_ip, f"ip:{ip}", "ip")]
        if info is not None and info.principal is not None:
            user = f"user:{info.principal.user_id}"
            checks.append(WindowCheck(user, limits.per_user, user, "user"))
        return checks

    async def _admit(self, context: Context, method: str) -> None:
        if method.startswith(UNLIMITED_PREFIXES):
            return
        checks = self._checks(context, method)
        refused_at, decision = await self._limiter.hit_all(
            [(check.key, check.limit) for check in checks], self._limits.window_seconds
        )
        if decision.allowed:
            return
        refused = checks[max(refused_at, 0)]
        limit = refused.limit
        info = current_request.get()
        self._events.record(
            EventKind.RATE_LIMITED,
            user_id=info.principal.user_id if info and info.principal else None,
            rpc=method,
            code="RESOURCE_EXHAUSTED",
            success=False,
            data={"limit": refused.scope},
        )
        window = self._limits.window_seconds
        error = ResourceExhausted(
            f"rate limit: at most {limit} calls per {window:g} s",
            retry_after=decision.retry_after,
            violations=[QuotaViolation(refused.subject, f"{limit} calls per {window:g} s")],
            reason="RATE_LIMITED",
        )
        await abort(context, rich_status(error))

    async def unary(self, call: UnaryCall, context: Context, method: str) -> Any:
        await self._admit(context, method)
        return await call()

    async def stream(self, call: StreamCall, context: Context, method: str) -> Any:
        await self._admit(context, method)
        async for item in call():
            yield item
