"""Rate limits: sliding windows per user and per client IP, stricter
ones for the credential RPCs, decided by the configured limiter (Redis or in-process).

- Ordinary calls count against their client IP's window and, once authenticated, their
  user's.
- The credential RPCs (Register, Login, RefreshToken, ChangePassword, AcceptInvitation)
  count instead against a much smaller window per IP; Login also against its account's
  window (keyed by a hash of the canonical email, never the email) and ChangePassword
  against its caller's, so guessing one account's password from many addresses is
  throttled too.
- A call that authentication refuses (no, an invalid or an expired token; a revoked
  session; a method the caller may not use) is not admitted here: the call pipeline hands
  it to `charge_refused` first, which counts it against its IP's window,
  so a flood of bad tokens ends in RESOURCE_EXHAUSTED like any other.
- When the limiter cannot decide (Redis down or slower than its timeout), credential RPCs
  follow `credentials_fail_open` (default: refused, so Redis being down does not open
  password guessing), everything else the limiter's own mode (RATE_LIMIT_FAIL_OPEN). Such a
  refusal is RESOURCE_EXHAUSTED with reason RATE_LIMITER_UNAVAILABLE and RetryInfo (1 s),
  not UNAVAILABLE, which clients and Envoy may retry at once.

The client IP is the peer address, or, when the peer is a trusted proxy (the Envoy
sidecar on loopback by default), the right-most x-forwarded-for address that is not a
trusted proxy itself, as Envoy appends the address it saw.
"""

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Any

from server.errors import rich_status
from server.handlers import Context, abort, metadata_value
from server.request_context import RequestInfo
from services.auth.validation import canonical_email
from services.errors import QuotaViolation, ResourceExhausted
from services.limits import Decision, RateLimiter
from services.usage_events.recorder import EventKind, EventRecorder

_AUTH = "/agentmesh.auth.v1.AuthService/"
LOGIN = _AUTH + "Login"
CHANGE_PASSWORD = _AUTH + "ChangePassword"
# Guessing passwords and minting tokens get their own, much smaller budget per IP.
CREDENTIAL_RPCS = frozenset(
    {_AUTH + "Register", LOGIN, _AUTH + "RefreshToken", CHANGE_PASSWORD, _AUTH + "AcceptInvitation"}
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
    credentials_per_account: int = 10
    credentials_fail_open: bool = False
    trusted_proxies: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


def account_key(email: str) -> str:
    """The limiter's name for the account `email` signs in to: a hash of its canonical
    form, so keys, events and errors never carry the address."""
    return hashlib.sha256(canonical_email(email).encode()).hexdigest()[:32]


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
    QuotaFailure) and its scope (user, ip, credentials or account: events and metrics)."""

    key: str
    limit: int
    subject: str
    scope: str


class RateLimitGate:
    """Refuses a call over any of its limits with RESOURCE_EXHAUSTED (HTTP 429 through
    Envoy), RetryInfo and a QuotaFailure naming the limit. The call pipeline runs it after
    authentication (server/interceptors.py)."""

    def __init__(self, limiter: RateLimiter, limits: RateLimits, events: EventRecorder) -> None:
        self._limiter = limiter
        self._limits = limits
        self._events = events
        self._addresses = ClientAddress(limits.trusted_proxies)

    @staticmethod
    def limits(method: str) -> bool:
        """Whether calls of `method` are limited at all."""
        return not method.startswith(UNLIMITED_PREFIXES)

    def _client_ip(self, context: Context, info: RequestInfo) -> str:
        ip = self._addresses.of(
            info.peer or context.peer(), metadata_value(context, "x-forwarded-for")
        )
        info.client_ip = ip
        return ip

    def _checks(self, context: Context, info: RequestInfo, account: str) -> list[WindowCheck]:
        """Every window this call counts against (`account`: Login's account key)."""
        ip = self._client_ip(context, info)
        limits, method = self._limits, info.rpc
        user = info.principal.user_id if info.principal else None
        if method in CREDENTIAL_RPCS:
            checks = [
                WindowCheck(f"auth-ip:{ip}", limits.credentials_per_ip, f"ip:{ip}", "credentials")
            ]
            if method == CHANGE_PASSWORD and user is not None:
                account = f"user:{user}"
            if account:
                key, subject = f"auth-account:{account}", f"account:{account}"
                checks.append(WindowCheck(key, limits.credentials_per_account, subject, "account"))
            return checks
        checks = [WindowCheck(f"ip:{ip}", limits.per_ip, f"ip:{ip}", "ip")]
        if user is not None:
            checks.append(WindowCheck(f"user:{user}", limits.per_user, f"user:{user}", "user"))
        return checks

    async def admit(self, context: Context, info: RequestInfo, request: Any) -> None:
        """Count the call against its windows; abort it when one of them is full. Login's
        account window is keyed by its request's email: the only request read here."""
        account = ""
        if info.rpc == LOGIN:
            email = str(getattr(request, "email", "") or "")
            account = account_key(email) if email.strip() else ""
        checks = self._checks(context, info, account)
        credentials = info.rpc in CREDENTIAL_RPCS
        await self._decide(
            context, info, checks, self._limits.credentials_fail_open if credentials else None
        )

    async def charge_refused(self, context: Context, info: RequestInfo) -> None:
        """Count a call that authentication refuses against its client IP's window, and
        end it with RESOURCE_EXHAUSTED instead when that window is full."""
        ip = self._client_ip(context, info)
        checks = [WindowCheck(f"ip:{ip}", self._limits.per_ip, f"ip:{ip}", "ip")]
        await self._decide(context, info, checks, None)

    async def _decide(
        self,
        context: Context,
        info: RequestInfo,
        checks: list[WindowCheck],
        fail_open: bool | None,
    ) -> None:
        """Abort the call unless every window in `checks` admits it (`fail_open`: the mode
        when the limiter cannot decide; None is the limiter's own)."""
        refused_at, decision = await self._limiter.hit_all(
            [(check.key, check.limit) for check in checks],
            self._limits.window_seconds,
            fail_open=fail_open,
        )
        if decision.allowed:
            return
        refused = checks[max(refused_at, 0)]
        self._events.record(
            EventKind.RATE_LIMITED,
            user_id=info.principal.user_id if info.principal else None,
            rpc=info.rpc,
            code="RESOURCE_EXHAUSTED",
            success=False,
            data={"limit": refused.scope},
        )
        await abort(context, rich_status(self._refusal(refused, decision)))

    def _refusal(self, refused: WindowCheck, decision: Decision) -> ResourceExhausted:
        if not decision.decided:
            return ResourceExhausted(
                "the rate limiter cannot be reached; try again",
                retry_after=decision.retry_after,
                reason="RATE_LIMITER_UNAVAILABLE",
            )
        limit, window = refused.limit, self._limits.window_seconds
        return ResourceExhausted(
            f"rate limit: at most {limit} calls per {window:g} s",
            retry_after=decision.retry_after,
            violations=[QuotaViolation(refused.subject, f"{limit} calls per {window:g} s")],
            reason="RATE_LIMITED",
        )
