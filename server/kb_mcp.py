"""The knowledge base as an MCP server, so desktop and IDE assistants can search a team's
documents: two tools over MCP's streamable HTTP transport (the official `mcp` SDK's
MCPServer, stateless: every POST stands alone, so any replica can answer it), served by
uvicorn on MCP_PORT in a process that serves the knowledge base; Envoy routes /mcp there.

The caller is who their bearer credential says, through the same Authentication as a gRPC
call (an access token or an API key; revoked sessions and keys, disabled accounts refused),
with the access of SearchKnowledgeBase: any user, read-only keys too. The SDK's bearer
middleware answers a missing or refused credential with 401 and `WWW-Authenticate: Bearer`.
The tools call the same domain methods as SearchKnowledgeBase and GetDocument with that
principal, so an assistant sees exactly what the user sees over gRPC.
"""

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Annotated

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import ToolAnnotations
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field
from starlette.applications import Starlette

from server.access import access_for, key_use
from server.authentication import Authentication
from services.auth.principal import Principal
from services.errors import DomainError, PermissionDenied, Unauthenticated
from services.knowledge.models import Document
from services.knowledge.service import (
    DEFAULT_TOP_K,
    MAX_DOCUMENT_FILTER,
    MAX_READ_PASSAGES,
    MAX_TOP_K,
    KnowledgeService,
    Passage,
    SearchRequest,
)

__all__ = ["MCP_PATH", "KnowledgeMcpServer", "knowledge_mcp"]

log = logging.getLogger("agentmesh.mcp")

MCP_PATH = "/mcp"
# The gRPC method whose access (who, and which API keys) both tools share: they only read.
SEARCH_RPC = "/agentmesh.knowledge.v1.KnowledgeBaseService/SearchKnowledgeBase"
# An MCP request is one JSON-RPC message (a query and a few ids): far below the SDK's 4 MiB.
MAX_REQUEST_BYTES = 64 * 1024
# The SDK's auth settings need an OAuth issuer; none is published (see knowledge_mcp).
UNPUBLISHED_ISSUER = "https://agentmesh.invalid"


class CallerToken(AccessToken):
    """The SDK's view of a verified credential, carrying the principal it resolved to."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    principal: Principal


class CredentialVerifier:
    """The SDK's TokenVerifier over Authentication: None (then 401) for any refusal."""

    def __init__(self, authentication: Authentication) -> None:
        self._authentication = authentication
        self._access = access_for(SEARCH_RPC)
        self._key_use = key_use(SEARCH_RPC)

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            principal = await self._authentication.principal(
                self._access, f"Bearer {token}", self._key_use
            )
        except (Unauthenticated, PermissionDenied) as refused:
            log.info("mcp credential refused", extra={"reason": refused.reason})
            return None
        if principal is None:  # only a PUBLIC method has no principal; SEARCH_RPC is not
            return None
        user = str(principal.user_id)
        return CallerToken(
            token=token, client_id=user, subject=user, scopes=[], principal=principal
        )


def caller() -> Principal:
    """The principal of the MCP request being served (set by the SDK's auth middleware)."""
    token = get_access_token()
    if not isinstance(token, CallerToken):  # unreachable behind the middleware's 401
        raise ToolError("UNAUTHENTICATED: authentication required")
    return token.principal


class SearchHit(BaseModel):
    document_id: str
    document_title: str
    chunk_id: str
    text: str
    score: float
    page: int
    start_offset: int
    end_offset: int


class SearchResults(BaseModel):
    results: list[SearchHit]


class DocumentPassage(BaseModel):
    chunk_id: str
    chunk_index: int
    text: str
    page: int
    start_offset: int
    end_offset: int


class DocumentPassages(BaseModel):
    document_id: str
    title: str
    filename: str
    status: str
    chunk_count: int
    passages: list[DocumentPassage]
    next_passage: int | None = Field(description="`first` of the next read; null at the end")


def _hit(passage: Passage) -> SearchHit:
    return SearchHit(
        document_id=str(passage.document_id),
        document_title=passage.document_title,
        chunk_id=passage.chunk_id,
        text=passage.text,
        score=passage.score,
        page=passage.page,
        start_offset=passage.start,
        end_offset=passage.end,
    )


def _passages(document: Document, passages: list[Passage], first: int) -> DocumentPassages:
    following = first + len(passages)
    return DocumentPassages(
        document_id=str(document.id),
        title=document.title,
        filename=document.filename,
        status=document.status,
        chunk_count=document.chunk_count,
        passages=[
            DocumentPassage(
                chunk_id=p.chunk_id,
                chunk_index=p.chunk_index,
                text=p.text,
                page=p.page,
                start_offset=p.start,
                end_offset=p.end,
            )
            for p in passages
        ],
        next_passage=following if passages and following < document.chunk_count else None,
    )


class KnowledgeTools:
    """The tools' bodies: argument conversion around the knowledge service's methods."""

    def __init__(self, knowledge: KnowledgeService) -> None:
        self._knowledge = knowledge

    async def search_knowledge_base(
        self,
        query: Annotated[str, Field(description="What to look for, in natural language.")],
        top_k: Annotated[
            int, Field(ge=1, le=MAX_TOP_K, description="How many passages to return.")
        ] = DEFAULT_TOP_K,
        document_ids: Annotated[
            list[str] | None,
            Field(
                max_length=MAX_DOCUMENT_FILTER,
                description="Search only these documents (ids from earlier results).",
            ),
        ] = None,
    ) -> SearchResults:
        """Search the caller's documents (and shared ones) for the passages that best match
        `query`, best first, each with its document and offsets to cite."""
        request = SearchRequest(query=query, top_k=top_k, document_ids=tuple(document_ids or ()))
        try:
            passages = await self._knowledge.search(caller(), request)
        except DomainError as error:
            raise _tool_error(error) from error
        return SearchResults(results=[_hit(passage) for passage in passages])

    async def read_document(
        self,
        document_id: Annotated[str, Field(description="The document's id (from a search).")],
        first: Annotated[int, Field(ge=0, description="Index of the first passage to return.")] = 0,
        limit: Annotated[
            int, Field(ge=1, le=MAX_READ_PASSAGES, description="How many passages to return.")
        ] = 20,
    ) -> DocumentPassages:
        """Read a document's passages in order, `limit` from `first` (the whole text, page
        by page, as it was indexed); `next_passage` says where the next read starts."""
        try:
            document, passages = await self._knowledge.read_passages(
                caller(), document_id, first=first, limit=limit
            )
        except DomainError as error:
            raise _tool_error(error) from error
        return _passages(document, passages, first)


def _tool_error(error: DomainError) -> ToolError:
    """A domain refusal as the tool's error result: its reason code and message, as a gRPC
    client would see them (anything else is the SDK's generic error, no text leaked)."""
    return ToolError(f"{error.reason}: {error.message}")


def knowledge_mcp(knowledge: KnowledgeService, authentication: Authentication) -> Starlette:
    """The MCP server's ASGI app: the two tools at MCP_PATH, behind bearer authentication."""
    server = MCPServer(
        "agentmesh-knowledge",
        instructions="Search and read the documents of the user whose credential you present.",
        token_verifier=CredentialVerifier(authentication),
        # The SDK asks for an OAuth issuer; none is published (no resource_server_url, so
        # no metadata routes): credentials are agentmesh's own tokens and API keys.
        auth=AuthSettings(issuer_url=AnyHttpUrl(UNPUBLISHED_ISSUER), resource_server_url=None),
    )
    tools = KnowledgeTools(knowledge)
    reads = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
    server.add_tool(tools.search_knowledge_base, annotations=reads)
    server.add_tool(tools.read_document, annotations=reads)
    return server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        max_request_body_size=MAX_REQUEST_BYTES,
        # DNS-rebinding protection checks the Host header against loopback names; behind
        # Envoy the Host is the public one. Every request needs a bearer credential, which
        # a page rebinding a name to us cannot present, so the check adds nothing here.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )


class EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: `agentmesh serve` handles SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class KnowledgeMcpServer:
    """uvicorn serving the MCP app in the process's own event loop, started and stopped
    with the application (its lifespan runs the SDK's session manager)."""

    def __init__(self, app: Starlette, host: str, port: int, grace_seconds: float) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="on",
            log_config=None,  # agentmesh's logging, as configured
            log_level="warning",  # its start and stop lines add nothing to agentmesh's
            access_log=False,
            timeout_graceful_shutdown=max(1, round(grace_seconds)),
        )
        self._server = EmbeddedUvicorn(config)
        self._serving: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> None:
        # Bound here, not by uvicorn (whose bind exits the process on failure), to raise
        # an error when the port is taken and to learn it when MCP_PORT is 0.
        host, port = self._server.config.host, self._server.config.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listening = socket.create_server((host, port), family=family)
        self.port = listening.getsockname()[1]
        self._serving = asyncio.create_task(self._server.serve(sockets=[listening]))
        while not self._server.started:
            if self._serving.done():  # it failed to start: raise its error
                await self._serving
                raise RuntimeError("the MCP server exited while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        serving, self._serving = self._serving, None
        if serving is not None:
            self._server.should_exit = True
            await serving
