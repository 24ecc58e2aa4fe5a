"""Requests that do not parse, and strings carrying NUL characters, are INVALID_ARGUMENT on
every method, with or without a token, over gRPC and REST, and store nothing."""

import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb

from server.main import Application
from tests.harness import PASSWORD, Stubs, new_user
from tests.rpc_errors import error_info, field_violations

GARBAGE = b"\xff\xff\xff\xff"


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/agentmesh.auth.v1.AuthService/Login",
        "/agentmesh.knowledge.v1.KnowledgeBaseService/SearchKnowledgeBase",
        "/agentmesh.agent.v1.AgentService/StreamQuery",
    ],
)
async def test_bytes_that_do_not_parse_are_invalid_argument(app: Application, method: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as opened:
        channel: Any = opened  # raw bytes in and out: no stub, no message types
        if method.endswith("StreamQuery"):
            call = channel.unary_stream(method)(GARBAGE)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary(method)(GARBAGE)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "MALFORMED_REQUEST"
    assert "class" not in (error.details() or "") and "Error" not in (error.details() or "")


async def test_a_nul_in_a_public_requests_string_is_a_field_violation(stubs: Stubs) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.auth.Login(auth_pb.LoginRequest(email="ada\x00@example.com", password="x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "NUL_CHARACTER"
    assert list(field_violations(caught.value)) == ["email"]


async def test_nul_characters_are_found_at_any_depth_and_nothing_is_stored(
    stubs: Stubs,
) -> None:
    user = await new_user(stubs)
    upload = kb.UploadDocumentRequest(
        filename="notes\x00.txt",
        content=b"Harmless text about herons.",
        title="a\x00b",
        metadata={"team": "ops\x00", "k\x00": "v"},
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.kb.UploadDocument(upload, metadata=user.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "filename",
        "title",
        'metadata["team"]',
        "metadata",
    }
    listed = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=user.metadata)
    assert list(listed.documents) == []

    search = kb.SearchKnowledgeBaseRequest(
        query="herons", document_ids=[str(uuid.uuid4()), "x\x00"]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.kb.SearchKnowledgeBase(search, metadata=user.metadata)
    assert list(field_violations(caught.value)) == ["document_ids[1]"]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stubs.agent.StreamQuery(
            agent_pb.StreamQueryRequest(query="hello\x00"), metadata=user.metadata
        ):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(caught.value)) == ["query"]


async def test_a_nul_over_rest_is_http_400(rest: aiohttp.ClientSession) -> None:
    body = {"email": "ada\u0000@example.com", "password": PASSWORD, "full_name": "Ada"}
    async with rest.post("/v1/auth/register", json=body) as response:
        assert response.status == 400
        status = await response.json()
    assert status["code"] == 3
    assert "NUL" in status["message"]
