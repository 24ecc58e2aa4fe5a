"""The tool registry: which tools exist, which an intent may use (a table, filtered by the
caller's role), and their LangChain / OpenAI function-calling forms."""

from collections.abc import Mapping
from typing import Any

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


class ToolRegistry:
    """The configured tools (a tool whose service is not configured is not registered)."""

    def __init__(self, tools: list[Tool], prompts: PromptManager) -> None:
        self._tools = {tool.name: tool for tool in tools}
        self._prompts = prompts

    def get_all_tools(self) -> list[Tool]:
        return list(self._tools.values())

    def get_tool_by_name(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def tools_for(self, intent: Intent, role: Role) -> list[Tool]:
        """The tools the router allows for `intent` and a caller with `role`."""
        names = INTENT_TOOLS[intent]
        if not names:
            return []
        allowed = [
            self._tools[n] for n in names if n in self._tools and role in self._tools[n].roles
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

        return StructuredTool.from_function(
            coroutine=run,
            name=tool.name,
            description=self.description(tool),
            args_schema=tool.Args,
        )

    def openai_specs(self, tools: list[Tool], principal: Principal) -> list[dict[str, Any]]:
        """The function-calling specs of `tools` (through their LangChain form)."""
        return [convert_to_openai_tool(self.as_langchain(tool, principal)) for tool in tools]


def validate_arguments(tool: Tool, raw_json: str) -> BaseModel:
    """The model's JSON arguments for `tool`, parsed and validated (ValueError if they fail)."""
    return tool.Args.model_validate_json(raw_json or "{}")
