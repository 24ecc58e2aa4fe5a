"""Where a mesh's services run: the host:port addresses of each service's replicas
(AGENTMESH_ENVOY_UPSTREAMS), checked before Envoy is given them."""

from collections.abc import Mapping, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=str)


def split_address(address: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) → (host, port); ValueError naming the address otherwise."""
    host, colon, port = address.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def check_upstreams(upstreams: Mapping[Key, Sequence[str]], keys: Sequence[Key]) -> None:
    """ValueError unless `upstreams` is empty (one process) or gives every service of `keys`
    at least one host:port, and names no other."""
    if not upstreams:
        return
    unknown = sorted(set(upstreams) - set(keys))
    if unknown:
        raise ValueError(f"unknown services {', '.join(unknown)}: the keys are {', '.join(keys)}")
    missing = [key for key in keys if not upstreams.get(key)]
    if missing:
        raise ValueError(f"no upstream for {', '.join(missing)}: every service needs one")
    for addresses in upstreams.values():
        for address in addresses:
            split_address(address)
