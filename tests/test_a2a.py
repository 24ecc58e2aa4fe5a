"""The agent over A2A (issue 22): a2a-sdk's own client, over gRPC to the server's port and
over HTTP+JSON through a real Envoy, against the real server with the scripted LLM."""

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from a2a.client import Client, ClientCallContext, ClientConfig, ClientFactory
from a2a.types import a2a_pb2 as a2a
from a2a.types import a2a_pb2_grpc as a2a_grpc
from a2a.utils.errors import A2AError
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from google.protobuf.json_format import ParseDict

from server.a2a_descriptors import a2a_descriptor_set
from server.config import ROOT, SERVICE_KEYS, Settings
from server.envoy import EnvoySidecar, public_manager
from server.envoy_mesh import mesh_envoy_config
from server.main import Application
from tests.backends import Database
from tests.fake_llm import FakeLlm, Script
from tests.harness import Account, Stubs, envoy_for, new_user, running_app
from tests.rpc_errors import error_info, field_violations

ANSWER = "Hello from agentmesh, how can I help?"
BINDINGS = ["GRPC", "HTTP+JSON"]
PUBLIC_URL = "https://agents.example.com"


class A2a:
    """The application, its Envoy, and how to reach both."""

    def __init__(self, app: Application, stubs: Stubs, envoy: EnvoySidecar) -> None:
        self.app, self.stubs, self.envoy = app, stubs, envoy
        self.base_url = f"http://127.0.0.1:{envoy.port}"

    async def card(self) -> a2a.AgentCard:
        """The Agent Card from Envoy, its interfaces pointed at this test's Envoy (the card
        names PUBLIC_URL, which is this module's configuration, not an address here)."""
        async with httpx.AsyncClient() as http:
            response = await http.get(f"{self.base_url}/.well-known/agent-card.json")
        card = ParseDict(response.json(), a2a.AgentCard())
        for interface in card.supported_interfaces:
            interface.url = self.base_url if interface.protocol_binding != "GRPC" else "test"
        return card

    async def client(
        self, binding: str, *, streaming: bool = True, polling: bool = False
    ) -> Client:
        """a2a-sdk's client for `binding`; gRPC goes to the server's own port."""
        config = ClientConfig(
            streaming=streaming,
            polling=polling,
            supported_protocol_bindings=[binding],
            grpc_channel_factory=lambda _url: grpc.aio.insecure_channel(
                f"127.0.0.1:{self.app.grpc_port}"
            ),
            httpx_client=httpx.AsyncClient(timeout=60),
        )
        return ClientFactory(config).create(await self.card())


@pytest.fixture(scope="module")
async def served(
    database: Database, llm: FakeLlm, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[A2a]:
    async with running_app(
        database.url,
        tmp_path_factory.mktemp("a2a"),
        llm_base_url=llm.base_url,
        llm_model="scripted-model",
        llm_max_retries=0,
        intent_confidence=1.01,  # always ask the (scripted) LLM for the intent
        public_url=PUBLIC_URL,
    ) as (app, stubs):
        envoy = envoy_for(app, tmp_path_factory.mktemp("a2a-envoy"))
        await envoy.start()
        try:
            yield A2a(app, stubs, envoy)
        finally:
            await envoy.stop()


@pytest.fixture
async def a2a_(served: A2a, llm: FakeLlm) -> A2a:
    llm.reset(Script(intent="greeting", answer=ANSWER))
    return served


@pytest.fixture
async def gate(llm: FakeLlm) -> AsyncIterator[asyncio.Event]:
    """A script whose answer stops after its first token until the gate opens."""
    opened = asyncio.Event()
    llm.reset(Script(intent="greeting", answer=ANSWER, gate=opened))
    yield opened
    opened.set()  # nothing stays blocked in the scripted model after the test


def as_user(account: Account) -> ClientCallContext:
    return ClientCallContext(service_parameters={"authorization": f"Bearer {account.access_token}"})


def question(text: str = "hello", context_id: str = "") -> a2a.SendMessageRequest:
    return a2a.SendMessageRequest(
        message=a2a.Message(
            message_id=uuid.uuid4().hex,
            context_id=context_id,
            role=a2a.ROLE_USER,
            parts=[a2a.Part(text=text)],
        )
    )


def chunks_of(events: list[a2a.StreamResponse]) -> list[a2a.TaskArtifactUpdateEvent]:
    return [e.artifact_update for e in events if e.HasField("artifact_update")]


def answer_of(events: list[a2a.StreamResponse]) -> str:
    return "".join(p.text for chunk in chunks_of(events) for p in chunk.artifact.parts)


def final_state(events: list[a2a.StreamResponse]) -> int:
    statuses = [e.status_update.status.state for e in events if e.HasField("status_update")]
    return statuses[-1]


async def until_first_chunk(stream: AsyncIterator[a2a.StreamResponse]) -> list[Any]:
    """The events of a stream up to its first answer chunk (the scripted model then waits)."""
    events = []
    async for event in stream:
        events.append(event)
        if event.HasField("artifact_update"):
            return events
    raise AssertionError(f"the stream ended before an answer chunk: {events}")


def status_of(error: BaseException) -> grpc.StatusCode | int:
    """The gRPC status or HTTP status behind an a2a-sdk client error."""
    cause = error.__cause__
    if isinstance(cause, grpc.aio.AioRpcError):
        return cause.code()
    if isinstance(cause, httpx.HTTPStatusError):
        return cause.response.status_code
    raise AssertionError(f"no transport error behind {error!r}")


NOT_FOUND = {"GRPC": grpc.StatusCode.NOT_FOUND, "HTTP+JSON": 404}


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_message_returns_its_completed_task_which_get_and_list_read(
    a2a_: A2a, binding: str
) -> None:
    user = await new_user(a2a_.stubs)
    client = await a2a_.client(binding, streaming=False)
    try:
        (response,) = [r async for r in client.send_message(question(), context=as_user(user))]
        task = response.task
        assert task.status.state == a2a.TASK_STATE_COMPLETED
        assert [p.text for a in task.artifacts for p in a.parts] == [ANSWER]
        assert task.status.message.role == a2a.ROLE_AGENT
        assert task.status.message.parts[0].text == ANSWER
        assert [m.role for m in task.history] == [a2a.ROLE_USER, a2a.ROLE_AGENT]
        assert task.history[0].parts[0].text == "hello"
        assert len(task.id) == 32 and task.context_id

        read = await client.get_task(a2a.GetTaskRequest(id=task.id), context=as_user(user))
        assert read == task
        # A second message in the task's context continues its conversation.
        follow_up = question("and then?", context_id=task.context_id)
        (second,) = [r async for r in client.send_message(follow_up, context=as_user(user))]
        assert second.task.context_id == task.context_id and second.task.id != task.id

        listed = await client.list_tasks(a2a.ListTasksRequest(), context=as_user(user))
        assert [t.id for t in listed.tasks] == [second.task.id, task.id]  # newest first
        first_page = await client.list_tasks(
            a2a.ListTasksRequest(page_size=1), context=as_user(user)
        )
        assert [t.id for t in first_page.tasks] == [second.task.id]
        rest = await client.list_tasks(
            a2a.ListTasksRequest(page_size=1, page_token=first_page.next_page_token),
            context=as_user(user),
        )
        assert [t.id for t in rest.tasks] == [task.id] and not rest.next_page_token
    finally:
        await client.close()


@pytest.mark.parametrize("binding", BINDINGS)
async def test_a_streamed_message_sends_the_answer_as_artifact_chunks(
    a2a_: A2a, binding: str
) -> None:
    user = await new_user(a2a_.stubs)
    client = await a2a_.client(binding)
    try:
        events = [e async for e in client.send_message(question(), context=as_user(user))]
    finally:
        await client.close()
    assert events[0].task.status.state == a2a.TASK_STATE_WORKING
    task_id = events[0].task.id
    chunks = chunks_of(events)
    assert len(chunks) > 1  # token by token, not the answer at the end
    assert [c.append for c in chunks] == [False] + [True] * (len(chunks) - 1)
    assert [c.last_chunk for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert {c.task_id for c in chunks} == {task_id}
    assert answer_of(events) == ANSWER
    assert final_state(events) == a2a.TASK_STATE_COMPLETED
    assert events[-1].status_update.status.message.parts[0].text == ANSWER


@pytest.mark.parametrize("binding", BINDINGS)
async def test_cancelling_a_running_task_stops_the_model(
    a2a_: A2a, llm: FakeLlm, binding: str
) -> None:
    opened = asyncio.Event()
    # Tokens keep coming once the gate opens, paced, so the closed connection is noticed.
    llm.reset(Script(intent="greeting", answer="word " * 200, gate=opened, token_delay=0.01))
    user = await new_user(a2a_.stubs)
    client = await a2a_.client(binding)
    try:
        stream = client.send_message(question(), context=as_user(user))
        seen = await until_first_chunk(stream)
        task_id = seen[0].task.id
        cancelled = await client.cancel_task(
            a2a.CancelTaskRequest(id=task_id), context=as_user(user)
        )
        assert cancelled.status.state == a2a.TASK_STATE_CANCELED
        rest = [e async for e in stream]
        assert final_state(rest) == a2a.TASK_STATE_CANCELED
        opened.set()  # only the cancellation can stop the scripted model now
        [record] = llm.streams
        await asyncio.wait_for(record.finished.wait(), timeout=30)
        assert record.cut_off and record.tokens_sent < record.tokens_planned
        read = await client.get_task(a2a.GetTaskRequest(id=task_id), context=as_user(user))
        assert read.status.state == a2a.TASK_STATE_CANCELED and not read.artifacts
        # An ended task cannot be cancelled again (A2A's TaskNotCancelableError).
        with pytest.raises(A2AError) as again:
            await client.cancel_task(a2a.CancelTaskRequest(id=task_id), context=as_user(user))
        assert status_of(again.value) in (grpc.StatusCode.FAILED_PRECONDITION, 400)
    finally:
        opened.set()
        await client.close()


@pytest.mark.parametrize("binding", BINDINGS)
async def test_subscribing_re_attaches_to_a_running_task(
    a2a_: A2a, gate: asyncio.Event, binding: str
) -> None:
    user = await new_user(a2a_.stubs)
    polling = await a2a_.client(binding, streaming=False, polling=True)
    client = await a2a_.client(binding)
    try:
        # return_immediately (polling): the task comes back while its run still works.
        (started,) = [r async for r in polling.send_message(question(), context=as_user(user))]
        assert started.task.status.state == a2a.TASK_STATE_WORKING
        subscription = client.subscribe(
            a2a.SubscribeToTaskRequest(id=started.task.id), context=as_user(user)
        )
        seen = await until_first_chunk(subscription)
        assert seen[0].task.id == started.task.id
        gate.set()
        events = seen + [e async for e in subscription]
        # An ended task has nothing to subscribe to (A2A's UnsupportedOperationError).
        with pytest.raises(A2AError) as ended:
            async for _ in client.subscribe(
                a2a.SubscribeToTaskRequest(id=started.task.id), context=as_user(user)
            ):
                pass
        assert status_of(ended.value) in (grpc.StatusCode.FAILED_PRECONDITION, 400)
    finally:
        await polling.close()
        await client.close()
    assert answer_of(events) == ANSWER
    assert final_state(events) == a2a.TASK_STATE_COMPLETED


@pytest.mark.parametrize("binding", BINDINGS)
async def test_another_users_task_is_not_found(a2a_: A2a, binding: str) -> None:
    owner, other = await new_user(a2a_.stubs), await new_user(a2a_.stubs)
    client = await a2a_.client(binding, streaming=False)
    try:
        (sent,) = [r async for r in client.send_message(question(), context=as_user(owner))]
        task_id = sent.task.id
        calls: list[Callable[[], Any]] = [
            lambda: client.get_task(a2a.GetTaskRequest(id=task_id), context=as_user(other)),
            lambda: client.cancel_task(a2a.CancelTaskRequest(id=task_id), context=as_user(other)),
            lambda: client.get_task(
                a2a.GetTaskRequest(id=uuid.uuid4().hex), context=as_user(owner)
            ),
        ]
        for call in calls:
            with pytest.raises(A2AError) as refused:
                await call()
            assert status_of(refused.value) == NOT_FOUND[binding]
        listed = await client.list_tasks(a2a.ListTasksRequest(), context=as_user(other))
        assert not listed.tasks
    finally:
        await client.close()


async def test_grpc_errors_carry_their_status_and_details(a2a_: A2a) -> None:
    user = await new_user(a2a_.stubs)
    stub = a2a_grpc.A2AServiceStub(a2a_.stubs.channel)  # type: ignore[no-untyped-call]
    auth = (("authorization", f"Bearer {user.access_token}"),)
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await stub.SendMessage(question())
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    without_text = a2a.SendMessageRequest(
        message=a2a.Message(message_id="m", role=a2a.ROLE_USER, parts=[a2a.Part(url="x")])
    )
    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await stub.SendMessage(without_text, metadata=auth)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(invalid.value) == {"message.parts": ["must hold a text part"]}
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetTask(a2a.GetTaskRequest(id="not-a-task"), metadata=auth)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(missing.value).reason == "TASK_NOT_FOUND"
    # What is not offered answers A2A's own errors, never UNKNOWN.
    unsupported = [
        (stub.GetExtendedAgentCard(a2a.GetExtendedAgentCardRequest(), metadata=auth), "EXTENDED"),
        (
            stub.ListTaskPushNotificationConfigs(
                a2a.ListTaskPushNotificationConfigsRequest(task_id="x"), metadata=auth
            ),
            "PUSH_NOTIFICATION_NOT_SUPPORTED",
        ),
    ]
    for call, reason in unsupported:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(refused.value).reason.startswith(reason)


async def test_http_json_without_a_credential_is_401(a2a_: A2a) -> None:
    async with httpx.AsyncClient(base_url=a2a_.base_url) as http:
        sent = await http.post(
            "/message:send",
            json={"message": {"messageId": "m", "role": "ROLE_USER", "parts": [{"text": "hi"}]}},
        )
        listed = await http.get("/tasks")
    assert sent.status_code == listed.status_code == 401
    assert sent.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


async def test_the_agent_card_names_both_interfaces_and_the_bearer_scheme(a2a_: A2a) -> None:
    async with httpx.AsyncClient(base_url=a2a_.base_url) as http:
        response = await http.get("/.well-known/agent-card.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    card = response.json()
    # ProtoJSON, as A2A specifies: camelCase names.
    assert {"supportedInterfaces", "securitySchemes", "securityRequirements"} <= set(card)
    interfaces = {i["protocolBinding"]: i for i in card["supportedInterfaces"]}
    assert interfaces["HTTP+JSON"]["url"] == PUBLIC_URL
    assert interfaces["GRPC"]["url"] == "agents.example.com"
    assert {i["protocolVersion"] for i in interfaces.values()} == {"1.0"}
    assert card["capabilities"]["streaming"] is True
    (scheme,) = card["securitySchemes"].values()
    assert scheme["httpAuthSecurityScheme"]["scheme"] == "Bearer"
    assert card["securityRequirements"] == [{"schemes": {next(iter(card["securitySchemes"])): {}}}]
    assert {s["id"] for s in card["skills"]} >= {"knowledge_base", "web_search"}


def test_envoy_transcodes_with_the_installed_a2a_descriptor() -> None:
    """envoy/envoy.yaml's inline copy of a2a.proto's descriptor set is the installed
    a2a-sdk's (after an upgrade: paste `python -m server.a2a_descriptors` into it)."""
    template = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    manager = template["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = manager["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    (route,) = [r for r in routes if r.get("name") == "a2a-rest"]
    config = route["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
    inline = base64.b64decode(config["proto_descriptor_bin"])
    assert inline == a2a_descriptor_set().SerializeToString(deterministic=True)


def test_every_a2a_method_is_in_the_access_table() -> None:
    from server.access import RPC_ACCESS, Access

    service = a2a.DESCRIPTOR.services_by_name["A2AService"]
    paths = {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert {RPC_ACCESS.get(path) for path in paths} == {Access.USER}


async def test_an_api_key_sends_and_reads_tasks_over_http_json(a2a_: A2a) -> None:
    user = await new_user(a2a_.stubs)
    created = await a2a_.stubs.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="another-agent"), metadata=user.metadata
    )
    key = ClientCallContext(service_parameters={"authorization": f"Bearer {created.secret}"})
    client = await a2a_.client("HTTP+JSON", streaming=False)
    try:
        (sent,) = [r async for r in client.send_message(question(), context=key)]
        assert sent.task.status.state == a2a.TASK_STATE_COMPLETED
        # The key's tasks are its user's: the same list for the user's access token.
        listed = await client.list_tasks(a2a.ListTasksRequest(), context=as_user(user))
        assert [t.id for t in listed.tasks] == [sent.task.id]
    finally:
        await client.close()


async def test_a_task_outlives_the_run_log_of_the_process_that_ran_it(
    a2a_: A2a, database: Database, tmp_path: Path
) -> None:
    user = await new_user(a2a_.stubs)
    client = await a2a_.client("GRPC", streaming=False)
    try:
        (sent,) = [r async for r in client.send_message(question(), context=as_user(user))]
    finally:
        await client.close()
    # Another process over the same database: its run log has never seen the run.
    async with running_app(database.url, tmp_path) as (_, stubs):
        stub = a2a_grpc.A2AServiceStub(stubs.channel)  # type: ignore[no-untyped-call]
        auth = (("authorization", f"Bearer {user.access_token}"),)
        read = await stub.GetTask(a2a.GetTaskRequest(id=sent.task.id), metadata=auth)
        listed = await stub.ListTasks(a2a.ListTasksRequest(), metadata=auth)
    assert read == sent.task
    assert [t.id for t in listed.tasks] == [sent.task.id]


def test_the_mesh_routes_a2a_to_the_agents_replicas() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    upstreams: dict[str, list[str]] = {key: [f"{key}:50051"] for key in SERVICE_KEYS}
    config = mesh_envoy_config(settings, upstreams=upstreams, ops=["agentmesh:9464"])
    routes = public_manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    by_name = {route.get("name"): route for route in routes}
    for name in ("a2a-stream", "a2a-subscribe", "a2a"):
        assert by_name[name]["route"]["cluster"] == "svc_agent", name
    assert by_name["a2a-stream"]["route"]["timeout"] == "0s"
    assert by_name["a2a-agent-card"]["route"]["cluster"] == "agentmesh_ops"
