"""The MCP servers file: which Model Context Protocol tool servers the agent may use.

A YAML list, validated strictly (an unknown key, a missing allow list or a bad intent is
an error naming the entry). Secrets never live in the file: a value may name environment
variables as `${NAME}`, which are read when the file is loaded, so the child's environment
and HTTP headers can carry credentials the file only points to.

    - name: docs                      # tools become docs.<tool>
      transport: stdio
      command: python
      args: [-m, docs_mcp_server]
      env: {DOCS_TOKEN: "${DOCS_MCP_TOKEN}"}
      allow: [search, read_page]      # or ["*"]: every tool the server lists
      roles: [user, admin]
      intents: [general, api_lookup]
    - name: tickets
      transport: http
      url: https://mcp.example.com/mcp
      headers: {Authorization: "Bearer ${TICKETS_MCP_TOKEN}"}
      allow: ["*"]
      roles: [admin]
"""

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from services.agent.intents import Intent
from services.auth.principal import Role

# Tool names become `server.tool`, and on the OpenAI wire `server__tool` (^[a-zA-Z0-9_-]{1,64}$).
SERVER_NAME = r"^[A-Za-z0-9-]{1,24}$"
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Intents that by design use no tool (the graph skips tool execution for them).
TOOLLESS_INTENTS = frozenset({Intent.GREETING, Intent.FOLLOW_UP})


class McpConfigError(ValueError):
    """The MCP servers file cannot be used; the message names the entry and the field."""


class _Server(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=SERVER_NAME)
    allow: tuple[str, ...] = Field(min_length=1)
    """The tools offered: their names as the server lists them, or "*" for all of them."""
    roles: frozenset[Role] = Field(min_length=1)
    intents: frozenset[Intent] = frozenset({Intent.GENERAL})
    timeout_seconds: float = Field(default=15.0, gt=0, le=600)
    max_result_chars: int = Field(default=8000, gt=0, le=200_000)

    @field_validator("intents")
    @classmethod
    def _tool_intents(cls, intents: frozenset[Intent]) -> frozenset[Intent]:
        if toolless := intents & TOOLLESS_INTENTS:
            raise ValueError(f"{sorted(toolless)} use no tools")
        return intents


class StdioServer(_Server):
    transport: Literal["stdio"]
    command: str = Field(min_length=1)
    args: tuple[str, ...] = ()
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None


class HttpServer(_Server):
    transport: Literal["http"]
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)


McpServer = StdioServer | HttpServer
_ENTRY: TypeAdapter[McpServer] = TypeAdapter(Annotated[McpServer, Field(discriminator="transport")])


def _substituted(value: str, environ: Mapping[str, str], where: str) -> str:
    def variable(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise McpConfigError(f"{where} needs the environment variable {name}, which is unset")
        return environ[name]

    return _VARIABLE.sub(variable, value)


def _resolved(server: McpServer, environ: Mapping[str, str]) -> McpServer:
    """`server` with every `${NAME}` in its env, headers, URL and arguments read."""
    where = f"MCP server {server.name!r}"
    if isinstance(server, StdioServer):
        return server.model_copy(
            update={
                "env": {k: _substituted(v, environ, where) for k, v in server.env.items()},
                "args": tuple(_substituted(a, environ, where) for a in server.args),
            }
        )
    return server.model_copy(
        update={
            "url": _substituted(server.url, environ, where),
            "headers": {k: _substituted(v, environ, where) for k, v in server.headers.items()},
        }
    )


def _field(loc: tuple[int | str, ...]) -> str:
    """The field an error is about, without the transport the union was matched on."""
    if loc and loc[0] in ("stdio", "http"):
        loc = loc[1:]
    return ".".join(str(part) for part in loc) or "entry"


def _entry_name(raw: Any, index: int) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"entry {index + 1} ({name!r})" if name else f"entry {index + 1}"


def parse_servers(text: str, environ: Mapping[str, str], source: str = "") -> list[McpServer]:
    """The servers of an MCP servers file's `text`; McpConfigError names what is wrong."""
    where = source or "the MCP servers file"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise McpConfigError(f"{where} is not YAML: {error}") from None
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise McpConfigError(f"{where} must be a list of servers")
    servers: list[McpServer] = []
    for index, entry in enumerate(raw):
        try:
            server = _ENTRY.validate_python(entry)
        except ValidationError as error:
            problems = "; ".join(
                f"{_field(item['loc'])}: {item['msg']}"
                if not item["type"].startswith("union_tag")
                else "transport: should be 'stdio' or 'http'"
                for item in error.errors(include_url=False, include_input=False)
            )
            raise McpConfigError(f"{where}, {_entry_name(entry, index)}: {problems}") from None
        if any(s.name == server.name for s in servers):
            raise McpConfigError(f"{where}: the server name {server.name!r} is used twice")
        servers.append(_resolved(server, environ))
    return servers


def load_servers(path: Path | None, environ: Mapping[str, str]) -> list[McpServer]:
    """The servers of the file at `path` (none when it is unset)."""
    if path is None:
        return []
    try:
        text = path.read_text()
    except OSError as error:
        raise McpConfigError(f"cannot read the MCP servers file {path}: {error}") from None
    return parse_servers(text, environ, str(path))
