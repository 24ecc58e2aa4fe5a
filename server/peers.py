"""gRPC clients of the services a process needs but another process serves.

Two dependencies cross processes when `agentmesh serve --services` splits the services:
the agent's knowledge-base tool searches KnowledgeBaseService (as the end user, through
`KNOWLEDGE_TARGET`: Envoy's address in a mesh), and the user service removes a deleted
account's passages through the index owner's internal IndexingService (with the service
credential, at `INDEX_TARGET`, as ingestion workers write). Where a process serves the
callee itself, no client is made and the call stays in process.
"""

from server import domain_settings as configured
from server.config import Settings
from server.domain import Peers
from server.remote_index import RemoteIndex
from server.remote_knowledge import RemoteKnowledgeBase


def connect_peers(settings: Settings) -> Peers:
    served = set(settings.services)
    if "knowledge" in served:
        return Peers()
    knowledge = None
    if "agent" in served and settings.knowledge_target:
        # Without a deadline of its own, a search gets as long as any tool call.
        timeout = settings.tool_timeout_seconds
        knowledge = RemoteKnowledgeBase(settings.knowledge_target, timeout=timeout)
    index = None
    if "users" in served and settings.index_target:
        index = RemoteIndex(settings.index_target, configured.index_token(settings))

    async def close() -> None:
        for client in (knowledge, index):
            if client is not None:
                await client.close()

    return Peers(knowledge=knowledge, index=index, close=close)
