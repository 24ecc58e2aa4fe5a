"""gRPC clients of the services a process needs but another process serves.

Three dependencies cross processes when `agentmesh serve --services` splits the services:
the agent's knowledge-base tool searches KnowledgeBaseService (as the end user, through
`KNOWLEDGE_TARGET`: Envoy's address in a mesh); the agent's intent classifier embeds
questions with the index owner's model (its internal IndexingService.EmbedTexts, with the
service credential, at `INDEX_TARGET`), so an agent process loads no model; and the user
service removes a deleted account's passages through the same internal service (as
ingestion workers write). Where a process serves the callee itself, no client is made and
the call stays in process.
"""

from server import domain_settings as configured
from server.config import Settings
from server.domain import Peers
from server.remote_encoder import RemoteEncoder
from server.remote_index import RemoteIndex
from server.remote_knowledge import RemoteKnowledgeBase


def connect_peers(settings: Settings) -> Peers:
    served = set(settings.services)
    if "knowledge" in served:
        return Peers()
    # Without a deadline of its own, a search or an embedding gets as long as a tool call.
    timeout = settings.tool_timeout_seconds
    knowledge = encoder = None
    if "agent" in served and settings.knowledge_target:
        knowledge = RemoteKnowledgeBase(settings.knowledge_target, timeout=timeout)
    if "agent" in served and settings.index_target:
        token = configured.index_token(settings)
        encoder = RemoteEncoder(settings.index_target, token, timeout=timeout)
    index = None
    if "users" in served and settings.index_target:
        index = RemoteIndex(settings.index_target, configured.index_token(settings))

    async def close() -> None:
        for client in (knowledge, encoder, index):
            if client is not None:
                await client.close()

    return Peers(knowledge=knowledge, index=index, encoder=encoder, close=close)
