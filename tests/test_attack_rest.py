"""schemathesis over the OpenAPI document, through the real Envoy (issue 16).

Every operation of gen/openapi/agentmesh.swagger.json is fuzzed with schemathesis's
hypothesis strategies, positive (requests the document allows) and negative (requests it
does not), authenticated as whom the RPC is for (a user, or an administrator for ADMIN
RPCs), through the real Envoy transcoder into the real server. What is checked:

- never a 5xx (`not_a_server_error`), whatever the input;
- unary operations, positive data: a 200 body matches the document's schema and its
  media type (`response_schema_conformance`, `content_type_conformance`);
- every error body is a google.rpc.Status (integer `code`, string `message`) whose code maps
  to the HTTP status as google/rpc/code.proto says, with no Python internals in it;
- streams (server-sent events; the HTTP status is 200 before the first event, so errors
  arrive in the body): no event or body status with code UNKNOWN or INTERNAL.

Left out on purpose, because the document cannot say them: `status_code_conformance` (the
Swagger 2.0 document protoc-gen-swagger 1.6.4 writes declares only 200; every error status
would fail it), `negative_data_rejection` (the transcoder ignores unknown JSON fields by
design, TOOLCHAIN.md) and the schema checks on streams (the document describes one stream
message as the whole response; Envoy sends server-sent events).

One adaptation of the document: UpdateUser's path parameter `{user.user_id}` is renamed
`{user_id}` before loading, because schemathesis formats paths with str.format and reads
the dot as attribute access (KeyError: 'user'); the URL it sends is the same.

The application runs in this process's event loop, so each operation's hypothesis run
happens on a worker thread (schemathesis's transport is the blocking `requests`).
Examples are bounded and derandomized (REST_EXAMPLES per operation and mode).
"""

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from server.access import RPC_ACCESS, Access
from server.config import ROOT
from server.envoy import EnvoySidecar
from server.main import Application
from tests.attack import PYTHON_LEAK, contract_methods, method_path
from tests.harness import Account, Stubs, new_admin, new_user
from tools import check_generated

SPEC_PATH = ROOT / "gen" / check_generated.OPENAPI
EXAMPLES = int(os.environ.get("REST_EXAMPLES", "15"))
REST_FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
# google/rpc/code.proto: the HTTP status of each canonical code.
HTTP_OF_CODE = {
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}
SERVER_FAULT_CODES = {2, 13}


# A path parameter naming a field of the request's message (`{user.user_id}` of an Update
# RPC), which schemathesis cannot read: renamed to the field's own name.
DOTTED_PARAMETER = re.compile(r"\{(\w+)\.(\w+)\}")


def load_document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SPEC_PATH.read_text())
    paths = document["paths"]
    for path in [p for p in paths if DOTTED_PARAMETER.search(p)]:
        operations = paths.pop(path)
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                dotted = DOTTED_PARAMETER.fullmatch("{" + parameter["name"] + "}")
                if parameter.get("in") == "path" and dotted:
                    parameter["name"] = dotted.group(2)
        # Merged into GET/DELETE /v1/users/{user_id} and the like: the same URL template.
        paths.setdefault(DOTTED_PARAMETER.sub(r"{\2}", path), {}).update(operations)
    return document


SCHEMA = schemathesis.openapi.from_dict(load_document())
OPERATIONS: dict[str, APIOperation[Any, Any, Any, Any]] = {}
for _result in SCHEMA.get_all_operations():
    # An operation schemathesis cannot read fails the import, with its reason.
    assert isinstance(_result, Ok), f"{_result.err()!r}: {vars(_result.err())}"
    OPERATIONS[_result.ok().label] = _result.ok()
RPCS = {(method.containing_service.name, method.name): method for method in contract_methods()}


def rpc_of(label: str) -> Any:
    definition = OPERATIONS[label].definition.raw
    return RPCS[(definition["tags"][0], definition["operationId"])]


def test_every_rest_route_is_fuzzed() -> None:
    """Every RPC with a REST mapping is an operation here (the document is complete)."""
    routed = {
        (m.containing_service.name, m.name)
        for m in contract_methods()
        if m.containing_service.name != "IndexingService"
    }
    fuzzed = {(rpc_of(label).containing_service.name, rpc_of(label).name) for label in OPERATIONS}
    assert fuzzed == routed


@dataclass
class Rest:
    base_url: str
    app: Application
    stubs: Stubs
    admin: Account


@pytest.fixture(scope="module")
async def rest_target(app: Application, stubs: Stubs, envoy: EnvoySidecar) -> AsyncIterator[Rest]:
    yield Rest(f"http://127.0.0.1:{envoy.port}", app, stubs, await new_admin(app, stubs))


def _error_problem(label: str, response: schemathesis.Response) -> str | None:
    """A non-2xx body must be a google.rpc.Status whose code matches the HTTP status."""
    try:
        body = response.json()
    except ValueError:
        return (
            f"{label}: {response.status_code} with a body that is not JSON: {response.text[:200]!r}"
        )
    if not isinstance(body, dict) or not isinstance(body.get("code"), int):
        return f"{label}: {response.status_code} body is not a google.rpc.Status: {body!r:.200}"
    if not isinstance(body.get("message", ""), str):
        return f"{label}: message is not a string: {body!r:.200}"
    if HTTP_OF_CODE.get(body["code"]) != response.status_code:
        return f"{label}: code {body['code']} came as HTTP {response.status_code}"
    if leak := PYTHON_LEAK.search(body.get("message", "")):
        return f"{label}: the message shows {leak.group(0)!r}: {body!r:.300}"
    return None


def _stream_problem(label: str, response: schemathesis.Response) -> str | None:
    """Streams: every `data:` event, or a body that is a status, has no server-fault code."""
    text = response.text
    chunks = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    if not chunks and text.strip():
        chunks = [text.strip()]
    for chunk in chunks:
        try:
            event = json.loads(chunk)
        except ValueError:
            return f"{label}: a stream event that is not JSON: {chunk[:200]!r}"
        for status in (event, event.get("error") if isinstance(event, dict) else None):
            if isinstance(status, dict) and status.get("code") in SERVER_FAULT_CODES:
                return f"{label}: a server fault in the stream: {chunk[:300]}"
            if isinstance(status, dict) and (
                leak := PYTHON_LEAK.search(str(status.get("message", "")))
            ):
                return f"{label}: the stream shows {leak.group(0)!r}: {chunk[:300]}"
    return None


def _headers_for(target: Rest, label: str, user: Account) -> dict[str, str]:
    access = RPC_ACCESS[method_path(rpc_of(label))]
    account = target.admin if access is Access.ADMIN else user
    return {} if access is Access.PUBLIC else {"Authorization": f"Bearer {account.access_token}"}


def fuzz_operation(target: Rest, label: str, mode: GenerationMode, headers: dict[str, str]) -> None:
    """One operation's bounded hypothesis run (blocking: called on a worker thread)."""
    operation = OPERATIONS[label]
    streaming = rpc_of(label).server_streaming
    checks: list[CheckFunction] = [not_a_server_error]
    if mode is GenerationMode.POSITIVE and not streaming:
        checks += [response_schema_conformance, content_type_conformance]
    session = requests.Session()

    @REST_FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=target.base_url, session=session, headers=headers, timeout=60)
        case.validate_response(response, checks=checks)
        if streaming:
            problem = _stream_problem(label, response)
        elif response.status_code >= 400:
            problem = _error_problem(label, response)
        else:
            problem = None
        assert problem is None, f"{problem}\n{case.as_curl_command(headers)}"

    try:
        run()
    finally:
        session.close()


def negatable(label: str) -> bool:
    """Whether schemathesis can make input the document forbids: a body, or a parameter
    with a type or an enum (any text is a valid string path parameter)."""
    parameters = OPERATIONS[label].definition.raw.get("parameters", [])
    return any(
        p["in"] == "body" or p.get("type", "string") != "string" or "enum" in p for p in parameters
    )


CASES = [
    (label, mode)
    for label in sorted(OPERATIONS)
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or negatable(label)
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{lb} {m}" for lb, m in CASES])
async def test_no_request_through_envoy_is_a_server_error(
    rest_target: Rest, label: str, mode: GenerationMode
) -> None:
    user = await new_user(rest_target.stubs, "rest-fuzz")  # its own quotas and sessions
    headers = _headers_for(rest_target, label, user)
    await asyncio.to_thread(fuzz_operation, rest_target, label, mode, headers)
