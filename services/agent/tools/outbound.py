"""The one HTTP client tools use to reach the outside world.

It refuses private, loopback, link-local and other non-public addresses (SSRF), unless a
network is allowed in settings, by checking every address a host name resolves to at
connection time (so DNS rebinding cannot slip past a check made earlier) and every IP
literal in a URL, including redirect targets.
"""

import asyncio
import ipaddress
import json
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

MAX_RESPONSE_BYTES = 2 * 1024 * 1024
MAX_REDIRECTS = 3

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class OutboundRefused(Exception):
    """A request the guard or the remote side refused; the message says why."""


def _is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _is_public(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


class AddressPolicy:
    """Public addresses, plus the explicitly allowed networks."""

    def __init__(self, allowed_networks: list[str]) -> None:
        self._allowed: list[Network] = [
            ipaddress.ip_network(cidr, strict=False) for cidr in allowed_networks
        ]

    def check(self, raw: str) -> None:
        address = ipaddress.ip_address(raw.split("%", 1)[0])
        if _is_public(address) or any(address in network for network in self._allowed):
            return
        raise OutboundRefused(
            f"refusing to connect to non-public address {address} "
            "(allow its network in AGENTMESH_OUTBOUND_ALLOWED_NETWORKS)"
        )


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default, then refuses the host if any address is not allowed."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._policy.check(result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


def _literal_ip(host: str | None) -> str | None:
    if not host:
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    return host.strip("[]")


class OutboundHttp:
    """JSON over HTTP(S) to public endpoints, with a size cap and no blind redirects."""

    def __init__(self, allowed_networks: list[str], *, user_agent: str = "agentmesh") -> None:
        self._policy = AddressPolicy(allowed_networks)
        self._user_agent = user_agent
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._policy), limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector, headers={"User-Agent": self._user_agent}
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def json(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        body: Any = None,
        timeout: float = 15.0,
    ) -> Any:
        """The decoded JSON reply; OutboundRefused for a refused address, an HTTP error
        status, a non-JSON or oversize reply, or a network failure."""
        target = URL(url)
        try:
            async with asyncio.timeout(timeout):
                for _ in range(MAX_REDIRECTS + 1):
                    self._check_url(target)
                    async with self._client().request(
                        method,
                        target,
                        headers=headers,
                        params=params,
                        json=body,
                        allow_redirects=False,
                    ) as response:
                        if response.status in (301, 302, 303, 307, 308):
                            target = target.join(URL(response.headers.get("Location", "")))
                            params = None
                            continue
                        return await self._decode(response)
                raise OutboundRefused(f"more than {MAX_REDIRECTS} redirects")
        except aiohttp.ClientConnectorError as error:
            if isinstance(error.os_error, OutboundRefused):
                raise error.os_error from None
            raise OutboundRefused(f"cannot connect to {target.host}") from error
        except OutboundRefused:
            raise
        except (aiohttp.ClientError, OSError) as error:
            raise OutboundRefused(
                f"request to {target.host} failed: {type(error).__name__}"
            ) from error

    def _check_url(self, url: URL) -> None:
        if url.scheme not in ("http", "https"):
            raise OutboundRefused(f"unsupported URL scheme {url.scheme!r}")
        literal = _literal_ip(url.host)
        if literal is not None:
            self._policy.check(literal)

    async def _decode(self, response: aiohttp.ClientResponse) -> Any:
        if response.status >= 400:
            raise OutboundRefused(f"{response.url.host} answered HTTP {response.status}")
        raw = await response.content.read(MAX_RESPONSE_BYTES + 1)
        if len(raw) > MAX_RESPONSE_BYTES:
            raise OutboundRefused(f"{response.url.host} sent more than {MAX_RESPONSE_BYTES} bytes")
        try:
            return json.loads(raw)
        except ValueError:
            raise OutboundRefused(f"{response.url.host} did not answer JSON") from None
