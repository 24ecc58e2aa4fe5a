"""The gRPC services a process can serve, each with how its servicer is added over a
Domain. A process kind (every service in one, or one service alone) is a choice of these."""

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from a2a.types import a2a_pb2_grpc as a2a_grpc
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.agent.v1 import agent_service_pb2_grpc as agent_grpc
from agentmesh.analytics.v1 import analytics_service_pb2 as analytics_pb
from agentmesh.analytics.v1 import analytics_service_pb2_grpc as analytics_grpc
from agentmesh.audit.v1 import audit_service_pb2 as audit_pb
from agentmesh.audit.v1 import audit_service_pb2_grpc as audit_grpc
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from agentmesh.auth.v1 import api_key_service_pb2_grpc as keys_grpc
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import auth_service_pb2_grpc as auth_grpc
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.auth.v1 import user_service_pb2_grpc as users_grpc
from agentmesh.feedback.v1 import feedback_service_pb2 as feedback_pb
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as feedback_grpc
from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.indexing.v1 import indexing_service_pb2_grpc as indexing_grpc
from agentmesh.knowledge.v1 import collection_service_pb2 as collections_pb
from agentmesh.knowledge.v1 import collection_service_pb2_grpc as collections_grpc
from agentmesh.knowledge.v1 import knowledge_service_pb2 as knowledge_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2_grpc as knowledge_grpc
from agentmesh.teams.v1 import group_service_pb2 as groups_pb
from agentmesh.teams.v1 import group_service_pb2_grpc as groups_grpc
from google.protobuf.descriptor import FileDescriptor

from server.domain import Domain
from server.servicers.a2a import A2aServicer
from server.servicers.agent import AgentServicer
from server.servicers.analytics import AnalyticsServicer
from server.servicers.api_keys import ApiKeyServicer
from server.servicers.audit import AuditServicer
from server.servicers.auth import AuthServicer
from server.servicers.collections import CollectionServicer
from server.servicers.feedback import FeedbackServicer
from server.servicers.groups import GroupServicer
from server.servicers.indexing import IndexingServicer
from server.servicers.knowledge import KnowledgeBaseServicer
from server.servicers.users import UserServicer


def _name(file: FileDescriptor, service: str) -> str:
    return file.services_by_name[service].full_name


@dataclass(frozen=True)
class ServedService:
    """A gRPC service a process can serve: the short name `agentmesh serve --services`
    and the mesh's upstreams know it by, its full name, and how to add its servicer."""

    key: str
    name: str
    add: Callable[[Domain, grpc.aio.Server], None]
    # The probed dependencies it cannot answer without (its health follows them): every
    # service needs the database; the agent (runs, quotas) and analytics (quotas) need
    # Redis when it is configured; the knowledge base a Qdrant server when there is one.
    needs: frozenset[str] = frozenset({"database"})
    # More services of our contract served under the same key (GroupService with the
    # users'): they come and go with it, report its health, and the mesh routes them to
    # its cluster, so a new one needs no new process kind, upstream or compose service.
    also: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The full names of every service it serves."""
        return (self.name, *self.also)


def add_users(domain: Domain, server: grpc.aio.Server) -> None:
    """Accounts, and the groups of accounts (issue 23) beside them: both read the same
    tables of users, and groups need nothing the users' processes lack."""
    users_grpc.add_UserServiceServicer_to_server(
        UserServicer(domain.users, domain.account_exports), server
    )
    groups_grpc.add_GroupServiceServicer_to_server(GroupServicer(domain.groups), server)


def add_knowledge(domain: Domain, server: grpc.aio.Server) -> None:
    """Documents and search, and the collections sharing them (issue 23) beside them: the
    grants are enforced in this process's search index and written to it from here."""
    knowledge_grpc.add_KnowledgeBaseServiceServicer_to_server(
        KnowledgeBaseServicer(domain.knowledge), server
    )
    collections_grpc.add_CollectionServiceServicer_to_server(
        CollectionServicer(domain.knowledge), server
    )


def add_agent(domain: Domain, server: grpc.aio.Server) -> None:
    """The agent's own service, and the same agent for other agents over A2A (issue 22):
    lf.a2a.v1.A2AService goes with the agent's key (its runs live in this process)."""
    servicer = AgentServicer(domain.agent, domain.feedback)
    agent_grpc.add_AgentServiceServicer_to_server(servicer, server)
    assert domain.a2a_tasks is not None  # built with the agent
    add_a2a = a2a_grpc.add_A2AServiceServicer_to_server  # a2a-sdk's stubs are untyped
    add_a2a(A2aServicer(domain.a2a_tasks), server)  # type: ignore[no-untyped-call]


SERVICES = (
    ServedService(
        "auth",
        _name(auth_pb.DESCRIPTOR, "AuthService"),
        lambda d, s: auth_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(d.auth, d.invitations), s
        ),
    ),
    ServedService(
        "users",
        _name(users_pb.DESCRIPTOR, "UserService"),
        add_users,
        also=(_name(groups_pb.DESCRIPTOR, "GroupService"),),
    ),
    ServedService(
        "api_keys",
        _name(keys_pb.DESCRIPTOR, "ApiKeyService"),
        lambda d, s: keys_grpc.add_ApiKeyServiceServicer_to_server(ApiKeyServicer(d.api_keys), s),
    ),
    ServedService(
        "agent",
        _name(agent_pb.DESCRIPTOR, "AgentService"),
        add_agent,
        frozenset({"database", "redis"}),
    ),
    ServedService(
        "knowledge",
        _name(knowledge_pb.DESCRIPTOR, "KnowledgeBaseService"),
        add_knowledge,
        frozenset({"database", "qdrant"}),
        also=(_name(collections_pb.DESCRIPTOR, "CollectionService"),),
    ),
    ServedService(
        "feedback",
        _name(feedback_pb.DESCRIPTOR, "FeedbackService"),
        lambda d, s: feedback_grpc.add_FeedbackServiceServicer_to_server(
            FeedbackServicer(d.feedback), s
        ),
    ),
    ServedService(
        "analytics",
        _name(analytics_pb.DESCRIPTOR, "AnalyticsService"),
        lambda d, s: analytics_grpc.add_AnalyticsServiceServicer_to_server(
            AnalyticsServicer(d.usage, d.stats), s
        ),
        frozenset({"database", "redis"}),
    ),
    ServedService(
        "audit",
        _name(audit_pb.DESCRIPTOR, "AuditService"),
        lambda d, s: audit_grpc.add_AuditServiceServicer_to_server(
            AuditServicer(d.audit_listing), s
        ),
    ),
)
# Every public service of our contract, in SERVICES' order (Envoy's transcoder lists them so).
SERVICE_NAMES = [name for service in SERVICES for name in service.names]
SERVICE_KEYS = [service.key for service in SERVICES]

# Internal: ingestion workers write into the vector index of the process that owns the
# embedded engine, and an agent process without the knowledge base embeds with its model.
# Not in Envoy's routes, the health report or the public contract.
INDEXING = ServedService(
    "indexing",
    _name(indexing_pb.DESCRIPTOR, "IndexingService"),
    lambda d, s: indexing_grpc.add_IndexingServiceServicer_to_server(
        IndexingServicer(d.knowledge.index, d.knowledge.embedder), s
    ),
)
