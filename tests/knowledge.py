"""Knowledge-base calls the tests share: upload, wait for ingestion, search."""

import asyncio

from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb

from tests.harness import Account, Stubs

INGEST_TIMEOUT = 180.0


async def upload(
    stubs: Stubs, account: Account, filename: str, content: bytes, **fields: object
) -> kb.UploadDocumentResponse:
    request = kb.UploadDocumentRequest(filename=filename, content=content, **fields)  # type: ignore[arg-type]
    response: kb.UploadDocumentResponse = await stubs.kb.UploadDocument(
        request, metadata=account.metadata
    )
    return response


async def get_document(stubs: Stubs, account: Account, document_id: str) -> kb_pb.Document:
    response = await stubs.kb.GetDocument(
        kb.GetDocumentRequest(document_id=document_id), metadata=account.metadata
    )
    return response.document


async def wait_settled(
    stubs: Stubs, account: Account, document_id: str, timeout: float = INGEST_TIMEOUT
) -> kb_pb.Document:
    """The document once its ingestion has ended (READY or FAILED)."""
    async with asyncio.timeout(timeout):
        while True:
            document = await get_document(stubs, account, document_id)
            if document.status != kb_pb.DOCUMENT_STATUS_PROCESSING:
                return document
            await asyncio.sleep(0.1)


async def ingest(stubs: Stubs, account: Account, filename: str, content: bytes) -> kb_pb.Document:
    """Upload and wait until READY (fails the test on any other outcome)."""
    response = await upload(stubs, account, filename, content)
    document = await wait_settled(stubs, account, response.document.document_id)
    assert document.status == kb_pb.DOCUMENT_STATUS_READY, document.failure_reason
    return document


async def search(
    stubs: Stubs, account: Account, query: str, **fields: object
) -> list[kb_pb.SearchResult]:
    request = kb.SearchKnowledgeBaseRequest(query=query, **fields)  # type: ignore[arg-type]
    response = await stubs.kb.SearchKnowledgeBase(request, metadata=account.metadata)
    return list(response.results)
