"""The dashboards and alerts against a real Prometheus scraping the real application.

One (expensive) test: agentmesh with a scripted LLM, a fake web search API, Redis and small
limits; an Envoy in front of it; Prometheus 2.42 (Debian's `prometheus`) scraping both
every second with monitoring/prometheus/alerts.yml loaded. A scripted workload that touches
everything the dashboards show runs twice (so the series it creates have earlier samples
and rates are numbers, not NaN); then every panel and variable query must return data with
a number and the labels its legend shows, every alert expression must parse, evaluate and
find a series for each metric it names, every metric name the dashboards and alerts use
must be one the processes really expose, and no label may carry a user's data.
"""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import contextlib
import re
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.feedback.v1 import feedback_pb2 as fb
from agentmesh.feedback.v1 import feedback_service_pb2 as fb_service
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from prometheus_client.parser import text_string_to_metric_families

from server import migrations
from server.envoy import EnvoySidecar
from server.main import Application
from tests.agent import arguments, of_kind, stream
from tests.backends import require_service
from tests.documents import make_pdf
from tests.fake_llm import FakeLlm, Script, ToolCallScript
from tests.fake_web import FakeWeb
from tests.harness import (
    PASSWORD,
    Account,
    Stubs,
    envoy_for,
    new_admin,
    running_app,
    unique_email,
)
from tests.knowledge import ingest, search, upload, wait_settled
from tests.limited import REDIS_URL, exhausted, redis_up
from tests.test_monitoring_static import (
    DASHBOARDS,
    PROMETHEUS,
    alert_rules,
    dashboard_exprs,
    grafana_to_promql,
    load_dashboard,
    metric_names,
    panels,
)

JSON = dict[str, Any]
SCRAPE_SECONDS = 1
# Small limits, so that one scripted burst reaches each of them.
CREDENTIALS_PER_IP = 3
USER_DAILY_QUERIES = 2
# Client addresses (documentation ranges) claimed in x-forwarded-for; the test's own
# loopback peer is trusted as a proxy, so the limiter counts these. One address of each
# per round: alice's, bob's and a password guesser's.
CLIENT_NETS = ("203.0.113", "192.0.2", "198.51.100")
ROUNDS = 2
# agentmesh's own RPCs (not health checks or reflection).
AGENTMESH_RPCS = 'grpc_server_handled_total{job="agentmesh", grpc_service=~"agentmesh\\\\..*"}'
ENVOY_PUBLIC = 'envoy_http_downstream_{}{{job="envoy", envoy_http_conn_manager_prefix="public"}}'
ZEPHYR = (
    b"The Zephyr research reactor is cooled with liquid sodium at 550 degrees Celsius.\n\n"
    b"Its core was designed in Grenoble and first reached criticality in 1971."
)


# --- Prometheus -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def prometheus_config(port: int, app_port: int, envoy_admin: str) -> JSON:
    """The shipped monitoring/prometheus/prometheus.yml, pointed at the test's processes and
    scraping every second."""
    interval = f"{SCRAPE_SECONDS}s"
    return {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": "agentmesh", "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]},
            {
                "job_name": "envoy",
                "metrics_path": "/stats/prometheus",
                "static_configs": [{"targets": [envoy_admin]}],
            },
            {"job_name": "prometheus", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]},
        ],
    }


class Prometheus:
    """A Prometheus server on a free loopback port, its data and config in `workdir`."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self._binary = binary
        self._workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def log(self) -> str:
        path = self._workdir / "prometheus.log"
        return path.read_text()[-4000:] if path.exists() else ""

    async def start(self, app_port: int, envoy_admin: str) -> None:
        self._workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROMETHEUS / "alerts.yml", self._workdir / "alerts.yml")
        config = self._workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(prometheus_config(self.port, app_port, envoy_admin)))
        with (self._workdir / "prometheus.log").open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                self._binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self._workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdout=log,
                stderr=log,
            )
        self._http = aiohttp.ClientSession(base_url=self.url)
        async with asyncio.timeout(30):
            while True:
                if self._process.returncode is not None:
                    raise AssertionError(f"prometheus exited:\n{self.log}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with self._http.get("/-/ready") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                async with asyncio.timeout(10):
                    await self._process.wait()
            except TimeoutError:
                self._process.kill()
                await self._process.wait()

    async def api(self, path: str, **params: str) -> JSON:
        assert self._http is not None
        async with self._http.get(f"/api/v1/{path}", params=params) as response:
            body: JSON = await response.json()
        return body

    async def query(self, expr: str) -> JSON:
        """The /api/v1/query answer for `expr` at the current time (status and data)."""
        return await self.api("query", query=expr, time=f"{time.time():.3f}")

    async def vector(self, expr: str) -> list[JSON]:
        body = await self.query(expr)
        assert body["status"] == "success", f"{expr}: {body}"
        result: list[JSON] = body["data"]["result"]
        return result


@contextlib.asynccontextmanager
async def prometheus_for(
    binary: str, workdir: Path, app_port: int, envoy_admin: str
) -> AsyncIterator[Prometheus]:
    server = Prometheus(binary, workdir)
    try:
        await server.start(app_port, envoy_admin)
        yield server
    finally:
        await server.stop()


async def wait_until(what: str, check: Any, timeout: float = 30.0) -> None:
    """Poll the coroutine function `check` until it returns true (or a true `ok` member);
    a timeout reports the last answer."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await check()
                if last is True or getattr(last, "ok", False):
                    return
                await asyncio.sleep(0.25)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}; last seen: {last}") from None


# --- the application's own scrape ---------------------------------------------------------


async def scrape(app: Application) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        assert response.status == 200
        return await response.text()


def handled_calls(text: str) -> float:
    """agentmesh's own RPCs completed so far, according to a /metrics scrape."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "grpc_server_handled_total"
        and sample.labels["grpc_service"].startswith("agentmesh.")
    )


def label_values(text: str) -> set[str]:
    return {
        value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for value in sample.labels.values()
    }


# --- the workload -----------------------------------------------------------------------


@dataclass
class Identities:
    """What no metric label may carry: the workload's users, their addresses and ids."""

    accounts: list[Account] = field(default_factory=list)
    addresses: set[str] = field(default_factory=lambda: {"127.0.0.1"})
    ids: set[str] = field(default_factory=set)

    def secrets(self) -> set[str]:
        people = {a.user_id for a in self.accounts} | {a.email for a in self.accounts}
        return people | self.addresses | self.ids


def from_ip(ip: str) -> tuple[tuple[str, str], ...]:
    return (("x-forwarded-for", ip),)


async def register(stubs: Stubs, prefix: str, ip: str) -> Account:
    email = unique_email(prefix)
    await stubs.auth.Register(
        auth_pb.RegisterRequest(email=email, password=PASSWORD, full_name=prefix.title()),
        metadata=from_ip(ip),
    )
    response = await stubs.auth.Login(
        auth_pb.LoginRequest(email=email, password=PASSWORD), metadata=from_ip(ip)
    )
    return Account(
        response.user.user_id, email, PASSWORD, response.access_token, response.refresh_token
    )


async def expect_code(call: Any, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value


async def workload(
    stubs: Stubs,
    llm: FakeLlm,
    web: FakeWeb,
    envoy: EnvoySidecar,
    admin: Account,
    seen: Identities,
    round_: int,
) -> None:
    """Everything the dashboards chart, once, by users and addresses new to this round."""
    feedback = fb_grpc.FeedbackServiceStub(stubs.channel)
    analytics = analytics_grpc.AnalyticsServiceStub(stubs.channel)
    alice_ip, bob_ip, attacker_ip = (f"{net}.{round_}" for net in CLIENT_NETS)
    alice = await register(stubs, "alice", alice_ip)
    bob = await register(stubs, "bob", bob_ip)
    seen.accounts += [alice, bob]
    seen.addresses |= {alice_ip, bob_ip, attacker_ip}

    # Failed logins from one address, until the credentials limit refuses it.
    wrong = auth_pb.LoginRequest(email=alice.email, password="not the password at all")
    for _ in range(CREDENTIALS_PER_IP):
        await expect_code(
            stubs.auth.Login(wrong, metadata=from_ip(attacker_ip)),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    await exhausted(stubs.auth.Login(wrong, metadata=from_ip(attacker_ip)), "RATE_LIMITED")

    # Ingestion that succeeds and ingestion that fails (at parsing), then a search.
    good = await ingest(stubs, alice, "zephyr.txt", ZEPHYR)
    broken = await upload(stubs, alice, "broken.pdf", make_pdf(["Cut off."])[:200])
    failed = await wait_settled(stubs, alice, broken.document.document_id)
    assert failed.status == kb_pb.DOCUMENT_STATUS_FAILED
    seen.ids |= {good.document_id, failed.document_id}
    assert await search(stubs, alice, "How is the Zephyr reactor cooled?")

    # A knowledge question (unary, with a knowledge-base tool call) and feedback on it.
    llm.reset(
        Script(
            intent="knowledge_base",
            tool_calls=[ToolCallScript("knowledge_base_search", arguments("Zephyr coolant"))],
            answer="The Zephyr reactor is cooled with liquid sodium.",
        )
    )
    reply = await stubs.agent.Query(
        agent_pb.QueryRequest(query="How is the Zephyr reactor cooled?"), metadata=alice.metadata
    )
    assert [t.name for t in reply.message.tool_calls] == ["knowledge_base_search"]
    seen.ids |= {reply.conversation_id, reply.message.message_id}
    await feedback.SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=reply.message.message_id, rating=fb.RATING_THUMBS_UP, score=5
        ),
        metadata=alice.metadata,
    )

    # A web question (streamed, with a web search through the fake search API).
    llm.reset(
        Script(
            intent="web_search",
            tool_calls=[ToolCallScript("web_search", arguments("Mars mission news"))],
            answer="The latest Mars mission report is out.",
        )
    )
    events = await stream(stubs, alice, "What is the latest news about the Mars mission?")
    assert of_kind(events, "completed") and web.searches[-1] == "Mars mission news"

    # Alice has used her daily queries: the next one is refused by the quota.
    await exhausted(
        stubs.agent.Query(agent_pb.QueryRequest(query="One more?"), metadata=alice.metadata),
        "QUOTA_EXCEEDED",
    )
    # The LLM endpoint fails: a server-side error (UNAVAILABLE) and a failed LLM call.
    llm.reset(Script(fail_status=500))
    await expect_code(
        stubs.agent.Query(agent_pb.QueryRequest(query="Hello there"), metadata=bob.metadata),
        grpc.StatusCode.UNAVAILABLE,
    )
    llm.reset()
    # A conversation that does not exist.
    await expect_code(
        stubs.agent.GetConversation(
            agent_pb.GetConversationRequest(conversation_id=str(uuid.uuid4())),
            metadata=bob.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    # System statistics twice: a cache miss, then a hit.
    for _ in range(2):
        await analytics.GetSystemStats(
            analytics_pb.GetSystemStatsRequest(), metadata=admin.metadata
        )

    # REST through Envoy: a success and a refusal.
    async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{envoy.port}") as rest:
        bearer = {"authorization": f"Bearer {bob.access_token}"}
        async with rest.get("/v1/users/me", headers=bearer) as response:
            assert response.status == 200
        async with rest.get("/v1/users/me") as response:
            assert response.status == 401


# --- the checks -------------------------------------------------------------------------


def variable_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for each dashboard variable `label_values(selector, label)`."""
    queries = []
    for path in DASHBOARDS:
        for variable in load_dashboard(path)["templating"]["list"]:
            definition = variable.get("query")
            text = definition.get("query") if isinstance(definition, dict) else definition
            match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text or "")
            if match:
                selector, label = match.groups()
                where = f"{path.name} variable {variable['name']}"
                queries.append((where, f"count by ({label}) ({grafana_to_promql(selector)})"))
    return queries


def panel_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legend format) for every panel query and variable of the dashboards."""
    queries = []
    for path in DASHBOARDS:
        for panel in panels(load_dashboard(path)):
            for target in panel.get("targets", []):
                where = f"{path.name} panel {panel['id']} ({panel['title']}) {target['refId']}"
                queries.append((where, target["expr"], target.get("legendFormat", "")))
    return queries + [(where, expr, "") for where, expr in variable_queries()]


async def panels_without_data(prometheus: Prometheus) -> tuple[list[str], list[str]]:
    """(queries that fail, return nothing, or lack a label their legend shows; queries whose
    every value is NaN) among all the dashboards' panel and variable queries."""
    empty, nan = [], []
    for where, expr, legend in panel_queries():
        promql = grafana_to_promql(expr)
        body = await prometheus.query(promql)
        if body["status"] != "success":
            empty.append(f"{where}: {body.get('error')}\n    {promql}")
            continue
        result = body["data"]["result"]
        shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        if not result:
            empty.append(f"{where}: no data\n    {promql}")
        elif missing := sorted(shown - set().union(*(r["metric"] for r in result))):
            empty.append(f"{where}: legend label(s) {missing} not in the result\n    {promql}")
        elif all(r["value"][1] == "NaN" for r in result):
            nan.append(f"{where}: only NaN\n    {promql}")
    return empty, nan


async def broken_alerts(prometheus: Prometheus) -> list[str]:
    problems = []
    for rule in alert_rules():
        body = await prometheus.query(rule["expr"])
        if body["status"] != "success":
            problems.append(f"{rule['alert']}: {body.get('error')}")
        for name in sorted(metric_names(rule["expr"])):
            if not await prometheus.vector(f'count({{__name__="{name}"}})'):
                problems.append(f"{rule['alert']}: no series of {name}")
    return problems


async def wait_for_scrapes(prometheus: Prometheus, app: Application) -> None:
    """Until both targets were scraped twice since now, the first time with the RPC count
    the application has now: every series then has the two samples rate() needs."""
    since, expected = time.time(), handled_calls(await scrape(app))

    @dataclass
    class Seen:
        samples_since: dict[str, float]
        handled: str
        envoy_timed: str
        envoy_requests: str

        @property
        def ok(self) -> bool:
            return (
                len(self.samples_since) == 2
                and all(n >= 2 for n in self.samples_since.values())
                and self.handled != ""
                and float(self.handled) == expected
                and self.envoy_timed != ""
                and self.envoy_timed == self.envoy_requests
            )

    def value(result: list[JSON]) -> str:
        return str(result[0]["value"][1]) if result else ""

    async def scraped() -> Seen:
        window = f"{int((time.time() - since) * 1000) + 1}ms"
        counts = await prometheus.vector(f'count_over_time(up{{job=~"agentmesh|envoy"}}[{window}])')
        return Seen(
            {r["metric"]["job"]: float(r["value"][1]) for r in counts},
            value(await prometheus.vector(f"sum({AGENTMESH_RPCS})")),
            # Envoy publishes its histograms when it flushes stats (every 5 s): wait until
            # the request-time histogram has counted every request.
            value(await prometheus.vector(f"sum({ENVOY_PUBLIC.format('rq_time_count')})")),
            value(await prometheus.vector(f"sum({ENVOY_PUBLIC.format('rq_total')})")),
        )

    await wait_until(f"two scrapes after the workload ({expected:g} RPCs)", scraped)


async def test_every_panel_and_alert_has_live_data(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        require_service("prometheus is not installed (apt-get install -y prometheus)")
    assert binary is not None
    await redis_up()
    database = f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}"
    await asyncio.to_thread(migrations.upgrade, database)
    llm, web = FakeLlm(), FakeWeb()
    seen = Identities()
    async with contextlib.AsyncExitStack() as stack:
        for fake in (llm, web):
            await fake.start()
            stack.push_async_callback(fake.stop)
        app, stubs = await stack.enter_async_context(
            running_app(
                database,
                tmp_path / "data",
                redis_url=REDIS_URL,
                redis_key_prefix=f"agentmesh-test-{uuid.uuid4().hex}:",
                rate_limit_credentials_per_ip=CREDENTIALS_PER_IP,
                # A busy machine must not make the limiter fail open and let a guess through.
                rate_limit_timeout_seconds=2.0,
                quota_user_daily_queries=USER_DAILY_QUERIES,
                llm_base_url=llm.base_url,
                llm_model="scripted-model",
                llm_max_retries=0,
                intent_confidence=1.01,  # always ask the (scripted) LLM for the intent
                outbound_allowed_networks=["127.0.0.0/8"],
                web_search_provider="searxng",
                web_search_url=f"{web.url}/search",
            )
        )
        envoy = envoy_for(app, tmp_path / "envoy")
        await envoy.start()
        stack.push_async_callback(envoy.stop)
        prometheus = await stack.enter_async_context(
            prometheus_for(
                binary,
                tmp_path / "prometheus",
                app.ops.port,
                envoy.admin_url.removeprefix("http://"),
            )
        )

        async def targets_up() -> bool:
            up = await prometheus.vector("up == 1")
            return {r["metric"]["job"] for r in up} == {"agentmesh", "envoy", "prometheus"}

        await wait_until("every target to be up", targets_up)

        # Two rounds, each followed by two scrapes: the series the first round creates
        # are then sampled before the second one counts, so rates have something to show.
        admin = await new_admin(app, stubs)
        seen.accounts.append(admin)
        for round_ in range(1, ROUNDS + 1):
            await workload(stubs, llm, web, envoy, admin, seen, round_)
            await wait_for_scrapes(prometheus, app)

        empty, nan = await panels_without_data(prometheus)
        if empty or nan:
            print("panels without data:", *empty, *nan, sep="\n")
        alerts = await broken_alerts(prometheus)
        names = await prometheus.api("label/__name__/values")
        exposed = set(names["data"])
        used = {name for _, expr in dashboard_exprs() for name in metric_names(expr)}
        used |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
        rules = await prometheus.api("rules")
        unhealthy = [
            f"{rule['name']}: {rule['health']} {rule.get('lastError', '')}"
            for group in rules["data"]["groups"]
            for rule in group["rules"]
            if rule["health"] != "ok"
        ]
        leaked = sorted(label_values(await scrape(app)) & seen.secrets())

        assert empty == [], "panels without data:\n" + "\n".join(empty)
        assert nan == [], "panels without a number:\n" + "\n".join(nan)
        assert alerts == [], "\n".join(alerts)
        assert sorted(used - exposed) == [], "queried but never exposed"
        assert len(rules["data"]["groups"]) == len(
            yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        )
        assert unhealthy == []
        assert leaked == []
