"""KnowledgeBaseService: documents and search over them."""

import uuid
from collections.abc import Sequence
from typing import Any

from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb_service_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as kb_grpc

from server.request_context import current_principal
from server.servicers.converters import search_result_to_proto, to_timestamp
from services.auth.principal import Principal
from services.errors import InvalidArgument
from services.knowledge.models import EVERYONE_COLLECTION_ID, Document, DocumentStatus, Stage
from services.knowledge.parsing import DocumentFormat
from services.knowledge.retrieval import Rerank, SearchMode
from services.knowledge.service import KnowledgeService, SearchRequest, Upload

FORMAT_TO_PROTO = {
    DocumentFormat.PDF: kb_pb.DOCUMENT_TYPE_PDF,
    DocumentFormat.DOCX: kb_pb.DOCUMENT_TYPE_DOCX,
    DocumentFormat.TEXT: kb_pb.DOCUMENT_TYPE_TEXT,
    DocumentFormat.MARKDOWN: kb_pb.DOCUMENT_TYPE_MARKDOWN,
}
STATUS_TO_PROTO = {
    DocumentStatus.PROCESSING: kb_pb.DOCUMENT_STATUS_PROCESSING,
    DocumentStatus.READY: kb_pb.DOCUMENT_STATUS_READY,
    DocumentStatus.FAILED: kb_pb.DOCUMENT_STATUS_FAILED,
}
STATUS_FROM_PROTO = {v: k for k, v in STATUS_TO_PROTO.items()}
STAGE_TO_PROTO = {
    Stage.QUEUED: kb_pb.INGESTION_STAGE_QUEUED,
    Stage.PARSING: kb_pb.INGESTION_STAGE_PARSING,
    Stage.CHUNKING: kb_pb.INGESTION_STAGE_CHUNKING,
    Stage.EMBEDDING: kb_pb.INGESTION_STAGE_EMBEDDING,
    Stage.INDEXING: kb_pb.INGESTION_STAGE_INDEXING,
    Stage.DONE: kb_pb.INGESTION_STAGE_DONE,
}
MODE_FROM_PROTO = {
    kb_service_pb.SEARCH_MODE_UNSPECIFIED: SearchMode.HYBRID,
    kb_service_pb.SEARCH_MODE_HYBRID: SearchMode.HYBRID,
    kb_service_pb.SEARCH_MODE_DENSE: SearchMode.DENSE,
    kb_service_pb.SEARCH_MODE_SPARSE: SearchMode.SPARSE,
}
MODE_TO_PROTO = {
    SearchMode.HYBRID: kb_service_pb.SEARCH_MODE_HYBRID,
    SearchMode.DENSE: kb_service_pb.SEARCH_MODE_DENSE,
    SearchMode.SPARSE: kb_service_pb.SEARCH_MODE_SPARSE,
}
RERANK_FROM_PROTO = {
    kb_service_pb.RERANK_MODE_UNSPECIFIED: Rerank.NONE,
    kb_service_pb.RERANK_MODE_NONE: Rerank.NONE,
    kb_service_pb.RERANK_MODE_MMR: Rerank.MMR,
    kb_service_pb.RERANK_MODE_CROSS_ENCODER: Rerank.CROSS_ENCODER,
}
RERANK_TO_PROTO = {
    rerank: value
    for value, rerank in RERANK_FROM_PROTO.items()
    if value != kb_service_pb.RERANK_MODE_UNSPECIFIED
}


def document_to_proto(document: Document, collections: Sequence[uuid.UUID] = ()) -> kb_pb.Document:
    """The document, with the collections holding it that the caller may read."""
    return kb_pb.Document(
        document_id=str(document.id),
        title=document.title,
        filename=document.filename,
        document_type=FORMAT_TO_PROTO[DocumentFormat(document.document_type)],
        status=STATUS_TO_PROTO[DocumentStatus(document.status)],
        stage=STAGE_TO_PROTO[Stage(document.stage)],
        failure_reason=document.failure_reason or "",
        size_bytes=document.size_bytes,
        page_count=document.page_count,
        chunk_count=document.chunk_count,
        content_sha256=document.content_sha256,
        shared=EVERYONE_COLLECTION_ID in collections,
        collection_ids=[str(collection_id) for collection_id in collections],
        owner_id=str(document.owner_id),
        metadata=document.extra,
        created_at=to_timestamp(document.created_at),
        updated_at=to_timestamp(document.updated_at),
    )


def search_from_proto(request: kb_service_pb.SearchKnowledgeBaseRequest) -> SearchRequest:
    if request.mode not in MODE_FROM_PROTO:
        raise InvalidArgument.of("mode", "is not a known search mode")
    if request.rerank not in RERANK_FROM_PROTO:
        raise InvalidArgument.of("rerank", "is not a known rerank mode")
    return SearchRequest(
        query=request.query,
        top_k=request.top_k,
        document_ids=tuple(request.document_ids),
        min_score=request.min_score,
        mode=MODE_FROM_PROTO[request.mode],
        rerank=RERANK_FROM_PROTO[request.rerank],
        collection_ids=tuple(request.collection_ids),
    )


class KnowledgeBaseServicer(kb_grpc.KnowledgeBaseServiceServicer):
    def __init__(self, knowledge: KnowledgeService) -> None:
        self._knowledge = knowledge

    async def _documents(
        self, principal: Principal, documents: list[Document]
    ) -> list[kb_pb.Document]:
        held = await self._knowledge.collections_of(principal, documents)
        return [document_to_proto(d, held.get(d.id, ())) for d in documents]

    async def UploadDocument(
        self, request: kb_service_pb.UploadDocumentRequest, context: Any
    ) -> kb_service_pb.UploadDocumentResponse:
        upload = Upload(
            filename=request.filename,
            content=request.content,
            title=request.title,
            metadata=dict(request.metadata),
            document_id=request.document_id,
            shared=request.shared,
            collection_ids=tuple(request.collection_ids),
        )
        principal = current_principal()
        result = await self._knowledge.upload(principal, upload)
        [document] = await self._documents(principal, [result.document])
        return kb_service_pb.UploadDocumentResponse(
            document=document, deduplicated=result.deduplicated
        )

    async def ListDocuments(
        self, request: kb_service_pb.ListDocumentsRequest, context: Any
    ) -> kb_service_pb.ListDocumentsResponse:
        if request.status and request.status not in STATUS_FROM_PROTO:
            raise InvalidArgument.of("status", "is not a known document status")
        page = await self._knowledge.list_documents(
            current_principal(),
            requested_page_size=request.page_size,
            page_token=request.page_token,
            status=STATUS_FROM_PROTO.get(request.status),
            collection=request.collection_id,
        )
        return kb_service_pb.ListDocumentsResponse(
            documents=await self._documents(current_principal(), page.documents),
            next_page_token=page.next_page_token,
        )

    async def GetDocument(
        self, request: kb_service_pb.GetDocumentRequest, context: Any
    ) -> kb_service_pb.GetDocumentResponse:
        principal = current_principal()
        document = await self._knowledge.get(principal, request.document_id)
        [found] = await self._documents(principal, [document])
        return kb_service_pb.GetDocumentResponse(document=found)

    async def DeleteDocument(
        self, request: kb_service_pb.DeleteDocumentRequest, context: Any
    ) -> kb_service_pb.DeleteDocumentResponse:
        await self._knowledge.delete(current_principal(), request.document_id)
        return kb_service_pb.DeleteDocumentResponse()

    async def SearchKnowledgeBase(
        self, request: kb_service_pb.SearchKnowledgeBaseRequest, context: Any
    ) -> kb_service_pb.SearchKnowledgeBaseResponse:
        search = search_from_proto(request)
        passages = await self._knowledge.search(current_principal(), search)
        return kb_service_pb.SearchKnowledgeBaseResponse(
            results=[search_result_to_proto(p) for p in passages], mode=MODE_TO_PROTO[search.mode]
        )
