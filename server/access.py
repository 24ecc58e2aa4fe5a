"""Who may call each RPC: the one table the auth interceptor enforces.

Every method of every agentmesh service must appear here; a method missing from the table
is refused for everyone (and a test fails), so a new RPC cannot ship unprotected.
"""

import enum
from collections.abc import Mapping


class Access(enum.Enum):
    PUBLIC = "public"  # no token needed
    USER = "user"  # any authenticated account
    ADMIN = "admin"  # administrators only
    SERVICE = "service"  # agentmesh's own processes, with the service credential (INDEX_TOKEN)


# Infrastructure services that must answer without a token (probes, grpcurl).
PUBLIC_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_AUTH = "/agentmesh.auth.v1.AuthService/"
_USERS = "/agentmesh.auth.v1.UserService/"
_AGENT = "/agentmesh.agent.v1.AgentService/"
_KB = "/agentmesh.knowledge.v1.KnowledgeBaseService/"
_FEEDBACK = "/agentmesh.feedback.v1.FeedbackService/"
_ANALYTICS = "/agentmesh.analytics.v1.AnalyticsService/"
_INDEXING = "/agentmesh.indexing.v1.IndexingService/"

RPC_ACCESS: Mapping[str, Access] = {
    _AUTH + "Register": Access.PUBLIC,
    _AUTH + "Login": Access.PUBLIC,
    _AUTH + "RefreshToken": Access.PUBLIC,
    _AUTH + "Logout": Access.USER,
    _AUTH + "ChangePassword": Access.USER,
    _USERS + "GetCurrentUser": Access.USER,
    _USERS + "UpdateCurrentUser": Access.USER,
    _USERS + "ListUsers": Access.ADMIN,
    _USERS + "GetUser": Access.ADMIN,
    _USERS + "UpdateUser": Access.ADMIN,
    _USERS + "DeleteUser": Access.ADMIN,
    _AGENT + "Query": Access.USER,
    _AGENT + "StreamQuery": Access.USER,
    _AGENT + "AttachRun": Access.USER,
    _AGENT + "CancelRun": Access.USER,
    _AGENT + "ListConversations": Access.USER,
    _AGENT + "GetConversation": Access.USER,
    _AGENT + "DeleteConversation": Access.USER,
    _KB + "UploadDocument": Access.USER,
    _KB + "ListDocuments": Access.USER,
    _KB + "GetDocument": Access.USER,
    _KB + "DeleteDocument": Access.USER,
    _KB + "SearchKnowledgeBase": Access.USER,
    _FEEDBACK + "SubmitFeedback": Access.USER,
    _FEEDBACK + "ListFeedback": Access.ADMIN,
    _FEEDBACK + "GetFeedbackStats": Access.ADMIN,
    _ANALYTICS + "GetUsage": Access.USER,
    _ANALYTICS + "GetSystemStats": Access.ADMIN,
    _ANALYTICS + "GetUserStats": Access.ADMIN,
    _INDEXING + "UpsertPassages": Access.SERVICE,
    _INDEXING + "DeleteGeneration": Access.SERVICE,
    _INDEXING + "DeleteDocumentPassages": Access.SERVICE,
    _INDEXING + "DeleteOwnerPassages": Access.SERVICE,
    _INDEXING + "EmbedTexts": Access.SERVICE,
}


def access_for(method: str) -> Access | None:
    """The access level of a full method name (`/pkg.Service/Method`); None: not allowed."""
    service = method.lstrip("/").partition("/")[0]
    if service in PUBLIC_SERVICES:
        return Access.PUBLIC
    return RPC_ACCESS.get(method)
