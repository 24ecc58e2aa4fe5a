"""The Prometheus metrics, read from the running server's /metrics like Prometheus does:
RPC RED metrics, the business counters and the infrastructure gauges. Counts are deltas
around a known workload on the shared application."""

import uuid
from collections.abc import Mapping

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.feedback.v1 import feedback_pb2 as fb
from agentmesh.feedback.v1 import feedback_service_pb2 as fb_service
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from prometheus_client.parser import text_string_to_metric_families

from server.main import Application
from tests.agent import stream
from tests.harness import Stubs, new_user
from tests.knowledge import ingest, search, upload, wait_settled

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(app: Application) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{app.ops.port}/metrics") as response,
    ):
        assert response.status == 200
        body = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    wanted = set((labels or {}).items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, labels) - value(before, name, labels)


USER_SERVICE = {"grpc_service": "agentmesh.auth.v1.UserService", "grpc_method": "GetCurrentUser"}
AGENT = "agentmesh.agent.v1.AgentService"


async def test_every_rpc_is_counted_timed_and_coded(app: Application, stubs: Stubs) -> None:
    user = await new_user(stubs)
    before = await scrape(app)
    for _ in range(3):
        await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=user.metadata)
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest())  # no token
    with pytest.raises(grpc.aio.AioRpcError):
        await stubs.agent.GetConversation(
            agent_pb.GetConversationRequest(conversation_id=str(uuid.uuid4())),
            metadata=user.metadata,
        )
    events = await stream(stubs, user, "hello there")
    after = await scrape(app)

    unary = {**USER_SERVICE, "grpc_type": "unary"}
    assert delta(before, after, "grpc_server_started_total", **unary) == 4
    assert delta(before, after, "grpc_server_handled_total", **unary, grpc_code="OK") == 3
    refused = delta(
        before, after, "grpc_server_handled_total", **unary, grpc_code="UNAUTHENTICATED"
    )
    assert refused == 1
    assert delta(before, after, "grpc_server_handling_seconds_count", **unary) == 4
    assert delta(before, after, "grpc_server_msg_sent_total", **unary) == 3  # not the refused
    not_found = delta(
        before,
        after,
        "grpc_server_handled_total",
        grpc_service=AGENT,
        grpc_method="GetConversation",
        grpc_code="NOT_FOUND",
    )
    assert not_found == 1
    streamed = {"grpc_service": AGENT, "grpc_method": "StreamQuery", "grpc_type": "server_stream"}
    assert delta(before, after, "grpc_server_msg_sent_total", **streamed) == len(events)
    assert delta(before, after, "grpc_server_handled_total", **streamed, grpc_code="OK") == 1


async def test_business_metrics_follow_the_work(app: Application, stubs: Stubs) -> None:
    before = await scrape(app)
    user = await new_user(stubs)  # one registration, one login
    await ingest(stubs, user, "metrics.txt", b"Prometheus scrapes the metrics endpoint. " * 20)
    broken = await upload(stubs, user, "broken.pdf", b"%PDF-1.7 not really a pdf")
    failed = await wait_settled(stubs, user, broken.document.document_id)
    assert failed.status == kb_pb.DOCUMENT_STATUS_FAILED
    hits = await search(stubs, user, "what scrapes the metrics endpoint?")
    await search(stubs, user, "what scrapes the metrics endpoint?")  # its embedding is cached
    reply = await stubs.agent.Query(agent_pb.QueryRequest(query="hello"), metadata=user.metadata)
    feedback = fb_grpc.FeedbackServiceStub(stubs.channel)
    await feedback.SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=reply.message.message_id, rating=fb.RATING_THUMBS_UP
        ),
        metadata=user.metadata,
    )
    after = await scrape(app)

    assert delta(before, after, "agentmesh_registrations_total", outcome="ok") == 1
    assert delta(before, after, "agentmesh_logins_total", outcome="ok") == 1
    assert (
        delta(before, after, "agentmesh_ingest_documents_total", stage="index", outcome="ok") == 1
    )
    assert (
        delta(before, after, "agentmesh_ingest_documents_total", stage="parse", outcome="failed")
        == 1
    )
    assert delta(before, after, "agentmesh_ingest_chunks_total") >= 1
    assert delta(before, after, "agentmesh_ingest_seconds_count", stage="total") == 1
    assert delta(before, after, "agentmesh_retrieval_seconds_count") >= 1
    assert delta(before, after, "agentmesh_retrieval_hits_sum") >= 2 * len(hits)
    cache = {"cache": "query_embeddings"}
    assert delta(before, after, "agentmesh_cache_requests_total", **cache, result="hit") >= 1
    assert delta(before, after, "agentmesh_cache_requests_total", **cache, result="miss") >= 1
    # The shared application has no LLM: the greeting is answered extractively.
    assert delta(before, after, "agentmesh_agent_queries_total", outcome="ok") == 1
    assert delta(before, after, "agentmesh_agent_run_seconds_count", outcome="ok") == 1
    assert delta(before, after, "agentmesh_feedback_total", rating="thumbs_up") == 1
    assert value(after, "agentmesh_active_users", {"window": "5m"}) >= 1


async def test_infrastructure_gauges(app: Application) -> None:
    samples = await scrape(app)
    assert value(samples, "agentmesh_dependency_up", {"dependency": "database"}) == 1
    # The shared application runs on its embedded defaults: nothing else to probe.
    assert not [n for (n, ls) in samples if n == "agentmesh_dependency_up" and
                ("dependency", "redis") in ls]  # fmt: skip
    assert value(samples, "agentmesh_db_pool_size") >= 1
    assert ("agentmesh_db_pool_connections", frozenset({("state", "in_use")})) in samples
    assert (
        "agentmesh_cache_requests_total",
        frozenset({("cache", "stats"), ("result", "hit")}),
    ) in samples
    assert value(samples, "agentmesh_events_dropped_total") == 0
    assert ("agentmesh_event_loop_lag_seconds_count", frozenset()) in samples
    assert value(samples, "process_resident_memory_bytes") > 0
