"""Every agentmesh series a dashboard panel or an alert rule reads is on /metrics from the
first scrape of a fresh server, before any call: otherwise panels show "No data" and a
rate() alert cannot see the first increment (the Prometheus instrumentation guide's
advice). The label sets known at start are there exactly, and no others: the configured
model by every LLM purpose and outcome, every registered tool by every tool outcome."""

import asyncio
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from server import migrations
from services.agent.events import ToolOutcome
from services.agent.llm import PURPOSES
from tests.fake_llm import FakeLlm
from tests.harness import running_app
from tests.test_monitoring_static import alert_rules, dashboard_exprs, metric_names

MODEL = "first-scrape-model"
# Configured, never called: the tools are registered from their settings alone.
UNREACHABLE = "http://127.0.0.1:9"
TOOLS = {"knowledge_base_search", "web_search", "api_search"}
TOOL_SETTINGS = {
    "web_search_provider": "searxng",
    "web_search_url": f"{UNREACHABLE}/search",
    "api_tool_url": f"{UNREACHABLE}/records?q={{query}}",
}
Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    samples: dict[str, list[tuple[Labels, float]]]

    def names(self) -> set[str]:
        return set(self.samples)

    def label_sets(self, name: str, *labels: str) -> set[tuple[str, ...]]:
        """The values of `labels` on the samples of `name`."""
        return {
            tuple(dict(sample_labels)[label] for label in labels)
            for sample_labels, _ in self.samples.get(name, [])
        }

    def total(self, name: str) -> float:
        return sum(value for _, value in self.samples.get(name, []))


def product(*parts: Iterable[str]) -> set[tuple[str, ...]]:
    """Every combination of one value from each of `parts`, as label-value tuples."""
    return set(itertools.product(*parts))


def queried_names() -> set[str]:
    """The agentmesh sample names the dashboards and the alert rules query."""
    exprs = [expr for _, expr in dashboard_exprs()] + [rule["expr"] for rule in alert_rules()]
    return {name for expr in exprs for name in metric_names(expr) if name.startswith("agentmesh_")}


async def first_scrape(tmp_path: Path, **overrides: Any) -> Scrape:
    """/metrics of a fresh server with `overrides`, scraped before anything calls it."""
    database = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await asyncio.to_thread(migrations.upgrade, database)
    async with (
        running_app(database, tmp_path / "data", **overrides) as (app, _),
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            entry = (frozenset(sample.labels.items()), sample.value)
            samples.setdefault(sample.name, []).append(entry)
    return Scrape(samples)


async def test_every_queried_series_is_there_before_any_call(tmp_path: Path, llm: FakeLlm) -> None:
    scrape = await first_scrape(
        tmp_path, llm_base_url=llm.base_url, llm_model=MODEL, **TOOL_SETTINGS
    )
    assert llm.requests == []  # nothing has called the model: the series are declared

    queried = queried_names()
    assert len(queried) >= 30, "the dashboards and alerts query the agentmesh metrics"
    assert sorted(queried - scrape.names()) == []

    purposes, outcomes = set(PURPOSES.values()), {"ok", "error"}
    assert purposes == {"classify", "plan", "synthesize", "summarize"}
    llm_calls = scrape.label_sets("agentmesh_llm_calls_total", "model", "purpose", "outcome")
    assert llm_calls == product([MODEL], purposes, outcomes)
    durations = scrape.label_sets("agentmesh_llm_call_seconds_count", "model", "purpose")
    assert durations == product([MODEL], purposes)
    tokens = scrape.label_sets("agentmesh_llm_tokens_total", "model", "direction")
    assert tokens == product([MODEL], ["in", "out"])
    first_token = scrape.label_sets("agentmesh_llm_time_to_first_token_seconds_count", "model")
    assert first_token == {(MODEL,)}

    tool_calls = scrape.label_sets("agentmesh_tool_calls_total", "tool", "outcome")
    assert tool_calls == product(TOOLS, [outcome.value for outcome in ToolOutcome])
    assert scrape.label_sets("agentmesh_tool_call_seconds_count", "tool") == product(TOOLS)

    # Declared, not counted: every one of them still reads 0.
    for name in (
        "agentmesh_llm_calls_total",
        "agentmesh_llm_tokens_total",
        "agentmesh_llm_call_seconds_count",
        "agentmesh_tool_calls_total",
        "agentmesh_tool_call_seconds_count",
        "agentmesh_agent_queries_total",
        "agentmesh_agent_run_seconds_count",
    ):
        assert scrape.total(name) == 0, name


async def test_runs_are_declared_by_intent_and_outcome(tmp_path: Path) -> None:
    """Without an LLM (the extractive default) there is no model to name: no LLM series
    at all, while runs and the one registered tool are declared as with one."""
    scrape = await first_scrape(tmp_path)

    intents = {"greeting", "follow_up", "knowledge_base", "web_search", "api_lookup", "general"}
    runs = {"ok", "error", "cancelled", "timeout"}
    queries = scrape.label_sets("agentmesh_agent_queries_total", "intent", "outcome")
    assert queries == product(intents | {"unknown"}, runs) | {("unknown", "refused")}
    assert scrape.label_sets("agentmesh_agent_run_seconds_count", "outcome") == product(runs)

    llm_names = {name for name in scrape.names() if name.startswith("agentmesh_llm_")}
    assert llm_names == set()
    tool_calls = scrape.label_sets("agentmesh_tool_calls_total", "tool", "outcome")
    assert tool_calls == product(["knowledge_base_search"], [o.value for o in ToolOutcome])
