"""ApiKeyService: API keys of the caller, or of a service account (administrators)."""

from typing import Any

from agentmesh.auth.v1 import api_key_pb2 as key_pb
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from agentmesh.auth.v1 import api_key_service_pb2_grpc as keys_grpc

from server.request_context import current_principal
from server.servicers.converters import optional_time, to_timestamp
from services.auth.api_keys import ApiKeyService
from services.auth.models import ApiKey


def key_to_proto(key: ApiKey) -> key_pb.ApiKey:
    """A key as clients see it: never its secret nor its hash."""
    message = key_pb.ApiKey(
        api_key_id=str(key.id),
        name=key.name,
        prefix=key.prefix,
        read_only=key.read_only,
        created_at=to_timestamp(key.created_at),
        user_id=str(key.user_id),
    )
    for field, value in (
        ("expires_at", key.expires_at),
        ("last_used_at", key.last_used_at),
        ("revoked_at", key.revoked_at),
    ):
        if value is not None:
            getattr(message, field).CopyFrom(to_timestamp(value))
    return message


class ApiKeyServicer(keys_grpc.ApiKeyServiceServicer):
    def __init__(self, keys: ApiKeyService) -> None:
        self._keys = keys

    async def CreateApiKey(
        self, request: keys_pb.CreateApiKeyRequest, context: Any
    ) -> keys_pb.CreateApiKeyResponse:
        created = await self._keys.create(
            current_principal(),
            name=request.name,
            expires_at=optional_time(request, "expires_at"),
            read_only=request.read_only,
            user_id=request.user_id,
        )
        return keys_pb.CreateApiKeyResponse(
            api_key=key_to_proto(created.key), secret=created.secret
        )

    async def ListApiKeys(
        self, request: keys_pb.ListApiKeysRequest, context: Any
    ) -> keys_pb.ListApiKeysResponse:
        page = await self._keys.list(
            current_principal(),
            user_id=request.user_id,
            requested_page_size=request.page_size,
            page_token=request.page_token,
        )
        return keys_pb.ListApiKeysResponse(
            api_keys=[key_to_proto(k) for k in page.keys], next_page_token=page.next_page_token
        )

    async def RevokeApiKey(
        self, request: keys_pb.RevokeApiKeyRequest, context: Any
    ) -> keys_pb.RevokeApiKeyResponse:
        key = await self._keys.revoke(current_principal(), request.api_key_id)
        return keys_pb.RevokeApiKeyResponse(api_key=key_to_proto(key))
