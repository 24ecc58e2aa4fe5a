"""MCP tool servers as agent tools: real MCP server processes (tests/mcp_fixture_server.py)
over stdio and streamable HTTP, the real server, and the scripted LLM choosing their tools."""

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb

from server.config import ROOT
from server.main import Application
from services.agent.tools.mcp_config import McpConfigError, parse_servers
from services.agent.tools.mcp_toolbox import McpToolbox
from services.metrics import Metrics
from tests.agent import answer_text, cite, of_kind, stream, tool_names
from tests.backends import Database
from tests.fake_llm import FakeLlm, Script, ToolCallScript
from tests.harness import Stubs, new_admin, new_user, running_app
from tests.test_metrics import delta, scrape

TOKEN_VARIABLE = "AGENTMESH_TEST_MCP_TOKEN"
TOKEN = "fixture-token-1"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _stdio_server(name: str, allow: str, roles: str, intents: str, env: str) -> str:
    return f"""
- name: {name}
  transport: stdio
  command: {sys.executable}
  args: [-m, tests.mcp_fixture_server, stdio]
  cwd: {ROOT}
  env: {env}
  allow: {allow}
  roles: {roles}
  intents: {intents}
  timeout_seconds: 3
  max_result_chars: 2000
"""


def servers_file(http_port: int, once_file: Path, extra: str = "") -> str:
    tag = "{{FIXTURE_TAG: {}}}".format
    return (
        _stdio_server(
            "parts", "[lookup, crash, hang]", "[user, admin]", "[api_lookup]", tag("stdio")
        )
        + _stdio_server("vault", "[lookup]", "[admin]", "[api_lookup]", tag("vault"))
        # Lists its tools at start-up, then fails to start for a call.
        + _stdio_server(
            "flaky", "[lookup]", "[user]", "[api_lookup]", f"{{FIXTURE_ONCE_FILE: {once_file}}}"
        )
        + f"""
- name: remote
  transport: http
  url: http://127.0.0.1:{http_port}/mcp
  headers: {{Authorization: "Bearer ${{{TOKEN_VARIABLE}}}"}}
  allow: ["*"]
  roles: [user]
  intents: [api_lookup]
  timeout_seconds: 5
"""
        + extra
    )


@pytest.fixture(scope="module")
def http_server() -> Iterator[int]:
    """The fixture MCP server over streamable HTTP, refusing requests without the token."""
    port = _free_port()
    env = {**os.environ, "FIXTURE_HTTP_TOKEN": f"Bearer {TOKEN}", "FIXTURE_TAG": "http"}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.mcp_fixture_server", "http", str(port)], cwd=ROOT, env=env
    )
    try:
        while True:  # until it accepts connections (or died)
            assert process.poll() is None, "the MCP fixture server exited"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
        yield port
    finally:
        process.terminate()
        process.wait()


@pytest.fixture(scope="module")
async def mcp_app(
    database: Database,
    llm: FakeLlm,
    http_server: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[tuple[Application, Stubs, Path]]:
    path = tmp_path_factory.mktemp("mcp") / "mcp_servers.yaml"
    path.write_text(servers_file(http_server, path.with_name("flaky-started")))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TOKEN_VARIABLE, TOKEN)
        async with running_app(
            database.url,
            tmp_path_factory.mktemp("agent"),
            llm_base_url=llm.base_url,
            llm_model="scripted-model",
            llm_max_retries=0,
            intent_confidence=1.01,  # always ask the (scripted) LLM for the intent
            mcp_servers_file=path,
        ) as (app, stubs):
            yield app, stubs, path


@pytest.fixture
def stubs_(mcp_app: tuple[Application, Stubs, Path], llm: FakeLlm) -> Stubs:
    llm.reset()
    return mcp_app[1]


def children() -> set[int]:
    """The test process's live child processes (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def lookup(tool: str, part: str = "kestrel") -> list[ToolCallScript]:
    return [ToolCallScript(tool, json.dumps({"part": part}))]


@pytest.mark.parametrize(
    ("wire", "tool", "tag"),
    [("parts__lookup", "parts.lookup", "stdio"), ("remote__lookup", "remote.lookup", "http")],
)
async def test_the_agent_calls_an_mcp_tool_and_answers_from_its_result(
    mcp_app: tuple[Application, Stubs, Path],
    stubs_: Stubs,
    llm: FakeLlm,
    wire: str,
    tool: str,
    tag: str,
) -> None:
    app = mcp_app[0]
    user = await new_user(stubs_)
    llm.script = Script(
        intent="api_lookup",
        tool_calls=lookup(wire),
        answer=cite("40 bar", "The Kestrel pump is rated at 40 bar [{n}]."),
    )
    before = await scrape(app)
    events = await stream(stubs_, user, "What pressure is the Kestrel pump rated at?")

    [call] = of_kind(events, "tool_call")
    assert call.tool_name == tool and json.loads(call.arguments_json) == {"part": "kestrel"}
    [result] = of_kind(events, "tool_result")
    assert result.tool_name == tool and result.outcome == agent_pb2.TOOL_OUTCOME_OK
    assert f"(tag {tag})" in result.sources[0].snippet
    assert answer_text(events) == "The Kestrel pump is rated at 40 bar [1]."
    assert [c.title for c in of_kind(events, "citation")] == [tool]
    completed = of_kind(events, "completed")[0].message
    assert [(t.name, t.outcome) for t in completed.tool_calls] == [
        (tool, agent_pb2.TOOL_OUTCOME_OK)
    ]
    # The result reached the model as a fenced, untrusted source.
    [synthesis] = llm.requests_of("stream")
    assert f'type="api" title="{tool}"' in synthesis["messages"][-1]["content"]
    after = await scrape(app)
    assert delta(before, after, "agentmesh_tool_calls_total", tool=tool, outcome="ok") == 1
    assert delta(before, after, "agentmesh_tool_call_seconds_count", tool=tool) == 1


async def test_a_server_crashing_mid_call_is_a_tool_error_and_the_run_completes(
    stubs_: Stubs, llm: FakeLlm
) -> None:
    user = await new_user(stubs_)
    llm.script = Script(intent="api_lookup", tool_calls=lookup("parts__crash"), answer="Sorry.")
    before = children()
    events = await stream(stubs_, user, "Crash the parts server, please.")

    [result] = of_kind(events, "tool_result")
    assert result.tool_name == "parts.crash"
    assert result.outcome == agent_pb2.TOOL_OUTCOME_ERROR
    assert "closed the connection" in result.error_message
    assert events[-1].WhichOneof("event") == "completed"
    assert answer_text(events) == "Sorry."
    [synthesis] = llm.requests_of("stream")
    assert "These tools failed" in synthesis["messages"][-1]["content"]
    assert children() <= before  # the crashed server was reaped, nothing else is left


async def test_a_server_that_fails_to_start_is_a_tool_error_and_the_run_completes(
    stubs_: Stubs, llm: FakeLlm
) -> None:
    user = await new_user(stubs_)
    llm.script = Script(intent="api_lookup", tool_calls=lookup("flaky__lookup"), answer="Down.")
    before = children()
    events = await stream(stubs_, user, "Ask the flaky server.")

    [result] = of_kind(events, "tool_result")
    assert (result.tool_name, result.outcome) == ("flaky.lookup", agent_pb2.TOOL_OUTCOME_ERROR)
    assert result.error_message.startswith("MCP server flaky: ")
    assert events[-1].WhichOneof("event") == "completed"
    assert children() <= before


async def test_cancelling_a_run_stops_the_mcp_server_it_was_calling(
    stubs_: Stubs, llm: FakeLlm
) -> None:
    user = await new_user(stubs_)
    llm.script = Script(intent="api_lookup", tool_calls=lookup("parts__hang"), answer="Never.")
    before = children()
    call = stubs_.agent.StreamQuery(
        agent_pb.StreamQueryRequest(query="Ask the parts server something slow."),
        metadata=user.metadata,
    )
    events = []
    async for event in call:
        events.append(event)
        if event.WhichOneof("event") == "tool_call":
            request = agent_pb.CancelRunRequest(run_id=event.run_id)
            await stubs_.agent.CancelRun(request, metadata=user.metadata)
            break
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for event in call:
            events.append(event)
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    assert of_kind(events, "tool_result") == []
    assert children() <= before  # the hanging server was stopped with the run


async def test_a_hanging_tool_times_out_and_its_server_is_stopped(
    stubs_: Stubs, llm: FakeLlm
) -> None:
    user = await new_user(stubs_)
    llm.script = Script(intent="api_lookup", tool_calls=lookup("parts__hang"), answer="Late.")
    before = children()
    events = await stream(stubs_, user, "Ask the parts server something slow.")

    [result] = of_kind(events, "tool_result")
    assert (result.tool_name, result.outcome) == ("parts.hang", agent_pb2.TOOL_OUTCOME_TIMEOUT)
    assert events[-1].WhichOneof("event") == "completed"
    assert children() <= before


async def test_tools_outside_the_allow_list_or_the_callers_role_are_not_offered(
    mcp_app: tuple[Application, Stubs, Path], stubs_: Stubs, llm: FakeLlm
) -> None:
    user, admin = await new_user(stubs_), await new_admin(mcp_app[0], stubs_)
    llm.script = Script(intent="api_lookup", tool_calls=lookup("parts__secret"), answer="No.")
    events = await stream(stubs_, user, "Look up the launch codes.")

    offered = tool_names(llm.requests_of("tools")[0])
    assert {"parts__lookup", "parts__crash", "parts__hang", "remote__lookup"} <= set(offered)
    # `secret` is listed by both servers but allowed only by "remote" ("*").
    assert "parts__secret" not in offered and "vault__lookup" not in offered
    # Named anyway (as a document might ask), it is refused, not run.
    [refused] = of_kind(events, "tool_result")
    assert refused.outcome == agent_pb2.TOOL_OUTCOME_INVALID_ARGUMENTS

    llm.reset(Script(intent="api_lookup", tool_calls=lookup("vault__lookup"), answer="Ok."))
    events = await stream(stubs_, admin, "Look up the kestrel in the vault.")
    offered = tool_names(llm.requests_of("tools")[0])
    assert "vault__lookup" in offered and "remote__lookup" not in offered  # remote: users only
    [result] = of_kind(events, "tool_result")
    assert (result.tool_name, result.outcome) == ("vault.lookup", agent_pb2.TOOL_OUTCOME_OK)
    assert "(tag vault)" in result.sources[0].snippet


async def test_a_reload_adds_a_server_and_a_bad_file_keeps_the_previous_ones(
    mcp_app: tuple[Application, Stubs, Path], stubs_: Stubs, llm: FakeLlm, http_server: int
) -> None:
    app, _, path = mcp_app
    assert app.domain.mcp_tools is not None
    user = await new_user(stubs_)
    extra = _stdio_server("spares", "[lookup]", "[user]", "[api_lookup, general]", "{}")
    once = path.with_name("flaky-started")
    try:
        path.write_text(servers_file(http_server, once, extra))
        await app.domain.mcp_tools.reload()  # what SIGHUP starts (Domain.reload)
        llm.script = Script(intent="general", tool_calls=lookup("spares__lookup"), answer="Ok.")
        events = await stream(stubs_, user, "Which spares do we hold for the osprey?")
        assert "spares__lookup" in tool_names(llm.requests_of("tools")[0])
        [result] = of_kind(events, "tool_result")
        assert result.outcome == agent_pb2.TOOL_OUTCOME_OK

        path.write_text("- name: broken\n  transport: stdio\n")  # no command, no allow list
        await app.domain.mcp_tools.reload()
        llm.reset(Script(intent="general", answer="Ok."))
        await stream(stubs_, user, "Which spares do we hold for the osprey?")
        assert "spares__lookup" in tool_names(llm.requests_of("tools")[0])
    finally:
        path.write_text(servers_file(http_server, once))
        await app.domain.mcp_tools.reload()


async def test_the_new_tools_have_metric_series_from_the_first_scrape(
    mcp_app: tuple[Application, Stubs, Path],
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{mcp_app[0].ops.port}/metrics") as response,
    ):
        text = await response.text()
    assert 'agentmesh_tool_calls_total{outcome="timeout",tool="remote.hang"} ' in text


async def test_a_bad_servers_file_stops_the_start(tmp_path: Path) -> None:
    path = tmp_path / "mcp_servers.yaml"
    path.write_text("- name: docs\n  transport: stdio\n  command: docs-mcp\n  allow: ['*']\n")
    toolbox = McpToolbox(path, {}, Metrics(None))
    with pytest.raises(McpConfigError, match=r"entry 1 \('docs'\): roles: Field required"):
        await toolbox.start()


def test_the_servers_file_is_validated_strictly_naming_the_entry() -> None:
    missing_allow = "- name: docs\n  transport: stdio\n  command: docs-mcp\n  roles: [user]\n"
    with pytest.raises(McpConfigError, match=r"entry 1 \('docs'\): allow: Field required"):
        parse_servers(missing_allow, {})
    greeting = missing_allow + "  allow: ['*']\n  intents: [greeting]\n"
    with pytest.raises(McpConfigError, match=r"'docs'.*intents.*use no tools"):
        parse_servers(greeting, {})
    unknown_key = missing_allow + "  allow: ['*']\n  password: hunter2\n"
    with pytest.raises(McpConfigError, match="password: Extra inputs are not permitted"):
        parse_servers(unknown_key, {})
    secret = (
        "- name: web\n  transport: http\n  url: https://mcp.example.com/mcp\n"
        "  headers: {Authorization: 'Bearer ${WEB_TOKEN}'}\n  allow: [search]\n  roles: [admin]\n"
    )
    with pytest.raises(McpConfigError, match="'web' needs the environment variable WEB_TOKEN"):
        parse_servers(secret, {})
    [server] = parse_servers(secret, {"WEB_TOKEN": "s3cret"})
    assert server.headers == {"Authorization": "Bearer s3cret"}  # type: ignore[union-attr]
