"""The four dashboards read by Grafana's own typed schema (grafana-foundation-sdk, pinned to
the compose file's Grafana): nothing dropped or changed on a round trip through the typed
models, every value admitted by its field's type, every panel and query type known. Then
the same checks against dashboards with a fault injected, so each one is seen to fail."""

import copy
import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.models import timeseries
from grafana_foundation_sdk.models.dashboard import Panel

from tests.grafana_schema import (
    load,
    lost_fields,
    round_trip,
    schema_problems,
    type_errors,
    unknown_plugins,
)
from tests.test_monitoring_static import DASHBOARDS, ROOT, load_dashboard

SDK = "grafana-foundation-sdk"


def board(name: str = "api-performance") -> dict[str, Any]:
    """A fresh copy of a dashboard to inject faults into."""
    return copy.deepcopy(
        load_dashboard(ROOT / "monitoring" / "grafana" / "dashboards" / f"{name}.json")
    )


def test_the_schema_is_the_compose_files_grafana() -> None:
    """An unpinned SDK is an older Grafana's schema: its version must be the image's."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    image = compose["services"]["grafana"]["image"]
    # Versions read `<epoch>!<grafana version>`; the epoch orders builds of one version.
    schema_for = importlib.metadata.version(SDK).split("!")[-1]
    assert image == f"grafana/grafana:{schema_for}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_dashboard_survives_a_round_trip(path: Path) -> None:
    original = load_dashboard(path)
    assert lost_fields(original, round_trip(original)) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_dashboard_values_fit_their_types(path: Path) -> None:
    assert type_errors(load(load_dashboard(path))) == []


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_dashboard_panel_and_query_types_are_known(path: Path) -> None:
    assert unknown_plugins(load_dashboard(path)) == []


def test_the_typed_models_are_used() -> None:
    """Panel options, field config and queries load as the plugins' typed models, not as
    the untyped dicts the SDK falls back to (which would make the checks vacuous)."""
    loaded = load(board("system-overview"))
    panels = [panel for panel in loaded.panels or [] if isinstance(panel, Panel)]
    assert {plugin_of(panel.options) for panel in panels} == {"stat", "timeseries"}
    custom = {
        type(panel.field_config.defaults.custom)
        for panel in panels
        if panel.type_val == "timeseries" and panel.field_config is not None
    }
    assert custom == {timeseries.FieldConfig}
    queries = [query for panel in panels for query in panel.targets or []]
    assert queries
    assert {plugin_of(query) for query in queries} == {"prometheus"}


def plugin_of(model: object) -> str:
    """The SDK module a loaded value's class comes from (`builtins` for a plain dict)."""
    return type(model).__module__.rsplit(".", 1)[-1]


# --- Each check fails on a fault ------------------------------------------------------


def test_an_unknown_field_anywhere_is_reported() -> None:
    faulty = board()
    faulty["refreshh"] = "1m"
    faulty["panels"][0]["fieldConfig"]["defaults"]["decimalz"] = 2
    faulty["panels"][0]["options"]["legend"]["showLegendd"] = True
    faulty["panels"][0]["targets"][0]["legendFromat"] = "{{grpc_method}}"
    faulty["templating"]["list"][0]["definition"] = "label_values(up, job)"
    assert sorted(lost_fields(faulty, round_trip(faulty))) == [
        "$.panels[0].fieldConfig.defaults.decimalz: dropped (2)",
        "$.panels[0].options.legend.showLegendd: dropped (true)",
        '$.panels[0].targets[0].legendFromat: dropped ("{{grpc_method}}")',
        '$.refreshh: dropped ("1m")',
        '$.templating.list[0].definition: dropped ("label_values(up, job)")',
    ]


def test_a_field_of_a_panel_in_a_row_is_reported() -> None:
    faulty = board()
    nested = copy.deepcopy(faulty["panels"][0]) | {
        "id": 999,
        "gridPos": {"h": 8, "w": 12, "x": 0, "y": 99},
    }
    nested["options"]["tooltip"]["sortt"] = "desc"
    row = {"type": "row", "id": 998, "title": "More", "collapsed": True, "panels": [nested]}
    faulty["panels"].append(row | {"gridPos": {"h": 1, "w": 24, "x": 0, "y": 98}})
    where = f"$.panels[{len(faulty['panels']) - 1}].panels[0].options.tooltip.sortt"
    assert lost_fields(faulty, round_trip(faulty)) == [f'{where}: dropped ("desc")']


def test_a_value_the_type_does_not_admit_is_reported() -> None:
    faulty = board("system-overview")
    faulty["graphTooltip"] = 7
    faulty["panels"][0]["options"]["graphMode"] = "aera"
    faulty["panels"][0]["fieldConfig"]["defaults"]["unit"] = 5
    faulty["panels"][0]["targets"][0]["format"] = "timeseries"
    assert sorted(type_errors(load(faulty))) == [
        "$.graphTooltip: 7 is not a DashboardCursorSync",
        "$.panels[0].fieldConfig.defaults.unit: 5 is not a str",
        "$.panels[0].options.graphMode: 'aera' is not a BigValueGraphMode",
        "$.panels[0].targets[0].format: 'timeseries' is not a PromQueryFormat",
    ]


def test_unknown_panel_and_query_types_are_reported() -> None:
    faulty = board("system-overview")
    faulty["panels"][0]["type"] = "stats"
    faulty["panels"][1]["targets"][0]["datasource"]["type"] = "promethues"
    assert unknown_plugins(faulty) == [
        "panel 1 (Request rate): panel type 'stats'",
        "panel 2 (Server error rate) A: query type 'promethues'",
    ]
    assert len(schema_problems(faulty)) == 2


def test_a_changed_value_is_reported_and_a_null_may_go() -> None:
    assert lost_fields({"a": {"b": [1, True]}, "id": None}, {"a": {"b": [1, 1]}}) == [
        "$.a.b[1]: true became 1"
    ]
