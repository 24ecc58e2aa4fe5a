"""knowledge_base_search: the hybrid retrieval of the knowledge base, as the caller."""

from typing import ClassVar, Protocol

from pydantic import BaseModel, Field

from services.agent.tools.base import (
    RetrievedPassage,
    Source,
    SourceKind,
    Tool,
    ToolCallContext,
    ToolResult,
)
from services.auth.principal import Principal
from services.knowledge.service import Passage, SearchRequest


class KnowledgeBase(Protocol):
    """Where the tool searches: the knowledge service in this process, or the one another
    process serves (server/remote_knowledge.py), always as the caller."""

    async def search(self, principal: Principal, request: SearchRequest) -> list[Passage]: ...


class KnowledgeSearchArgs(BaseModel):
    query: str = Field(min_length=1, max_length=1000, description="The search query.")


class KnowledgeSearchTool(Tool):
    name = "knowledge_base_search"
    kind = SourceKind.KNOWLEDGE_BASE
    Args: ClassVar[type[BaseModel]] = KnowledgeSearchArgs
    guidance_prompt = "tools/kb_search_query.j2"

    def __init__(self, knowledge: KnowledgeBase, top_k: int) -> None:
        self._knowledge = knowledge
        self._top_k = top_k

    async def execute(self, args: BaseModel, call: ToolCallContext) -> ToolResult:
        assert isinstance(args, KnowledgeSearchArgs)
        # The same search the SearchKnowledgeBase RPC runs, with the caller's own scope.
        passages = await self._knowledge.search(
            call.principal, SearchRequest(query=args.query, top_k=self._top_k)
        )
        sources = [
            Source(
                kind=SourceKind.KNOWLEDGE_BASE,
                title=p.document_title,
                text=p.text,
                document_id=str(p.document_id),
                chunk_id=p.chunk_id,
                page=p.page,
                start=p.start,
                end=p.end,
                score=p.score,
            )
            for p in passages
        ]
        retrieval = [retrieved(p) for p in passages]
        return ToolResult(sources, f"{len(sources)} passages", retrieval=retrieval)


def retrieved(passage: Passage) -> RetrievedPassage:
    return RetrievedPassage(
        chunk_id=passage.chunk_id,
        document_id=str(passage.document_id),
        document_title=passage.document_title,
        text=passage.text,
        score=passage.score,
        page=passage.page,
        start=passage.start,
        end=passage.end,
        chunk_index=passage.chunk_index,
        legs=frozenset(leg.value for leg in passage.legs),
    )
