"""The OpenAPI documents in gen/openapi/. The 2.0 one: fresh, and describing every REST
mapping of the contract (read from the descriptor set Envoy transcodes with) with its
request and response messages under the JSON names Envoy uses (the proto field names), and
which of their fields are required or output only (google.api.field_behavior). The 3.0
one: its conversion, fresh, saying all the 2.0 one says, and served by the running service
through Envoy (GET /openapi.json). Both valid by openapi-spec-validator."""

import functools
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.api import annotations_pb2, field_behavior_pb2, http_pb2
from google.protobuf import descriptor_pb2
from openapi_spec_validator import OpenAPIV2SpecValidator, OpenAPIV30SpecValidator, validate

from server.config import ROOT
from tests.backends import require_service
from tools import check_generated, openapi3

BIN = Path(sys.executable).parent
SPEC = ROOT / "gen" / check_generated.OPENAPI
SPEC3 = ROOT / "gen" / check_generated.OPENAPI3
DESCRIPTOR_SET = ROOT / "gen" / check_generated.DESCRIPTOR
VERBS = ("get", "put", "post", "delete", "patch")
JSON = dict[str, Any]


@dataclass(frozen=True)
class Route:
    """One HTTP binding of an RPC, as the descriptor set declares it."""

    service: str
    rpc: str
    verb: str
    path: str  # as Swagger writes it: `{name=pattern}` becomes `{name}`
    body: str
    request: str  # fully qualified message names, without the leading dot
    response: str
    streaming: bool


@functools.cache
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())


@functools.cache
def spec() -> JSON:
    document: JSON = json.loads(SPEC.read_text())
    return document


@functools.cache
def spec3() -> JSON:
    document: JSON = json.loads(SPEC3.read_text())
    return document


def _messages() -> dict[str, descriptor_pb2.DescriptorProto]:
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        found[f"{prefix}.{message.name}"] = message
        for nested in message.nested_type:
            add(f"{prefix}.{message.name}", nested)

    for file in descriptor_set().file:
        for message in file.message_type:
            add(file.package, message)
    return found


def _bindings(rule: http_pb2.HttpRule) -> Iterator[http_pb2.HttpRule]:
    if rule.WhichOneof("pattern"):
        yield rule
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def routes() -> list[Route]:
    """Every google.api.http binding in the descriptor set."""
    found = []
    for file in descriptor_set().file:
        for service in file.service:
            for method in service.method:
                rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
                for binding in _bindings(rule):
                    verb = binding.WhichOneof("pattern")
                    assert verb in VERBS, f"{service.name}.{method.name}: {verb} binding"
                    found.append(
                        Route(
                            service=service.name,
                            rpc=method.name,
                            verb=verb,
                            path=re.sub(r"\{([^}=]+)=[^}]*\}", r"{\1}", getattr(binding, verb)),
                            body=binding.body,
                            request=method.input_type.lstrip("."),
                            response=method.output_type.lstrip("."),
                            streaming=method.server_streaming,
                        )
                    )
    return found


def _definition(schema: JSON) -> JSON:
    prefix = "#/definitions/"
    ref = schema["$ref"]
    assert ref.startswith(prefix), ref
    definition: JSON = spec()["definitions"][ref.removeprefix(prefix)]
    return definition


def _field_names(message: str) -> set[str]:
    return {field.name for field in _messages()[message].field}


def _assert_schema_is(schema: JSON, message: str, seen: frozenset[str] = frozenset()) -> None:
    """`schema` is `message`, with the proto field names, and so are the messages it holds
    (google.protobuf types and maps are Swagger primitives and objects, not definitions)."""
    if message in seen:  # a recursive message: checked further up
        return
    properties: JSON = _definition(schema).get("properties", {})
    assert set(properties) == _field_names(message), message
    for field in _messages()[message].field:
        nested = field.type_name.lstrip(".")
        if field.type != field.TYPE_MESSAGE or nested.startswith("google.protobuf."):
            continue
        if _messages()[nested].options.map_entry:
            continue
        prop = properties[field.name]
        prop = prop["items"] if field.label == field.LABEL_REPEATED else prop
        _assert_schema_is(prop, nested, seen | {message})


def _operation(route: Route) -> JSON:
    operation: JSON = spec()["paths"][route.path][route.verb]
    return operation


def test_openapi_document_is_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    if not check_generated.openapi_plugin_available():
        require_service(
            f"{check_generated.SWAGGER_PLUGIN} is not on PATH ({check_generated.INSTALL_HINT})"
        )
    # buf runs `python` and the protoc plugins from the virtualenv.
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # The 3.0 document too where Node.js is here (the next test requires it in CI).
    convert = openapi3.converter_available()
    assert check_generated.stale_openapi(convert=convert) == [], (
        "gen/openapi/ is stale: run `make gen` and commit it"
    )


def test_openapi3_document_is_the_conversion_of_the_swagger_one() -> None:
    if not openapi3.converter_available():
        require_service(f"node and npm are not on PATH ({openapi3.INSTALL_HINT})")
    assert check_generated.stale_openapi3() == [], (
        f"gen/{check_generated.OPENAPI3} is stale: run `make gen` and commit it"
    )


@pytest.mark.parametrize(
    ("document", "validator"),
    [(SPEC, OpenAPIV2SpecValidator), (SPEC3, OpenAPIV30SpecValidator)],
    ids=["2.0", "3.0"],
)
def test_documents_are_valid_openapi(document: Path, validator: Any) -> None:
    """The lint: each document against its version's schema, every $ref resolved."""
    validate(json.loads(document.read_text()), cls=validator)


def _in_v3(node: Any) -> Any:
    """`node` of the 2.0 document with its references written as 3.0 writes them."""
    if isinstance(node, dict):
        return {
            key: value.replace("#/definitions/", "#/components/schemas/")
            if key == "$ref"
            else _in_v3(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_in_v3(item) for item in node]
    return node


def _operations(document: JSON) -> dict[tuple[str, str], JSON]:
    return {
        (path, verb): operation
        for path, item in document["paths"].items()
        for verb, operation in item.items()
        if verb in VERBS
    }


def test_openapi3_document_says_all_the_swagger_one_does() -> None:
    """The conversion drops no route, operation, parameter, body, response or schema."""
    assert spec3()["openapi"].startswith("3.0.")
    assert spec3()["info"] == spec()["info"]
    assert spec3()["components"]["schemas"] == _in_v3(spec()["definitions"])
    operations, operations3 = _operations(spec()), _operations(spec3())
    assert set(operations3) == set(operations)
    for key, operation in operations.items():
        converted = operations3[key]
        for field in ("operationId", "summary", "description", "tags"):
            assert converted.get(field) == operation.get(field), (key, field)
        for code, response in operation["responses"].items():
            content = converted["responses"][code].get("content", {})
            if "schema" in response:
                assert content == {"application/json": {"schema": _in_v3(response["schema"])}}
        parameters = [p for p in operation.get("parameters", []) if p["in"] != "body"]
        assert [(p["name"], p["in"], p.get("required", False)) for p in parameters] == [
            (p["name"], p["in"], p.get("required", False)) for p in converted.get("parameters", [])
        ], key
        body = [p for p in operation.get("parameters", []) if p["in"] == "body"]
        if body:
            request = converted["requestBody"]["content"]
            assert request == {"application/json": {"schema": _in_v3(body[0]["schema"])}}, key
        else:
            assert "requestBody" not in converted, key


async def test_the_running_service_serves_the_openapi3_document(
    rest: aiohttp.ClientSession,
) -> None:
    """GET /openapi.json on Envoy's public listener: the committed 3.0 document, as JSON,
    readable by a web page of any origin (CORS)."""
    headers = {"origin": "https://tools.example.org"}  # not among the API's allowed origins
    async with rest.get("/openapi.json", headers=headers) as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["access-control-allow-origin"] == "*"
    assert body == SPEC3.read_bytes()  # byte for byte: Envoy neither wraps nor reformats it


def test_every_rest_mapping_is_an_operation() -> None:
    expected = {(route.path, route.verb): route for route in routes()}
    assert spec()["swagger"] == "2.0"
    assert len(expected) >= len({(r.service, r.rpc) for r in routes()}) > 0
    operations = {(path, verb) for path, item in spec()["paths"].items() for verb in item}
    assert operations == set(expected)
    for route in expected.values():
        operation = _operation(route)
        assert operation["operationId"] == route.rpc
        assert operation["tags"] == [route.service]
    ids = [op["operationId"] for item in spec()["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), "Swagger needs unique operation ids"


@pytest.mark.parametrize("route", routes(), ids=lambda route: f"{route.service}.{route.rpc}")
def test_operation_has_the_request_and_response_messages(route: Route) -> None:
    operation = _operation(route)
    response = operation["responses"]["200"]
    _assert_schema_is(response["schema"], route.response)
    if route.streaming:
        assert "streaming" in response["description"]

    parameters = {p["name"]: p for p in operation.get("parameters", [])}
    path_parameters = set(re.findall(r"\{([^}]+)\}", route.path))
    assert {n for n, p in parameters.items() if p["in"] == "path"} == path_parameters
    request_fields = _field_names(route.request)
    if route.body == "*":
        _assert_schema_is(parameters["body"]["schema"], route.request)
    elif route.body:
        # The body is one field of the request: the schema is that field's message.
        field = next(f for f in _messages()[route.request].field if f.name == route.body)
        _assert_schema_is(parameters["body"]["schema"], field.type_name.lstrip("."))
        # protoc-gen-swagger 1.6.4 lists no query parameters beside a body field (here
        # `update_mask`, optional over REST), so the rest of the request is not checked.
    else:
        query = {n.split(".")[0] for n, p in parameters.items() if p["in"] == "query"}
        path_roots = {name.split(".")[0] for name in path_parameters}
        assert "body" not in parameters
        assert query | path_roots == request_fields


def test_every_reference_resolves() -> None:
    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    definitions = spec()["definitions"]
    missing = {ref for ref in refs(spec()) if ref.removeprefix("#/definitions/") not in definitions}
    assert not missing


REQUIRED = field_behavior_pb2.REQUIRED
# Output only, or the resource's id, which requests other than updates ignore.
OUTPUT_MARKS = {field_behavior_pb2.OUTPUT_ONLY, field_behavior_pb2.IDENTIFIER}


def _behaviors(field: descriptor_pb2.FieldDescriptorProto) -> set[int]:
    return set(field.options.Extensions[field_behavior_pb2.field_behavior])  # type: ignore[index]


def _described_messages(
    schema: JSON, message: str, seen: frozenset[str] = frozenset()
) -> Iterator[tuple[str, JSON]]:
    """`message` and the messages it holds, each with its definition in the document."""
    if message in seen:
        return
    definition = _definition(schema)
    yield message, definition
    for field in _messages()[message].field:
        nested = field.type_name.lstrip(".")
        if field.type != field.TYPE_MESSAGE or nested.startswith("google."):
            continue
        if _messages()[nested].options.map_entry:
            continue
        prop = definition["properties"][field.name]
        prop = prop["items"] if field.label == field.LABEL_REPEATED else prop
        yield from _described_messages(prop, nested, seen | {message})


def _route_schemas(route: Route) -> Iterator[tuple[str, JSON]]:
    """The messages an operation sends and receives, with their definitions."""
    operation = _operation(route)
    yield from _described_messages(operation["responses"]["200"]["schema"], route.response)
    parameters = {p["name"]: p for p in operation.get("parameters", [])}
    if route.body == "*":
        yield from _described_messages(parameters["body"]["schema"], route.request)
    elif route.body:
        field = next(f for f in _messages()[route.request].field if f.name == route.body)
        yield from _described_messages(parameters["body"]["schema"], field.type_name.lstrip("."))


def _emits(key: str) -> bool:
    """Whether the plugin writes `key` into any schema. protoc-gen-swagger 1.6.4 turns
    neither REQUIRED into a `required` list nor OUTPUT_ONLY into `readOnly`; later
    versions (protoc-gen-openapiv2) do, and then the lists must match the annotations."""
    for definition in spec()["definitions"].values():
        properties = definition.get("properties", {}).values()
        if key in definition or any(key in prop for prop in properties):
            return True
    return False


@pytest.mark.parametrize("route", routes(), ids=lambda route: f"{route.service}.{route.rpc}")
def test_required_and_output_only_fields_are_documented(route: Route) -> None:
    for message, definition in _route_schemas(route):
        fields = _messages()[message].field
        if _emits("required"):
            required = {f.name for f in fields if REQUIRED in _behaviors(f)}
            assert set(definition.get("required", [])) == required, message
        for field in fields:
            marks, where = _behaviors(field), f"{message}.{field.name}"
            prop: JSON = definition["properties"][field.name]
            # The comments say it as well, so the document tells its readers even where
            # the plugin ignores the annotation.
            if REQUIRED in marks:
                assert "Required" in prop.get("description", ""), where
            if marks & OUTPUT_MARKS:
                assert "Output only" in prop.get("description", ""), where
            if _emits("readOnly"):
                if field_behavior_pb2.OUTPUT_ONLY in marks:
                    assert prop.get("readOnly") is True, where
                elif not marks & OUTPUT_MARKS:
                    assert not prop.get("readOnly", False), where

    # Fields bound to the path or the query string are parameters, not properties.
    request_fields = {f.name: f for f in _messages()[route.request].field}
    for parameter in _operation(route).get("parameters", []):
        bound = request_fields.get(parameter["name"])
        if bound is not None and REQUIRED in _behaviors(bound):
            assert "Required" in parameter.get("description", ""), parameter["name"]
