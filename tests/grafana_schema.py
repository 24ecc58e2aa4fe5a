"""Grafana's own typed dashboard schema as a check of dashboard JSON, offline.

No Grafana server can be installed here; `grafana-foundation-sdk`, pinned to the compose
file's Grafana version, holds the schema that version reads: the dashboard, its panels and
rows, each panel plugin's options and field config, and each data source's query. A
dashboard is loaded into those typed models and written back; whatever the models have no
field for is dropped on the way, and whatever value a field's type cannot hold (a misspelt
enum member, a string where a number goes) is reported by walking the loaded models
against their type annotations. The SDK itself validates nothing: it copies values as
they come.
"""

import enum
import json
import types
import typing
from typing import Any

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog import runtime as cogruntime
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.test_monitoring_static import panels

JSON = dict[str, Any]
SDK_MODELS = "grafana_foundation_sdk.models."


def load(board: JSON) -> Dashboard:
    """`board` in the SDK's typed models, with every panel and query plugin it ships."""
    # The SDK keeps its plugin registry in a process-wide singleton; registering is
    # idempotent, and without it panel options and queries stay untyped dicts.
    plugins.register_default_plugins()
    return Dashboard.from_json(board)


def round_trip(board: JSON) -> JSON:
    """`board` loaded into the typed models and serialised back to plain JSON."""
    loaded: JSON = json.loads(json.dumps(load(board), cls=JSONEncoder))
    return loaded


def lost_fields(original: Any, written: Any, path: str = "$") -> list[str]:
    """The JSON path of every key or value of `original` that `written` does not keep.

    Keys only in `written` are the defaults the SDK adds, and are not reported; nor is a
    null that comes back absent (`"id": null`): Grafana reads a null optional field as an
    absent one, and a null under an unknown key carries nothing to lose.
    """
    if isinstance(original, dict):
        if not isinstance(written, dict):
            return [f"{path}: an object became {json.dumps(written)}"]
        lost = []
        for key, value in original.items():
            if key in written:
                lost += lost_fields(value, written[key], f"{path}.{key}")
            elif value is not None:
                lost.append(f"{path}.{key}: dropped ({json.dumps(value)[:60]})")
        return lost
    if isinstance(original, list):
        if not isinstance(written, list) or len(written) != len(original):
            return [f"{path}: a list of {len(original)} became {json.dumps(written)[:60]}"]
        return [
            lost
            for index, (item, back) in enumerate(zip(original, written, strict=True))
            for lost in lost_fields(item, back, f"{path}[{index}]")
        ]
    # bool is an int to Python: true must not pass for 1.
    if original != written or isinstance(original, bool) != isinstance(written, bool):
        return [f"{path}: {json.dumps(original)} became {json.dumps(written)}"]
    return []


def unknown_plugins(board: JSON) -> list[str]:
    """Panel types and query data source types the SDK has no typed model for (their
    options or queries would pass through as untyped dicts, unchecked)."""
    plugins.register_default_plugins()
    known_queries = cogruntime.Runtime().dataquery_variants
    unknown = []
    for panel in panels(board):
        where = f"panel {panel.get('id')} ({panel.get('title')})"
        kind = panel.get("type", "")
        if kind != "row" and cogruntime.panelcfg_config(kind) is None:
            unknown.append(f"{where}: panel type {kind!r}")
        for target in panel.get("targets", []):
            source = (target.get("datasource") or panel.get("datasource") or {}).get("type")
            if source not in known_queries:
                unknown.append(f"{where} {target.get('refId')}: query type {source!r}")
    return unknown


def type_errors(model: object, path: str = "$") -> list[str]:
    """Every attribute of a loaded model (and the models inside it) whose value its type
    annotation does not admit, e.g. an enum field holding a string that is no member."""
    if isinstance(model, cogruntime.UnknownDataquery):
        return []  # reported by unknown_plugins
    hints = typing.get_type_hints(type(model))
    return [
        error
        for name, hint in hints.items()
        for error in _check(getattr(model, name), hint, f"{path}.{json_name(name)}")
    ]


def json_name(attribute: str) -> str:
    """The JSON key of a model attribute, as the SDK's generator names them: camelCase,
    and `_val` appended to keys that shadow Python names (`type_val` is `type`)."""
    first, *rest = attribute.removesuffix("_val").split("_")
    return first + "".join(word.capitalize() for word in rest)


def _is_model(value: object) -> bool:
    return type(value).__module__.startswith(SDK_MODELS) and hasattr(value, "to_json")


def _check(value: object, hint: Any, path: str) -> list[str]:
    """What is wrong with `value` as a `hint` (the empty list when nothing is)."""
    if _is_model(value) and not isinstance(value, enum.Enum):
        # Panel options and field config are annotated `object`: their plugin types them.
        if isinstance(hint, type) and hint is not object and not isinstance(value, hint):
            return [f"{path}: a {type(value).__name__} where a {hint.__name__} goes"]
        return type_errors(value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return []
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return []
        failures = [_check(value, arm, path) for arm in args if arm is not type(None)]
        return [] if any(not f for f in failures) else min(failures, key=len)
    if origin is typing.Literal:
        return [] if value in args else [f"{path}: {value!r} is not one of {list(args)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [e for i, item in enumerate(value) for e in _check(item, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object"]
        return [e for key, item in value.items() for e in _check(item, args[1], f"{path}.{key}")]
    if isinstance(hint, type):
        return _check_plain(value, hint, path)
    return []  # a construct the generated models do not use


def _check_plain(value: object, hint: type, path: str) -> list[str]:
    if issubclass(hint, enum.Enum):
        members = {member.value for member in hint}
        return [] if value in members else [f"{path}: {value!r} is not a {hint.__name__}"]
    if hint is cogvariants.Dataquery:
        ok = isinstance(value, hint)
        return type_errors(value, path) if ok else [f"{path}: {value!r} is not a query"]
    if hint is bool or not isinstance(value, bool):
        # JSON numbers: an integer is a valid float.
        admitted = (int, float) if hint is float else (hint,)
        if isinstance(value, admitted):
            return []
    return [f"{path}: {json.dumps(value, default=str)[:60]} is not a {hint.__name__}"]


def schema_problems(board: JSON) -> list[str]:
    """Everything Grafana's typed schema cannot read in `board`: dropped or changed fields,
    values their field's type does not admit, and panel or query types it does not know."""
    return lost_fields(board, round_trip(board)) + type_errors(load(board)) + unknown_plugins(board)
