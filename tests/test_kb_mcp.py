"""The knowledge base as an MCP server: the `mcp` SDK's own streamable-HTTP client through a
real Envoy to the real application, authenticated by access tokens and API keys, seeing
exactly what SearchKnowledgeBase shows each user; plain HTTP without a credential gets 401."""

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import httpx2
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, TextContent

from server.envoy import EnvoySidecar
from server.main import Application
from tests.harness import Account, Stubs, new_admin, new_user
from tests.knowledge import ingest

TOOLS = {"search_knowledge_base", "read_document"}


def mcp_url(envoy: EnvoySidecar) -> str:
    return f"http://127.0.0.1:{envoy.port}/mcp"


@asynccontextmanager
async def mcp_session(envoy: EnvoySidecar, credential: str) -> AsyncIterator[ClientSession]:
    """An initialised MCP client session through Envoy, presenting `credential`."""
    headers = {"authorization": f"Bearer {credential}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        streamable_http_client(mcp_url(envoy), http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


def structured(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    content: dict[str, Any] = result.structured_content
    assert content is not None
    return content


def error_text(result: CallToolResult) -> str:
    assert result.is_error
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


async def post_initialize(
    envoy: EnvoySidecar, headers: dict[str, str], client_name: str = "curl"
) -> aiohttp.ClientResponse:
    """A raw MCP initialize POST (what any MCP client sends first)."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": client_name, "version": "1"},
        },
    }
    accept = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(mcp_url(envoy), data=json.dumps(body), headers={**accept, **headers}) as response,
    ):
        await response.read()
        return response


async def two_owners(stubs: Stubs) -> tuple[Account, str, Account, str]:
    """Two users, each with one ingested document about a word only it contains."""
    alice, bob = await new_user(stubs, "alice"), await new_user(stubs, "bob")
    alice_doc = await ingest(
        stubs, alice, "alice.txt", b"The periwinkle lighthouse keeper logs every ship at dusk."
    )
    bob_doc = await ingest(
        stubs, bob, "bob.txt", b"The periwinkle orchard yields tart apples in late autumn."
    )
    return alice, alice_doc.document_id, bob, bob_doc.document_id


async def test_lists_both_tools_with_their_schemas(stubs: Stubs, envoy: EnvoySidecar) -> None:
    account = await new_user(stubs)
    async with mcp_session(envoy, account.access_token) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == TOOLS
    search = tools["search_knowledge_base"].input_schema
    assert search["required"] == ["query"]
    assert set(search["properties"]) == {"query", "top_k", "document_ids"}
    assert search["properties"]["top_k"]["maximum"] == 100
    read = tools["read_document"].input_schema
    assert read["required"] == ["document_id"]
    assert set(read["properties"]) == {"document_id", "first", "limit"}
    for tool in tools.values():
        assert tool.output_schema is not None
        assert tool.annotations is not None and tool.annotations.read_only_hint


async def test_search_sees_only_the_callers_documents(stubs: Stubs, envoy: EnvoySidecar) -> None:
    alice, alice_doc, bob, bob_doc = await two_owners(stubs)
    for account, own, theirs in ((alice, alice_doc, bob_doc), (bob, bob_doc, alice_doc)):
        async with mcp_session(envoy, account.access_token) as session:
            found = structured(
                await session.call_tool("search_knowledge_base", {"query": "periwinkle"})
            )
            ids = {hit["document_id"] for hit in found["results"]}
            assert ids == {own}, found
            # Narrowed to the other user's document, nothing: the owner filter still holds.
            narrowed = structured(
                await session.call_tool(
                    "search_knowledge_base", {"query": "periwinkle", "document_ids": [theirs]}
                )
            )
            assert narrowed["results"] == []
    async with mcp_session(envoy, alice.access_token) as session:
        top = structured(
            await session.call_tool("search_knowledge_base", {"query": "lighthouse", "top_k": 1})
        )["results"]
    assert len(top) == 1 and "lighthouse keeper" in top[0]["text"]
    assert top[0]["document_title"] == "alice"


async def test_reads_own_passages_and_not_anothers(stubs: Stubs, envoy: EnvoySidecar) -> None:
    alice, alice_doc, _, bob_doc = await two_owners(stubs)
    async with mcp_session(envoy, alice.access_token) as session:
        read = structured(await session.call_tool("read_document", {"document_id": alice_doc}))
        theirs = await session.call_tool("read_document", {"document_id": bob_doc})
        malformed = await session.call_tool("read_document", {"document_id": "nope"})
    assert read["document_id"] == alice_doc and read["status"] == "ready"
    assert read["chunk_count"] == len(read["passages"]) >= 1
    assert read["next_passage"] is None
    first = read["passages"][0]
    assert first["chunk_index"] == 0
    assert first["text"].startswith("The periwinkle lighthouse keeper")
    # Another user's document is not found, exactly as GetDocument answers it.
    assert error_text(theirs).endswith("DOCUMENT_NOT_FOUND: document not found")
    assert error_text(malformed).endswith("INVALID_ARGUMENT: document_id: must be a UUID")


async def test_reads_a_long_document_page_by_page(stubs: Stubs, envoy: EnvoySidecar) -> None:
    account = await new_user(stubs)
    text = "\n\n".join(
        f"Entry {i}: the tide gauge at pier {i} rose by {i} centimetres during the storm, "
        f"and the harbour crew noted it alongside the wind, rain and swell readings."
        for i in range(60)
    )
    document = await ingest(stubs, account, "tides.txt", text.encode())
    assert document.chunk_count > 2
    passages: list[dict[str, Any]] = []
    following: int | None = 0
    async with mcp_session(envoy, account.access_token) as session:
        while following is not None:
            arguments = {"document_id": document.document_id, "first": following, "limit": 2}
            page = structured(await session.call_tool("read_document", arguments))
            assert len(page["passages"]) <= 2
            passages += page["passages"]
            following = page["next_passage"]
    assert [p["chunk_index"] for p in passages] == list(range(document.chunk_count))
    # Each passage is the document's text at its offsets, in order.
    for passage in passages:
        assert text[passage["start_offset"] : passage["end_offset"]] == passage["text"]
    assert passages[0]["text"].startswith("Entry 0:") and "Entry 59:" in passages[-1]["text"]


async def test_an_api_key_works_and_a_revoked_one_does_not(
    stubs: Stubs, envoy: EnvoySidecar
) -> None:
    alice, alice_doc, _, _ = await two_owners(stubs)
    created = await stubs.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name="assistant", read_only=True), metadata=alice.metadata
    )
    async with mcp_session(envoy, created.secret) as session:
        found = structured(
            await session.call_tool("search_knowledge_base", {"query": "periwinkle"})
        )
    assert {hit["document_id"] for hit in found["results"]} == {alice_doc}
    await stubs.keys.RevokeApiKey(
        keys_pb.RevokeApiKeyRequest(api_key_id=created.api_key.api_key_id),
        metadata=alice.metadata,
    )
    response = await post_initialize(envoy, {"authorization": f"Bearer {created.secret}"})
    assert response.status == 401


async def test_refused_without_a_valid_credential(
    app: Application, stubs: Stubs, envoy: EnvoySidecar
) -> None:
    missing = await post_initialize(envoy, {})
    assert missing.status == 401
    assert missing.headers["www-authenticate"].startswith("Bearer ")
    for credential in ("Bearer not-a-token", "Basic dXNlcjpwYXNz", "Bearer am_bogus_key"):
        refused = await post_initialize(envoy, {"authorization": credential})
        assert refused.status == 401, credential
        assert refused.headers["www-authenticate"].startswith("Bearer ")
    # A disabled account's token is refused as on gRPC.
    user, admin = await new_user(stubs), await new_admin(app, stubs)
    assert (await post_initialize(envoy, dict(user.metadata))).status == 200
    await stubs.users.DisableUser(
        users_pb.DisableUserRequest(user_id=user.user_id), metadata=admin.metadata
    )
    assert (await post_initialize(envoy, dict(user.metadata))).status == 401


async def test_a_body_over_the_cap_is_refused(stubs: Stubs, envoy: EnvoySidecar) -> None:
    account = await new_user(stubs)
    headers = dict(account.metadata)
    assert (await post_initialize(envoy, headers, client_name="x" * 60_000)).status == 200
    assert (await post_initialize(envoy, headers, client_name="x" * 70_000)).status == 413
