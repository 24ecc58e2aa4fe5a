"""The tools of the configured MCP servers, as the tool registry routes them.

The servers file is read, and each server's tools listed, at start-up and on every reload
(SIGHUP, and with `auto_reload` when the file changes on disk, like the prompts). Runs
see the tools of the last successful load: a file that fails validation is logged and the
previous servers stay; a server that cannot be listed keeps the tools it had when its
entry is unchanged, and is otherwise left out until the next reload.
"""

import asyncio
import logging
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path

import mcp_types
from mcp import Client

from services.agent.events import ToolOutcome
from services.agent.tools.base import Tool
from services.agent.tools.mcp_config import McpConfigError, McpServer, load_servers
from services.agent.tools.mcp_session import McpUnavailable, in_session
from services.agent.tools.mcp_tool import McpTool
from services.agent.tools.registry import RoutedTool, wire_name
from services.metrics import Metrics

log = logging.getLogger("agentmesh.agent.mcp")
# OpenAI's function names: a tool whose wire name does not fit is left out (logged).
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class _Loaded:
    server: McpServer
    tools: tuple[RoutedTool, ...]


class McpToolbox:
    """The MCP servers of the file at `path` (None: no servers) and their allowed tools."""

    def __init__(
        self,
        path: Path | None,
        environ: Mapping[str, str],
        metrics: Metrics,
        *,
        auto_reload: bool = False,
        poll_seconds: float = 1.0,
    ) -> None:
        self._path = path
        self._environ = environ
        self._metrics = metrics
        self._auto_reload = auto_reload and path is not None
        self._poll_seconds = poll_seconds
        self._loaded: dict[str, _Loaded] = {}
        self._routed: tuple[RoutedTool, ...] = ()
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._stamp: tuple[float, int] | None = None

    def routed(self) -> tuple[RoutedTool, ...]:
        """The tools runs may be offered now, with the intents that route to each."""
        return self._routed

    async def start(self) -> None:
        """Load the file and list every server's tools; then watch the file if asked. A bad
        file stops the start (McpConfigError), as a broken prompt does."""
        load_servers(self._path, self._environ)
        await self.reload()
        if self._auto_reload:
            self._spawn(self._watch())

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def reload_soon(self) -> None:
        """Reload in the background (a SIGHUP handler cannot await)."""
        if self._path is not None:
            self._spawn(self.reload())

    async def reload(self) -> None:
        """Read the file again and list its servers' tools; a bad file changes nothing."""
        async with self._lock:
            self._stamp = self._file_stamp()
            try:
                servers = load_servers(self._path, self._environ)
            except McpConfigError as error:
                log.error("MCP servers not reloaded, the previous ones stay: %s", error)
                return
            loaded = await asyncio.gather(*(self._load(server) for server in servers))
            self._loaded = {entry.server.name: entry for entry in loaded}
            self._routed = tuple(tool for entry in loaded for tool in entry.tools)
            self._declare_series()
            log.info("MCP tools loaded: %s", ", ".join(t.tool.name for t in self._routed) or "none")

    async def _load(self, server: McpServer) -> _Loaded:
        """`server` with its allowed tools; its previous ones when listing fails and its
        entry is unchanged."""
        try:
            listed = await in_session(server, _list_tools)
        except (McpUnavailable, TimeoutError) as error:
            previous = self._loaded.get(server.name)
            kept = previous.tools if previous is not None and previous.server == server else ()
            log.warning(
                "MCP server %s not listed (%s); %d tools kept",
                server.name,
                error or "timed out",
                len(kept),
            )
            return _Loaded(server, kept)
        return _Loaded(server, tuple(self._tools_of(server, listed)))

    def _tools_of(self, server: McpServer, listed: list[mcp_types.Tool]) -> list[RoutedTool]:
        tools: list[RoutedTool] = []
        allowed = set(server.allow)
        for remote in listed:
            if "*" not in allowed and remote.name not in allowed:
                continue
            name = f"{server.name}.{remote.name}"
            if not _valid_wire_name(wire_name(name)):
                log.warning("MCP tool %s skipped: its name does not fit a function name", name)
                continue
            try:
                tool: Tool = McpTool.of(server, remote)()
            except Exception as error:  # a broken schema is the server's fault, not ours
                log.warning("MCP tool %s skipped: bad input schema (%s)", name, error)
                continue
            tools.append(RoutedTool(tool, server.intents))
        if missing := allowed - {"*"} - {t.tool.name.split(".", 1)[1] for t in tools}:
            log.warning("MCP server %s does not offer allowed tools %s", server.name, missing)
        return tools

    def _declare_series(self) -> None:
        """Each tool's metric series from the first scrape after it appears, at 0."""
        for routed in self._routed:
            self._metrics.tool_call_seconds.labels(routed.tool.name)
            for outcome in ToolOutcome:
                self._metrics.tool_calls.labels(routed.tool.name, outcome.value)

    def _file_stamp(self) -> tuple[float, int] | None:
        if self._path is None:
            return None
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return (stat.st_mtime, stat.st_size)

    async def _watch(self) -> None:
        """Reload when the file's modification time or size changes (development)."""
        while True:
            await asyncio.sleep(self._poll_seconds)
            if self._file_stamp() != self._stamp:
                await self.reload()

    def _spawn(self, work: Coroutine[None, None, None]) -> None:
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _list_tools(client: Client) -> list[mcp_types.Tool]:
    """Every tool the server lists, through its pages."""
    tools, cursor = [], None
    while True:
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            return tools


def _valid_wire_name(name: str) -> bool:
    return FUNCTION_NAME.fullmatch(name) is not None
