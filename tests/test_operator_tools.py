"""The operators' own tools against the real server: grpcurl and `buf curl`, by reflection.

The commands are the README's (between its operator-tools markers), run as written with
the test server's and Envoy's ports in place of 50051 and 8080 and a real user's token
in $TOKEN: if the README's commands stop working, this fails.
"""

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import pytest

from server.a2a_descriptors import SERVICE as A2A_SERVICE
from server.config import ROOT
from server.envoy import EnvoySidecar
from server.main import SERVICE_NAMES, Application
from server.reflection import V1, V1ALPHA
from server.served import INDEXING
from tests.harness import Stubs, new_user

BIN = Path(sys.executable).parent
README_BLOCK = re.compile(
    r"<!-- operator-tools:start -->\n```sh\n(.*?)```\n<!-- operator-tools:end -->", re.S
)
HEALTH = "grpc.health.v1.Health"
# The test server is the whole platform in one process: the index owner's internal
# service is there too.
LISTED = {*SERVICE_NAMES, A2A_SERVICE, INDEXING.name, HEALTH, V1, V1ALPHA}


def readme_commands() -> list[str]:
    block = README_BLOCK.search((ROOT / "README.md").read_text())
    assert block, "README.md lacks the operator-tools block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


async def shell(command: str, token: str = "") -> tuple[int, str]:
    """Run `command` with bash (the server is on this event loop: never block it); return its
    exit status and its stdout and stderr together."""
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TOKEN": token},
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return await process.wait(), output.decode()


def on_test_ports(command: str, app: Application, envoy: EnvoySidecar) -> str:
    return command.replace("localhost:50051", f"127.0.0.1:{app.grpc_port}").replace(
        "localhost:8080", f"127.0.0.1:{envoy.port}"
    )


def test_the_readme_shows_both_tools_listing_describing_and_calling() -> None:
    commands = readme_commands()
    for tool in ("grpcurl", "buf curl"):
        mine = [c for c in commands if c.startswith(tool)]
        assert any("list" in c for c in mine), tool
        assert any("$TOKEN" in c and "GetCurrentUser" in c for c in mine), tool
        assert any("localhost:8080" in c for c in mine), f"{tool} through Envoy"
    assert any(" describe " in c for c in commands)


@pytest.mark.parametrize("command", readme_commands(), ids=range(len(readme_commands())))
async def test_readme_command_works(
    command: str, app: Application, stubs: Stubs, envoy: EnvoySidecar
) -> None:
    account = await new_user(stubs, "operator")
    status, output = await shell(on_test_ports(command, app, envoy), account.access_token)
    assert status == 0, output
    if "$TOKEN" in command:
        assert json.loads(output)["user"]["email"] == account.email
    elif command.endswith(" list") or "--list-services" in command:
        assert set(output.split()) == LISTED
    elif "--list-methods" in command:
        assert "agentmesh.auth.v1.UserService/GetCurrentUser" in output.split()
    elif " describe " in command:
        assert "rpc GetCurrentUser ( .agentmesh.auth.v1.GetCurrentUserRequest )" in output
    else:
        pytest.fail(f"no expectation for {command!r}: add one")


@pytest.mark.parametrize("tool", ["grpcurl", "buf curl"])
async def test_a_call_without_a_token_is_unauthenticated(
    tool: str, app: Application, envoy: EnvoySidecar
) -> None:
    (command,) = [
        c for c in readme_commands() if c.startswith(tool) and "$TOKEN" in c and ":50051" in c
    ]
    status, output = await shell(on_test_ports(command, app, envoy), token="")
    assert status != 0
    assert "unauthenticated" in output.lower(), output


@pytest.mark.parametrize("protocol", ["grpc-v1", "grpc-v1alpha"])
async def test_reflection_answers_both_protocols(protocol: str, app: Application) -> None:
    """buf curl forced to one reflection protocol (without it, it tries v1, then v1alpha)."""
    status, output = await shell(
        f"buf curl --protocol grpc --http2-prior-knowledge --reflect-protocol {protocol}"
        f" --list-services http://127.0.0.1:{app.grpc_port}"
    )
    assert status == 0, output
    assert set(output.split()) == LISTED


async def test_the_v1_reflection_service_describes_itself(app: Application) -> None:
    status, output = await shell(f"grpcurl -plaintext 127.0.0.1:{app.grpc_port} describe {V1}")
    assert status == 0, output
    assert (
        "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )" in output
    )
