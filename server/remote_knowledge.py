"""The knowledge base of another process, over KnowledgeBaseService's public contract.

A process that serves the agent but not the knowledge base (`agentmesh serve --services`)
searches through this client: the same `search(principal, request)` the in-process
`KnowledgeService` answers, so the agent's tool has one seam and one code path. Every call
is made as the end user — it presents the bearer credential the user's own call carried,
so it can never see more than that user may — with the request id, the client address
(for the callee's per-IP limit, behind a trusted proxy) and what is left of the deadline.
The callee counts it against the user's rate limit like any call of theirs.
"""

import time
import uuid

import grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb_service_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc

from server.channels import connect
from server.errors import domain_error_of
from server.request_context import RequestInfo, current_request
from server.servicers.converters import LEG_TO_PROTO
from server.servicers.knowledge import MODE_TO_PROTO, RERANK_TO_PROTO
from services.auth.principal import Principal
from services.errors import Unauthenticated, Unavailable
from services.knowledge.retrieval import Leg
from services.knowledge.service import Passage, SearchRequest

# The inverse of how the servicer writes each result's legs.
LEG_FROM_PROTO = {value: Leg(name) for name, value in LEG_TO_PROTO.items()}


class RemoteKnowledgeBase:
    """Searches the knowledge base at `target` (Envoy's address in a mesh) as the caller."""

    def __init__(self, target: str, *, timeout: float) -> None:
        self._channel = connect(target)
        self._stub = kb_grpc.KnowledgeBaseServiceStub(self._channel)
        self._timeout = timeout  # for a caller without a deadline of its own

    async def search(self, principal: Principal, request: SearchRequest) -> list[Passage]:
        caller = _caller(principal)
        try:
            response = await self._stub.SearchKnowledgeBase(
                search_to_proto(request),
                metadata=_metadata(caller),
                timeout=_remaining(caller, self._timeout),
            )
        except grpc.aio.AioRpcError as error:
            raise domain_error_of(error, "knowledge base") from None
        return [passage_from_proto(result) for result in response.results]

    async def close(self) -> None:
        await self._channel.close()


def _caller(principal: Principal) -> RequestInfo:
    """The RPC being served for `principal`, whose credential the call presents."""
    caller = current_request.get()
    if caller is None or caller.principal != principal or not caller.credential:
        raise Unauthenticated(
            "no credential of this user to call the knowledge base with",
            reason="NO_END_USER_CREDENTIAL",
        )
    return caller


def _metadata(caller: RequestInfo) -> list[tuple[str, str]]:
    assert caller.credential is not None
    metadata = [("authorization", caller.credential), ("x-request-id", caller.request_id)]
    if caller.client_ip:
        metadata.append(("x-forwarded-for", caller.client_ip))
    return metadata


def _remaining(caller: RequestInfo, default: float) -> float:
    """Seconds left of the caller's deadline (the default without one)."""
    if caller.deadline is None:
        return default
    left = caller.deadline - time.monotonic()
    if left <= 0:
        raise Unavailable("the request's deadline has passed", reason="DEADLINE_EXCEEDED")
    return min(left, default)


def search_to_proto(request: SearchRequest) -> kb_service_pb.SearchKnowledgeBaseRequest:
    return kb_service_pb.SearchKnowledgeBaseRequest(
        query=request.query,
        top_k=request.top_k,
        document_ids=list(request.document_ids),
        min_score=request.min_score,
        mode=MODE_TO_PROTO[request.mode],
        rerank=RERANK_TO_PROTO[request.rerank],
    )


def passage_from_proto(result: kb_pb.SearchResult) -> Passage:
    return Passage(
        chunk_id=result.chunk_id,
        document_id=uuid.UUID(result.document_id),
        document_title=result.document_title,
        text=result.text,
        score=result.score,
        page=result.page,
        start=result.start_offset,
        end=result.end_offset,
        chunk_index=result.chunk_index,
        legs=frozenset(LEG_FROM_PROTO[leg] for leg in result.legs if leg in LEG_FROM_PROTO),
    )
