"""Turning the model's tool calls into calls the router allows, with validated arguments."""

import json
from dataclasses import dataclass

from pydantic import ValidationError

from services.agent.llm import RawToolCall
from services.agent.state import PlannedCall
from services.agent.tools.base import Tool
from services.agent.tools.registry import validate_arguments, wire_name


@dataclass(frozen=True)
class RejectedCall:
    call_id: str
    tool_name: str
    arguments_json: str
    error: str


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in item["loc"]) or "arguments"
        parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


def vet_calls(
    raw_calls: list[RawToolCall], allowed: list[Tool], first_id: int
) -> tuple[list[PlannedCall], list[RejectedCall]]:
    """Split the model's calls into those to run and those refused: a tool the router did not
    offer for this question (whatever a document asked for), or arguments that fail the
    tool's schema. Each tool runs at most once."""
    # The model names tools by their function names (`server__tool` for `server.tool`).
    by_name = {wire_name(tool.name): tool for tool in allowed} | {t.name: t for t in allowed}
    planned: list[PlannedCall] = []
    rejected: list[RejectedCall] = []
    for number, raw in enumerate(raw_calls, start=first_id):
        call_id = f"call-{number}"
        tool = by_name.get(raw.name)
        if tool is None:
            rejected.append(
                RejectedCall(
                    call_id, raw.name, raw.arguments, "this tool is not available for this question"
                )
            )
            continue
        if any(p.tool.name == tool.name for p in planned):
            rejected.append(
                RejectedCall(call_id, tool.name, raw.arguments, "the tool was already called")
            )
            continue
        try:
            args = validate_arguments(tool, raw.arguments)
        except ValidationError as error:
            rejected.append(RejectedCall(call_id, tool.name, raw.arguments, _describe(error)))
            continue
        planned.append(PlannedCall(call_id, tool, args, args.model_dump_json()))
    return planned, rejected


def default_calls(allowed: list[Tool], query: str, first_id: int) -> list[PlannedCall]:
    """Every allowed tool that takes the question as its query (no model, or it chose
    nothing); a tool with other arguments (an MCP server's) runs only when the model calls it."""
    calls: list[PlannedCall] = []
    for tool in allowed:
        try:
            args = tool.Args.model_validate({"query": query[:400]})
        except ValidationError:
            continue
        number = first_id + len(calls)
        calls.append(PlannedCall(f"call-{number}", tool, args, json.dumps({"query": query[:400]})))
    return calls
