"""A small MCP tool server for the tests, on the official SDK (MCPServer, once FastMCP).

    python -m tests.mcp_fixture_server stdio
    python -m tests.mcp_fixture_server http PORT      # streamable HTTP at /mcp

Tools: `lookup` answers from a tiny catalogue (and tells which environment tag it runs
with), `crash` kills the server mid-call, `hang` never answers, `secret` must stay behind
the allow list. With FIXTURE_ONCE_FILE set it starts once (its tools can be listed), then
exits at every later start. Over HTTP, with FIXTURE_HTTP_TOKEN set, a request whose
Authorization header differs gets 401: the tests show configured headers arrive.
"""

import os
import sys

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send

CATALOGUE = {
    "kestrel": "The Kestrel pump is rated at 40 bar and weighs 212 kg.",
    "osprey": "The Osprey valve closes in 80 milliseconds.",
}

server = MCPServer("fixture")


@server.tool(description="Look up a part in the parts catalogue by its name.")
def lookup(part: str) -> str:
    found = CATALOGUE.get(part.lower(), f"No part named {part}.")
    return f"{found} (tag {os.environ.get('FIXTURE_TAG', 'none')})"


@server.tool(description="Crash the server while answering.")
def crash(part: str) -> str:
    os._exit(3)


@server.tool(description="Never answer.")
async def hang(part: str) -> str:
    await anyio.sleep(3600)
    return "unreachable"


@server.tool(description="A tool no allow list should let through.")
def secret(part: str) -> str:
    return "the launch codes"


def _bearer_only(app: ASGIApp, token: str) -> ASGIApp:
    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        if scope["type"] == "http" and headers.get(b"authorization") != token.encode():
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await app(scope, receive, send)

    return guarded


def main() -> None:
    if once := os.environ.get("FIXTURE_ONCE_FILE"):  # serves once, then fails to start
        if os.path.exists(once):
            sys.exit("started once already")
        open(once, "w").close()
    if sys.argv[1] == "stdio":
        server.run("stdio")
        return
    app: ASGIApp = server.streamable_http_app()
    if token := os.environ.get("FIXTURE_HTTP_TOKEN"):
        app = _bearer_only(app, token)
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")


if __name__ == "__main__":
    main()
