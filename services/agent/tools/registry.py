"""The tool registry: which tools exist, which an intent may use (a table, filtered by the
caller's role), and their LangChain / OpenAI function-calling forms."""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from langchain_core.tools import BaseTool, StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel

from services.agent.intents import Intent
from services.agent.prompts import PromptManager
from services.agent.tools.base import Tool, ToolCallContext, ToolResult
from services.auth.principal import Principal, Role

# Which tools each intent may use, in the order their sources are numbered. Greetings and
# follow-ups answerable from the history use none, so the graph skips tool execution.
INTENT_TOOLS: Mapping[Intent, tuple[str, ...]] = {
    Intent.GREETING: (),
    Intent.FOLLOW_UP: (),
    Intent.KNOWLEDGE_BASE: ("knowledge_base_search",),
    Intent.WEB_SEARCH: ("web_search",),
    Intent.API_LOOKUP: ("api_search",),
    Intent.GENERAL: ("knowledge_base_search", "web_search"),
}
# Used when none of an intent's tools is configured (or open to the caller's role).
FALLBACK_TOOLS: tuple[str, ...] = ("knowledge_base_search",)


@dataclass(frozen=True)
class RoutedTool:
    """A tool that comes from configuration (an MCP server's), with the intents routed to
    it: rows its configuration adds to INTENT_TOOLS."""

    tool: Tool
    intents: frozenset[Intent]


class RoutedTools(Protocol):
    """Where configured tools come from; what it returns may change between runs (reload)."""

    def routed(self) -> tuple[RoutedTool, ...]: ...


def wire_name(name: str) -> str:
    """`name` as an OpenAI function name (^[a-zA-Z0-9_-]{1,64}$ has no dot): `server.tool`
    becomes `server__tool`; everywhere else (events, metrics, traces) the name stays."""
    return name.replace(".", "__", 1)


class ToolRegistry:
    """The configured tools (a tool whose service is not configured is not registered),
    plus those of `routed` (MCP servers), as they are at each call."""

    def __init__(
        self, tools: list[Tool], prompts: PromptManager, routed: RoutedTools | None = None
    ) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._prompts = prompts
        self._routed = routed

    def _configured(self) -> tuple[RoutedTool, ...]:
        return self._routed.routed() if self._routed is not None else ()

    def get_all_tools(self) -> list[Tool]:
        return [*self._tools.values(), *(r.tool for r in self._configured())]

    def get_tool_by_name(self, name: str) -> Tool | None:
        found = self._tools.get(name)
        if found is None:
            found = next((r.tool for r in self._configured() if r.tool.name == name), None)
        return found

    def tools_for(self, intent: Intent, role: Role) -> list[Tool]:
        """The tools the router allows for `intent` and a caller with `role`."""
        names = INTENT_TOOLS[intent]
        if not names:
            return []
        allowed = [
            self._tools[n] for n in names if n in self._tools and role in self._tools[n].roles
        ]
        allowed += [
            r.tool for r in self._configured() if intent in r.intents and role in r.tool.roles
        ]
        if allowed:
            return allowed
        return [
            self._tools[n]
            for n in FALLBACK_TOOLS
            if n in self._tools and role in self._tools[n].roles
        ]

    def description(self, tool: Tool) -> str:
        """The tool's description as the model sees it (rendered from its guidance prompt)."""
        return self._prompts.render(tool.guidance_prompt, **tool.prompt_variables())

    def as_langchain(self, tool: Tool, principal: Principal) -> BaseTool:
        """`tool` as a LangChain tool acting for `principal`."""

        async def run(**kwargs: Any) -> list[dict[str, Any]]:
            result: ToolResult = await tool.execute(
                tool.Args.model_validate(kwargs), ToolCallContext(principal)
            )
            return [vars(source) for source in result.sources]

        # A tool that brings its own JSON schema (an MCP server's) is offered with it.
        schema = getattr(tool, "input_schema", None)
        return StructuredTool.from_function(
            coroutine=run,
            name=wire_name(tool.name),
            description=self.description(tool),
            args_schema=schema if isinstance(schema, dict) else tool.Args,
        )

    def openai_specs(self, tools: list[Tool], principal: Principal) -> list[dict[str, Any]]:
        """The function-calling specs of `tools` (through their LangChain form)."""
        return [convert_to_openai_tool(self.as_langchain(tool, principal)) for tool in tools]


def validate_arguments(tool: Tool, raw_json: str) -> BaseModel:
    """The model's JSON arguments for `tool`, parsed and validated (ValueError if they fail)."""
    return tool.Args.model_validate_json(raw_json or "{}")
