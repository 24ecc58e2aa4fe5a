"""CollectionService: collections of documents and their grants (served with the knowledge
base, whose processes own the search index the grants are enforced in)."""

from typing import Any

from agentmesh.knowledge.v1 import collection_pb2 as collection_pb
from agentmesh.knowledge.v1 import collection_service_pb2 as collections_pb
from agentmesh.knowledge.v1 import collection_service_pb2_grpc as collections_grpc

from server.request_context import current_principal
from server.servicers.converters import to_timestamp
from server.servicers.knowledge import document_to_proto
from services.errors import Violations
from services.knowledge.collection_access import Access
from services.knowledge.collections import (
    CollectionView,
    Grantee,
    GrantView,
    parse_grantee,
)
from services.knowledge.service import KnowledgeService

ACCESS_TO_PROTO = {
    Access.NONE: collection_pb.COLLECTION_ACCESS_UNSPECIFIED,
    Access.READ: collection_pb.COLLECTION_ACCESS_READ,
    Access.WRITE: collection_pb.COLLECTION_ACCESS_WRITE,
    Access.MANAGE: collection_pb.COLLECTION_ACCESS_MANAGE,
}
ACCESS_FROM_PROTO = {v: k for k, v in ACCESS_TO_PROTO.items()}


def collection_to_proto(view: CollectionView) -> collection_pb.Collection:
    collection = view.collection
    return collection_pb.Collection(
        collection_id=str(collection.id),
        name=collection.name,
        description=collection.description,
        owner_user_id=str(collection.owner_user_id or ""),
        owner_group_id=str(collection.owner_group_id or ""),
        document_count=view.document_count,
        caller_access=ACCESS_TO_PROTO[view.access],
        created_at=to_timestamp(collection.created_at),
    )


def grant_to_proto(view: GrantView) -> collection_pb.CollectionGrant:
    grant = collection_pb.CollectionGrant(
        access=ACCESS_TO_PROTO[view.access], granted_at=to_timestamp(view.granted_at)
    )
    if view.grantee.user_id is not None:
        grant.user_id = str(view.grantee.user_id)
    elif view.grantee.group_id is not None:
        grant.group_id = str(view.grantee.group_id)
    else:
        grant.everyone = True
    return grant


def grantee_from_proto(grant: collection_pb.CollectionGrant) -> Grantee:
    violations = Violations()
    grantee = parse_grantee(grant.user_id, grant.group_id, grant.everyone, violations)
    violations.raise_if_any()
    return grantee


class CollectionServicer(collections_grpc.CollectionServiceServicer):
    def __init__(self, knowledge: KnowledgeService) -> None:
        self._collections = knowledge.collections

    async def CreateCollection(
        self, request: collections_pb.CreateCollectionRequest, context: Any
    ) -> collections_pb.CreateCollectionResponse:
        view = await self._collections.create(
            current_principal(),
            name=request.name,
            description=request.description,
            owner_group_id=request.owner_group_id,
        )
        return collections_pb.CreateCollectionResponse(collection=collection_to_proto(view))

    async def GetCollection(
        self, request: collections_pb.GetCollectionRequest, context: Any
    ) -> collections_pb.GetCollectionResponse:
        view = await self._collections.get(current_principal(), request.collection_id)
        return collections_pb.GetCollectionResponse(collection=collection_to_proto(view))

    async def ListCollections(
        self, request: collections_pb.ListCollectionsRequest, context: Any
    ) -> collections_pb.ListCollectionsResponse:
        views, token = await self._collections.list_readable(
            current_principal(),
            requested_page_size=request.page_size,
            page_token=request.page_token,
        )
        return collections_pb.ListCollectionsResponse(
            collections=[collection_to_proto(v) for v in views], next_page_token=token
        )

    async def DeleteCollection(
        self, request: collections_pb.DeleteCollectionRequest, context: Any
    ) -> collections_pb.DeleteCollectionResponse:
        await self._collections.delete(current_principal(), request.collection_id)
        return collections_pb.DeleteCollectionResponse()

    async def AddCollectionDocument(
        self, request: collections_pb.AddCollectionDocumentRequest, context: Any
    ) -> collections_pb.AddCollectionDocumentResponse:
        principal = current_principal()
        document = await self._collections.add_document(
            principal, request.collection_id, request.document_id
        )
        held = await self._collections.collections_of(principal, document)
        return collections_pb.AddCollectionDocumentResponse(
            document=document_to_proto(document, held)
        )

    async def RemoveCollectionDocument(
        self, request: collections_pb.RemoveCollectionDocumentRequest, context: Any
    ) -> collections_pb.RemoveCollectionDocumentResponse:
        await self._collections.remove_document(
            current_principal(), request.collection_id, request.document_id
        )
        return collections_pb.RemoveCollectionDocumentResponse()

    async def MoveDocument(
        self, request: collections_pb.MoveDocumentRequest, context: Any
    ) -> collections_pb.MoveDocumentResponse:
        principal = current_principal()
        document = await self._collections.move(
            principal, request.document_id, request.from_collection_id, request.to_collection_id
        )
        held = await self._collections.collections_of(principal, document)
        return collections_pb.MoveDocumentResponse(document=document_to_proto(document, held))

    async def GrantCollectionAccess(
        self, request: collections_pb.GrantCollectionAccessRequest, context: Any
    ) -> collections_pb.GrantCollectionAccessResponse:
        grantee = grantee_from_proto(request.grant)
        access = ACCESS_FROM_PROTO.get(request.grant.access, Access.NONE)
        view = await self._collections.grant(
            current_principal(), request.collection_id, grantee, access
        )
        return collections_pb.GrantCollectionAccessResponse(grant=grant_to_proto(view))

    async def RevokeCollectionAccess(
        self, request: collections_pb.RevokeCollectionAccessRequest, context: Any
    ) -> collections_pb.RevokeCollectionAccessResponse:
        grantee = grantee_from_proto(request.grant)
        await self._collections.revoke(current_principal(), request.collection_id, grantee)
        return collections_pb.RevokeCollectionAccessResponse()

    async def ListCollectionGrants(
        self, request: collections_pb.ListCollectionGrantsRequest, context: Any
    ) -> collections_pb.ListCollectionGrantsResponse:
        views = await self._collections.grants(current_principal(), request.collection_id)
        return collections_pb.ListCollectionGrantsResponse(
            grants=[grant_to_proto(v) for v in views]
        )
