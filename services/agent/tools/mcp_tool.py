"""One tool of an MCP server as an agent tool, named `server.tool`.

Its arguments are the server's JSON schema (validated here, so a bad call is refused as
INVALID_ARGUMENTS like a built-in tool's); its result is untrusted text, capped, that
becomes one source of the answer, fenced as data in the synthesis prompt like a web
result: nothing in it can add a tool or a permission, because which tools a run may call
is decided before any result exists (the router's table and the caller's role).
"""

import json
from typing import Any, ClassVar

import jsonschema
import mcp_types
from mcp import Client
from pydantic import BaseModel, ConfigDict, model_validator

from services.agent.tools.base import (
    Source,
    SourceKind,
    Tool,
    ToolCallContext,
    ToolFailed,
    ToolResult,
)
from services.agent.tools.mcp_config import McpServer
from services.agent.tools.mcp_session import McpUnavailable, in_session

MAX_DESCRIPTION_CHARS = 1000
TRUNCATED = "\n[… result truncated]"


class McpArguments(BaseModel):
    """Arguments checked against the server's JSON schema, kept as given."""

    model_config = ConfigDict(extra="allow")
    input_schema: ClassVar[dict[str, Any]] = {"type": "object"}

    @model_validator(mode="before")
    @classmethod
    def _matches_schema(cls, data: Any) -> Any:
        validator = jsonschema.validators.validator_for(cls.input_schema)(cls.input_schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "arguments"
            raise ValueError(f"{where}: {error.message[:200]}")
        return data


def result_text(result: mcp_types.CallToolResult) -> str:
    """The text of a tool result: its text blocks and text resources, else its structured
    content as JSON; other media are named, not inlined."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource) and isinstance(
            block.resource, mcp_types.TextResourceContents
        ):
            parts.append(block.resource.text)
        else:
            parts.append(f"[{block.type} content omitted]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


def capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - len(TRUNCATED))] + TRUNCATED


class McpTool(Tool):
    """A tool of an MCP server; made per listed tool by `McpTool.of`."""

    kind = SourceKind.API
    Args: ClassVar[type[BaseModel]] = McpArguments
    guidance_prompt = "tools/mcp_tool.j2"
    server: ClassVar[McpServer]
    remote_name: ClassVar[str]
    summary_text: ClassVar[str]
    input_schema: ClassVar[dict[str, Any]]

    @classmethod
    def of(cls, server: McpServer, listed: mcp_types.Tool) -> type["McpTool"]:
        """The tool class of `listed` (a tool of `server`); ValueError for a bad schema."""
        schema = dict(listed.input_schema)
        jsonschema.validators.validator_for(schema).check_schema(schema)
        args = type(f"{listed.name}_arguments", (McpArguments,), {"input_schema": schema})
        attributes = {
            "name": f"{server.name}.{listed.name}",
            "Args": args,
            "roles": frozenset(server.roles),
            "server": server,
            "remote_name": listed.name,
            "summary_text": (listed.description or listed.title or listed.name)[
                :MAX_DESCRIPTION_CHARS
            ],
            "input_schema": schema,
        }
        return type(f"Mcp_{server.name}_{listed.name}", (cls,), attributes)

    def prompt_variables(self) -> dict[str, object]:
        return {"server": self.server.name, "description": self.summary_text}

    async def execute(self, args: BaseModel, call: ToolCallContext) -> ToolResult:
        arguments = args.model_dump()

        async def call_tool(client: Client) -> mcp_types.CallToolResult:
            return await client.call_tool(self.remote_name, arguments)

        try:
            result = await in_session(self.server, call_tool)
        except McpUnavailable as error:
            raise ToolFailed(f"MCP server {self.server.name}: {error}") from error
        text = capped(result_text(result), self.server.max_result_chars)
        if result.is_error:
            # The server's own words are untrusted: shown capped, never to the model.
            raise ToolFailed(f"{self.name} reported an error: {text[:200]}")
        source = Source(kind=SourceKind.API, title=self.name, text=text)
        return ToolResult([source], f"{len(text)} characters from {self.name}")
