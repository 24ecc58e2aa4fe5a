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
_API_KEYS = "/agentmesh.auth.v1.ApiKeyService/"
_AGENT = "/agentmesh.agent.v1.AgentService/"
_KB = "/agentmesh.knowledge.v1.KnowledgeBaseService/"
_FEEDBACK = "/agentmesh.feedback.v1.FeedbackService/"
_ANALYTICS = "/agentmesh.analytics.v1.AnalyticsService/"
_INDEXING = "/agentmesh.indexing.v1.IndexingService/"
_AUDIT = "/agentmesh.audit.v1.AuditService/"
_A2A = "/lf.a2a.v1.A2AService/"  # the agent over A2A (issue 22)
_GROUPS = "/agentmesh.teams.v1.GroupService/"
_COLLECTIONS = "/agentmesh.knowledge.v1.CollectionService/"

RPC_ACCESS: Mapping[str, Access] = {
    _AUTH + "Register": Access.PUBLIC,
    _AUTH + "Login": Access.PUBLIC,
    _AUTH + "RefreshToken": Access.PUBLIC,
    _AUTH + "Logout": Access.USER,
    _AUTH + "ChangePassword": Access.USER,
    _AUTH + "AcceptInvitation": Access.PUBLIC,
    _USERS + "GetCurrentUser": Access.USER,
    _USERS + "UpdateCurrentUser": Access.USER,
    _USERS + "ListUsers": Access.ADMIN,
    _USERS + "GetUser": Access.ADMIN,
    _USERS + "UpdateUser": Access.ADMIN,
    _USERS + "DeleteUser": Access.ADMIN,
    _USERS + "CreateUser": Access.ADMIN,
    _USERS + "DisableUser": Access.ADMIN,
    _USERS + "EnableUser": Access.ADMIN,
    _USERS + "ExportCurrentUser": Access.USER,
    _USERS + "DeleteCurrentUser": Access.USER,
    # Groups (issue 23): administrators alone create, rename and delete them; who may
    # change a group's members is decided per group (services/teams/groups.py).
    _GROUPS + "CreateGroup": Access.ADMIN,
    _GROUPS + "UpdateGroup": Access.ADMIN,
    _GROUPS + "DeleteGroup": Access.ADMIN,
    _GROUPS + "GetGroup": Access.USER,
    _GROUPS + "ListGroups": Access.USER,
    _GROUPS + "ListGroupMembers": Access.USER,
    _GROUPS + "AddGroupMember": Access.USER,
    _GROUPS + "RemoveGroupMember": Access.USER,
    _GROUPS + "SetGroupMemberRole": Access.USER,
    _API_KEYS + "CreateApiKey": Access.USER,
    _API_KEYS + "ListApiKeys": Access.USER,
    _API_KEYS + "RevokeApiKey": Access.USER,
    _AGENT + "Query": Access.USER,
    _AGENT + "StreamQuery": Access.USER,
    _AGENT + "AttachRun": Access.USER,
    _AGENT + "CancelRun": Access.USER,
    _AGENT + "ListConversations": Access.USER,
    _AGENT + "GetConversation": Access.USER,
    _AGENT + "SwitchBranch": Access.USER,
    _AGENT + "DeleteConversation": Access.USER,
    _A2A + "SendMessage": Access.USER,
    _A2A + "SendStreamingMessage": Access.USER,
    _A2A + "GetTask": Access.USER,
    _A2A + "ListTasks": Access.USER,
    _A2A + "CancelTask": Access.USER,
    _A2A + "SubscribeToTask": Access.USER,
    _A2A + "CreateTaskPushNotificationConfig": Access.USER,
    _A2A + "GetTaskPushNotificationConfig": Access.USER,
    _A2A + "ListTaskPushNotificationConfigs": Access.USER,
    _A2A + "DeleteTaskPushNotificationConfig": Access.USER,
    _A2A + "GetExtendedAgentCard": Access.USER,
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
    # Collections (issue 23): any user; who may do what with one is decided per collection
    # (services/knowledge/collection_access.py).
    **{
        _COLLECTIONS + method: Access.USER
        for method in (
            "CreateCollection",
            "GetCollection",
            "ListCollections",
            "DeleteCollection",
            "AddCollectionDocument",
            "RemoveCollectionDocument",
            "MoveDocument",
            "GrantCollectionAccess",
            "RevokeCollectionAccess",
            "ListCollectionGrants",
        )
    },
    _AUDIT + "ListAuditEvents": Access.ADMIN,
    _INDEXING + "UpsertPassages": Access.SERVICE,
    _INDEXING + "DeleteGeneration": Access.SERVICE,
    _INDEXING + "DeleteDocumentPassages": Access.SERVICE,
    _INDEXING + "DeleteOwnerPassages": Access.SERVICE,
    _INDEXING + "EmbedTexts": Access.SERVICE,
}


class KeyUse(enum.Enum):
    """What an API key may do with a method (an access token may do anything its role may)."""

    READ = "read"  # changes nothing: every key, read-only ones too
    WRITE = "write"  # changes something: keys that are not read-only
    TOKEN_ONLY = "token_only"  # manages credentials: never with a key


# The methods that change nothing, the only ones a read-only API key may call. A method
# not listed is a write: forgetting one refuses read-only keys, never lets them write.
READ_ONLY_RPCS = frozenset(
    {
        _USERS + "GetCurrentUser",
        _USERS + "ListUsers",
        _USERS + "GetUser",
        _USERS + "ExportCurrentUser",
        _API_KEYS + "ListApiKeys",
        _GROUPS + "GetGroup",
        _GROUPS + "ListGroups",
        _GROUPS + "ListGroupMembers",
        _AGENT + "AttachRun",
        _AGENT + "ListConversations",
        _AGENT + "GetConversation",
        _A2A + "GetTask",
        _A2A + "ListTasks",
        _A2A + "GetTaskPushNotificationConfig",
        _A2A + "ListTaskPushNotificationConfigs",
        _A2A + "GetExtendedAgentCard",
        _KB + "ListDocuments",
        _KB + "GetDocument",
        _KB + "SearchKnowledgeBase",
        _COLLECTIONS + "GetCollection",
        _COLLECTIONS + "ListCollections",
        _COLLECTIONS + "ListCollectionGrants",
        _FEEDBACK + "ListFeedback",
        _FEEDBACK + "GetFeedbackStats",
        _ANALYTICS + "GetUsage",
        _ANALYTICS + "GetSystemStats",
        _ANALYTICS + "GetUserStats",
        _AUDIT + "ListAuditEvents",
    }
)
# The methods that manage credentials: a key cannot make or revoke keys (a leaked key
# could otherwise outlive its own revocation), change the password or delete its account.
TOKEN_ONLY_RPCS = frozenset(
    {
        _AUTH + "ChangePassword",
        _USERS + "DeleteCurrentUser",  # the password proves a person is at the keyboard
        _API_KEYS + "CreateApiKey",
        _API_KEYS + "RevokeApiKey",
    }
)


def key_use(method: str) -> KeyUse:
    """What an API key may do with a full method name."""
    if method in TOKEN_ONLY_RPCS:
        return KeyUse.TOKEN_ONLY
    return KeyUse.READ if method in READ_ONLY_RPCS else KeyUse.WRITE


def access_for(method: str) -> Access | None:
    """The access level of a full method name (`/pkg.Service/Method`); None: not allowed."""
    service = method.lstrip("/").partition("/")[0]
    if service in PUBLIC_SERVICES:
        return Access.PUBLIC
    return RPC_ACCESS.get(method)
