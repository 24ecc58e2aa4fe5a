"""One MCP session per piece of work (listing a server's tools, or one tool call).

A session per call costs a process start (stdio) or a handshake (HTTP) each time, but it
cannot leak: nothing outlives the call, a server that died or hung last time starts
fresh, and one user's call never shares a server process with another's.

Each session runs in a task of its own under anyio cancel scopes. The stdio transport
stops its server (stdin closed, then SIGTERM, then SIGKILL to the process group) in a
shielded scope, but a native `task.cancel()` — what `asyncio.timeout` and a cancelled run
deliver — could cut that short and leave the child running. So the caller's cancellation
is turned into an anyio cancel of that task, which the shield respects, and the caller
waits for the child to be reaped.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import CONNECTION_CLOSED

from services.agent.tools.mcp_config import McpServer, StdioServer

T = TypeVar("T")
log = logging.getLogger("agentmesh.agent.mcp")


class McpUnavailable(Exception):
    """The server could not be started or reached, broke the protocol, or died mid-call."""


def _client(server: McpServer, http: httpx2.AsyncClient | None) -> Client:
    # No read timeout of the SDK's own: the one deadline is `_session_work`'s, so running
    # past it is always a TimeoutError (a TIMEOUT outcome), never a protocol error.
    if isinstance(server, StdioServer):
        params = StdioServerParameters(
            command=server.command, args=list(server.args), env=server.env, cwd=server.cwd
        )
        return Client(params, cache=None)
    assert http is not None
    transport = streamable_http_client(server.url, http_client=http)
    return Client(transport, cache=None)


async def _session_work(server: McpServer, work: Callable[[Client], Awaitable[T]]) -> T:
    """`work` on a new session, within the server's timeout (TimeoutError past it)."""
    with anyio.fail_after(server.timeout_seconds):
        if isinstance(server, StdioServer):
            async with _client(server, None) as client:
                return await work(client)
        timeout = httpx2.Timeout(server.timeout_seconds)
        async with (
            httpx2.AsyncClient(headers=server.headers, timeout=timeout) as http,
            _client(server, http) as client,
        ):
            return await work(client)


async def in_session(server: McpServer, work: Callable[[Client], Awaitable[T]]) -> T:
    """The result of `work` on a fresh session with `server`. TimeoutError when the server's
    timeout passes; McpUnavailable when it cannot be started or reached or fails mid-call.
    Returns only once the session is closed and a stdio server's process reaped."""
    scope = anyio.CancelScope()
    outcome: dict[str, Any] = {}

    async def run() -> None:
        with scope:
            outcome["value"] = await _session_work(server, work)

    task = asyncio.create_task(run())
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        scope.cancel()  # an anyio cancel: the transport's shielded shutdown still runs
        await asyncio.shield(task)
        raise
    except TimeoutError:
        raise
    except Exception as error:
        reason = _describe(error)
        # The exception's own text may hold the URL or the command line (and so a secret).
        log.warning(
            "MCP server %s failed: %s (%s)", server.name, reason, type(_leaf(error)).__name__
        )
        raise McpUnavailable(reason) from error
    return outcome["value"]  # type: ignore[no-any-return]


def _leaf(error: BaseException) -> BaseException:
    """The one exception inside anyio's nested task-group exception groups."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _describe(error: BaseException) -> str:
    """A short, secret-free reason (no URL, header or command line in it)."""
    error = _leaf(error)
    if isinstance(error, OSError) and not isinstance(error, ConnectionError):
        return "the server could not be started"
    if isinstance(error, MCPError) and error.code == CONNECTION_CLOSED:
        return "the server closed the connection (it stopped or crashed)"
    if isinstance(error, MCPError):
        return f"the server refused the call (error {error.code})"
    if isinstance(error, httpx2.HTTPStatusError):
        return f"the server answered HTTP {error.response.status_code}"
    if isinstance(error, httpx2.TransportError):
        return "the server could not be reached"
    return "the server stopped or broke the protocol"
