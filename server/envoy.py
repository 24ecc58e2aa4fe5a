"""Envoy as a sidecar process of `agentmesh serve` (the embedded mode's REST front door).

The config is rendered from envoy/envoy.yaml with the configured addresses, so the file in
the repository stays the single description of the routes and filters.
"""

import asyncio
import copy
import json
import logging
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from server.config import ROOT, Settings
from server.parent_death import dying_with_parent

CORS_POLICY_TYPE = "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy"
BUFFER_FILTER = "envoy.filters.http.buffer"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
GRPC_CLUSTER = "agentmesh_grpc"
MCP_CLUSTER = "agentmesh_mcp"  # the knowledge base's MCP server (server/kb_mcp.py)
# The REST routes of envoy/envoy.yaml that cap a body (by the EdgeLimits field of their cap),
# each after its twin TOO_LARGE that refuses a Content-Length over the cap at once.
BODY_CAP_ROUTES = {
    "rest-upload": "upload_body_bytes",
    "rest-authenticated": "body_bytes",
    "rest-public": "public_body_bytes",
}
TOO_LARGE = "-too-large"


@dataclass(frozen=True)
class EdgeLimits:
    """What Envoy lets through to agentmesh: REST request bodies by route, in bytes (larger is
    413 before Envoy buffers it), and the gRPC cluster's circuit breaker per process."""

    public_body_bytes: int
    """Any REST request without an authorization header."""
    body_bytes: int
    """A REST request with an authorization header, uploads apart."""
    upload_body_bytes: int
    """POST /v1/kb/documents (UploadDocument) with an authorization header."""
    max_requests: int
    """Calls in flight to one agentmesh process."""
    max_pending_requests: int
    """Calls waiting for a connection to one agentmesh process."""


def upload_body_bytes(max_upload_bytes: int, envelope_bytes: int) -> int:
    """The largest JSON body of an upload of `max_upload_bytes`: base64 writes 4 characters
    for every 3 bytes, and the other fields may take `envelope_bytes`."""
    return 4 * -(-max_upload_bytes // 3) + envelope_bytes


def too_large_message(limits: EdgeLimits) -> str:
    """The message of Envoy's 413 (the same for every route: Envoy's answer cannot tell which
    cap a body passed)."""
    return (
        f"request body too large: at most {limits.public_body_bytes} bytes without an"
        f" authorization header, {limits.body_bytes} with one,"
        f" {limits.upload_body_bytes} for an upload"
    )


def edge_limits(settings: Settings) -> EdgeLimits:
    """The limits of ENVOY_MAX_* and MAX_UPLOAD_BYTES."""
    return EdgeLimits(
        public_body_bytes=settings.envoy_max_public_body_bytes,
        body_bytes=settings.envoy_max_body_bytes,
        upload_body_bytes=upload_body_bytes(
            settings.max_upload_bytes, settings.envoy_max_body_bytes
        ),
        max_requests=settings.envoy_max_requests,
        max_pending_requests=settings.envoy_max_pending_requests,
    )


@dataclass(frozen=True)
class EnvoyAddresses:
    """Where Envoy listens and where it forwards to; port 0 means any free port."""

    listen_host: str
    listen_port: int
    admin_port: int
    grpc_host: str
    grpc_port: int
    ops_host: str
    ops_port: int
    descriptor_set: Path
    cors_origins: list[str] = field(default_factory=list)
    limits: EdgeLimits | None = None
    """None: the template's own numbers."""
    mcp_port: int = 8765
    """The knowledge base's MCP server, on the gRPC host."""


def reachable(host: str) -> str:
    """The host to connect to for a bind address (a wildcard means this host)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _socket(address: dict[str, Any], host: str, port: int) -> None:
    address["socket_address"] = {"address": host, "port_value": port}


@dataclass(frozen=True)
class EnvoyFront:
    """Where Envoy listens, its admin port, the descriptor set it transcodes with, the
    browser origins it admits and its limits: everything of the config but its upstreams."""

    listen_host: str
    listen_port: int
    admin_port: int
    descriptor_set: Path
    cors_origins: Sequence[str] = ()
    limits: EdgeLimits | None = None
    """None: the template's own numbers."""


def _public_listener(config: dict[str, Any]) -> dict[str, Any]:
    listener: dict[str, Any] = next(
        item for item in config["static_resources"]["listeners"] if item["name"] == "public"
    )
    return listener


def public_manager(config: dict[str, Any]) -> dict[str, Any]:
    """The HTTP connection manager of the public listener (routes and filters)."""
    chain = _public_listener(config)["filter_chains"][0]
    manager: dict[str, Any] = chain["filters"][0]["typed_config"]
    return manager


def _http_filter(manager: dict[str, Any], name: str) -> dict[str, Any]:
    config: dict[str, Any] = next(
        item["typed_config"] for item in manager["http_filters"] if item["name"] == name
    )
    return config


def _cap_bodies(manager: dict[str, Any], limits: EdgeLimits) -> None:
    """Set the caps of BODY_CAP_ROUTES and their twins, and the transcoder's own (the largest)."""
    caps = {route: int(getattr(limits, name)) for route, name in BODY_CAP_ROUTES.items()}
    found = set()
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        name = route.get("name", "")
        if name in caps:
            buffer = route["typed_per_filter_config"][BUFFER_FILTER]["buffer"]
            buffer["max_request_bytes"] = caps[name]
        elif name.endswith(TOO_LARGE) and name.removesuffix(TOO_LARGE) in caps:
            cap = caps[name.removesuffix(TOO_LARGE)]
            length = next(h for h in route["match"]["headers"] if h["name"] == "content-length")
            length["range_match"]["start"] = cap + 1
        else:
            continue
        found.add(name)
    missing = {*caps, *(name + TOO_LARGE for name in caps)} - found
    if missing:
        raise ValueError(f"the Envoy template lacks the routes {', '.join(sorted(missing))}")
    _http_filter(manager, TRANSCODER_FILTER)["max_request_body_size"] = max(caps.values())
    for mapper in manager["local_reply_config"]["mappers"]:
        # The mappers of the served files combine a status with a path (and_filter).
        status = mapper["filter"].get("status_code_filter", {})
        if status and status["comparison"]["value"]["default_value"] == 413:
            mapper["body_format_override"]["json_format"]["message"] = too_large_message(limits)


def _serve_files(manager: dict[str, Any]) -> None:
    """Make the path of every file a route serves (the OpenAPI document, the chat page's
    files) absolute: the template's are relative to the repository (ROOT), and Envoy would
    read them relative to its own working directory."""
    for route in manager["route_config"]["virtual_hosts"][0]["routes"]:
        body = route.get("direct_response", {}).get("body", {})
        if "filename" in body:
            body["filename"] = str((ROOT / body["filename"]).resolve())


def _set_breakers(cluster: dict[str, Any], limits: EdgeLimits) -> None:
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    thresholds["max_requests"] = limits.max_requests
    thresholds["max_pending_requests"] = limits.max_pending_requests


def render_front(template: dict[str, Any], front: EnvoyFront) -> dict[str, Any]:
    """A copy of `template` (envoy/envoy.yaml) with the listener, admin, descriptor, CORS
    origins and limits of `front`, and the absolute paths of the files it serves; its clusters
    are still the template's (the gRPC one with the limits' circuit breaker)."""
    config = copy.deepcopy(template)
    _socket(config["admin"]["address"], "127.0.0.1", front.admin_port)
    _socket(_public_listener(config)["address"], front.listen_host, front.listen_port)
    manager = public_manager(config)
    transcoder = _http_filter(manager, TRANSCODER_FILTER)
    transcoder["proto_descriptor"] = str(front.descriptor_set.resolve())
    _serve_files(manager)
    if front.limits is not None:
        _cap_bodies(manager, front.limits)
        clusters = config["static_resources"]["clusters"]
        _set_breakers(next(c for c in clusters if c["name"] == GRPC_CLUSTER), front.limits)
    if front.cors_origins:
        virtual_host = manager["route_config"]["virtual_hosts"][0]
        virtual_host["typed_per_filter_config"] = {
            "envoy.filters.http.cors": {
                "@type": CORS_POLICY_TYPE,
                "allow_origin_string_match": [{"exact": origin} for origin in front.cors_origins],
                "allow_methods": "GET, POST, PATCH, DELETE, OPTIONS",
                "allow_headers": "authorization, content-type, x-request-id",
                "expose_headers": "x-request-id, grpc-status, grpc-message",
                "max_age": "600",
            }
        }
    return config


def render_config(template: dict[str, Any], where: EnvoyAddresses) -> dict[str, Any]:
    """`template` (envoy/envoy.yaml) with the addresses, descriptor and CORS origins of `where`."""
    front = EnvoyFront(
        listen_host=where.listen_host,
        listen_port=where.listen_port,
        admin_port=where.admin_port,
        descriptor_set=where.descriptor_set,
        cors_origins=where.cors_origins,
        limits=where.limits,
    )
    config = render_front(template, front)
    upstreams = {
        GRPC_CLUSTER: (reachable(where.grpc_host), where.grpc_port),
        "agentmesh_ops": (reachable(where.ops_host), where.ops_port),
        MCP_CLUSTER: (reachable(where.grpc_host), where.mcp_port),
    }
    for cluster in config["static_resources"]["clusters"]:
        host, port = upstreams[cluster["name"]]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        _socket(endpoint["address"], host, port)
    return config


ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
MANAGER_FILTER = "envoy.filters.network.http_connection_manager"
MANAGER_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)


def add_stats_listener(config: dict[str, Any], port: int, admin_port: int) -> None:
    """Add a listener on 0.0.0.0:`port` serving only the admin's /stats/prometheus and
    /ready, and the cluster behind it: Prometheus and health checks on other hosts reach
    those two paths, never the admin interface itself (it can drain listeners and stop
    Envoy)."""
    routes = [
        {"match": {"path": path}, "route": {"cluster": "envoy_admin", "timeout": "5s"}}
        for path in ("/stats/prometheus", "/ready")
    ]
    manager = {
        "@type": MANAGER_TYPE,
        "stat_prefix": "stats",
        "route_config": {
            "name": "stats",
            "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}
        ],
    }
    listener = {
        "name": "stats",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{"name": MANAGER_FILTER, "typed_config": manager}]}],
    }
    admin = {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
    cluster = {
        "name": "envoy_admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "envoy_admin",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": admin}}]}],
        },
    }
    config["static_resources"]["listeners"].append(listener)
    config["static_resources"]["clusters"].append(cluster)


def _read_address(path: Path) -> str:
    """The admin address Envoy writes once it listens (a few bytes; empty until then)."""
    return path.read_text().strip() if path.exists() else ""


class EnvoySidecar:
    """Starts Envoy with a rendered config, waits until it is ready, and stops it."""

    def __init__(
        self,
        binary: str,
        config: dict[str, Any],
        workdir: Path,
        *,
        concurrency: int = 1,
        logger: logging.Logger | None = None,
    ) -> None:
        self._binary = binary
        self._config = config
        self._workdir = workdir
        self._concurrency = concurrency
        self._log = logger or logging.getLogger("agentmesh.envoy")
        self._process: asyncio.subprocess.Process | None = None
        self.admin_url = ""
        self.port = 0

    @property
    def pid(self) -> int | None:
        """Envoy's process id once started (None before and after)."""
        return self._process.pid if self._process is not None else None

    async def start(self, timeout: float = 20.0) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        config_path = self._workdir / "envoy.yaml"
        admin_path = self._workdir / "admin-address"
        admin_path.unlink(missing_ok=True)
        config_path.write_text(yaml.safe_dump(self._config, sort_keys=False))
        command = dying_with_parent([
            self._binary,
            "-c", str(config_path),
            "--disable-hot-restart",
            "--concurrency", str(self._concurrency),
            "--log-level", "warning",
            "--admin-address-path", str(admin_path),
        ])  # fmt: skip
        self._process = await asyncio.create_subprocess_exec(*command)
        try:
            await asyncio.wait_for(self._wait_ready(admin_path), timeout)
        except BaseException:
            await self.stop()
            raise
        self._log.info("envoy ready", extra={"port": self.port, "admin": self.admin_url})

    async def _wait_ready(self, admin_path: Path) -> None:
        assert self._process is not None
        async with aiohttp.ClientSession() as http:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"envoy exited with code {self._process.returncode}")
                address = _read_address(admin_path)
                if address:
                    self.admin_url = "http://" + address
                    try:
                        async with http.get(self.admin_url + "/ready") as response:
                            if response.status == 200:
                                self.port = await self._listener_port(http)
                                return
                    except aiohttp.ClientError:
                        pass
                await asyncio.sleep(0.05)

    async def _listener_port(self, http: aiohttp.ClientSession) -> int:
        async with http.get(self.admin_url + "/listeners?format=json") as response:
            listeners = json.loads(await response.text())["listener_statuses"]
        public = next(item for item in listeners if item["name"] == "public")
        return int(public["local_address"]["socket_address"]["port_value"])

    async def wait(self) -> int:
        """Wait for Envoy to exit; its exit code."""
        assert self._process is not None
        return await self._process.wait()

    async def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()


def envoy_config(
    settings: Settings,
    *,
    grpc_port: int,
    ops_port: int,
    upstream: str | None = None,
    descriptor: Path | None = None,
    mcp_port: int | None = None,
) -> dict[str, Any]:
    """envoy/envoy.yaml rendered for this installation: the sidecar's config, or with
    `upstream` naming agentmesh's host, the config of an Envoy in its own container.
    `mcp_port` is the MCP server's (None: MCP_PORT; a process without the knowledge base
    listens on none, and /mcp answers 503)."""
    template = yaml.safe_load(settings.envoy_config_template.read_text())
    addresses = EnvoyAddresses(
        listen_host=settings.http_host,
        listen_port=settings.http_port,
        admin_port=settings.envoy_admin_port,
        grpc_host=upstream or settings.grpc_host,
        grpc_port=grpc_port,
        ops_host=upstream or settings.metrics_host,
        ops_port=ops_port,
        descriptor_set=descriptor or settings.descriptor_set,
        cors_origins=settings.cors_allowed_origins,
        limits=edge_limits(settings),
        mcp_port=settings.mcp_port if mcp_port is None else mcp_port,
    )
    return render_config(template, addresses)


def envoy_sidecar(
    settings: Settings, *, grpc_port: int, ops_port: int, mcp_port: int | None = None
) -> EnvoySidecar:
    """The sidecar Envoy in front of this process's gRPC, operations and MCP ports."""
    return EnvoySidecar(
        settings.resolved_envoy_binary,
        envoy_config(settings, grpc_port=grpc_port, ops_port=ops_port, mcp_port=mcp_port),
        settings.data_dir / "envoy",
        concurrency=settings.envoy_concurrency,
    )
