"""Agent calls the tests share: streamed runs collected into events."""

import json
import re
from typing import Any

from agentmesh.agent.v1 import agent_service_pb2 as agent_pb

from tests.fake_llm import JSON
from tests.harness import Account, Stubs


async def stream(
    stubs: Stubs, account: Account, query: str, conversation_id: str = ""
) -> list[agent_pb.StreamQueryResponse]:
    request = agent_pb.StreamQueryRequest(query=query, conversation_id=conversation_id)
    return [event async for event in stubs.agent.StreamQuery(request, metadata=account.metadata)]


def of_kind(events: list[agent_pb.StreamQueryResponse], kind: str) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def answer_text(events: list[agent_pb.StreamQueryResponse]) -> str:
    return "".join(t.text for t in of_kind(events, "token"))


def source_number(body: JSON, needle: str) -> int:
    """The number the synthesis prompt gave the source whose text contains `needle`."""
    prompt = body["messages"][-1]["content"]
    for match in re.finditer(r'<source id="(\d+)"[^>]*>\n(.*?)\n</source>', prompt, re.S):
        if needle in match.group(2):
            return int(match.group(1))
    raise AssertionError(f"no source containing {needle!r} in the prompt")


def tool_names(body: JSON) -> list[str]:
    return [tool["function"]["name"] for tool in body.get("tools", [])]


def arguments(query: str) -> str:
    return json.dumps({"query": query})


def cite(needle: str, text: str) -> "ToolAnswer":
    """A scripted answer citing the source that contains `needle`: `text` with `{n}`."""
    return ToolAnswer(needle, text)


class ToolAnswer:
    """An answer that cites the prompt's source containing `needle` by its number."""

    def __init__(self, needle: str, text: str) -> None:
        self.needle, self.text = needle, text

    def __call__(self, body: JSON) -> str:
        return self.text.format(n=source_number(body, self.needle))
