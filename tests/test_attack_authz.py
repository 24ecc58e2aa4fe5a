"""The BOLA/BFLA matrix, generated from the protos (issue 16; RELIABILITY.md items 23, 24).

Every method of every agentmesh service in gen/ gets a row of ROWS, which says how to build
a request that names user A's real resources. From the descriptors and the access table
(server/access.py RPC_ACCESS) the test derives what must happen to it:

- every method but the public ones: no token → UNAUTHENTICATED (TOKEN_MISSING), a forged
  one → UNAUTHENTICATED;
- ADMIN methods: user B's token → PERMISSION_DENIED (ADMIN_REQUIRED);
- SERVICE methods (IndexingService): B's token and an administrator's → UNAUTHENTICATED
  (only the service credential opens them);
- USER methods with a field naming a resource (`*_id`, `*_ids`, `page_token`): B using A's
  real ids gets NOT_FOUND, exactly what an id that does not exist gets (code and reason: no
  existence oracle, never PERMISSION_DENIED), or, where the row says so, a call that acts on
  B alone or returns nothing of A's;

and, in every case, nothing of A's shows in B's responses and A's account, conversations,
messages, runs, documents and passages are unchanged afterwards. A control call by A
with the same request succeeds, so the refusals are not a malformed request's.

A method in the descriptors without a row (or missing from RPC_ACCESS), or a row that does
not fill one of the method's id fields with A's value, fails: a new RPC or a new id field
cannot ship without its line here.
"""

import enum
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.auth.v1 import api_key_service_pb2 as keys_pb
from agentmesh.auth.v1 import auth_service_pb2 as auth_pb
from agentmesh.auth.v1 import user_pb2
from agentmesh.auth.v1 import user_service_pb2 as users_pb
from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.knowledge.v1 import collection_pb2
from agentmesh.knowledge.v1 import collection_service_pb2 as coll_pb
from agentmesh.knowledge.v1 import collection_service_pb2_grpc as coll_grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from agentmesh.teams.v1 import group_pb2
from agentmesh.teams.v1 import group_service_pb2 as groups_pb
from agentmesh.teams.v1 import group_service_pb2_grpc as groups_grpc
from google.protobuf import field_mask_pb2, text_format
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message

from server.access import RPC_ACCESS, Access
from server.main import Application
from tests.attack import (
    Outcome,
    bearer,
    contract_methods,
    error_info_of,
    id_fields,
    invoke,
    method_path,
    new_request,
    refusal_problem,
    values_at,
)
from tests.harness import PASSWORD, Account, Stubs, new_admin, new_user
from tests.knowledge import ingest, search

METHODS = contract_methods()
BY_PATH = {method_path(m): m for m in METHODS}
SECRET = "The vault combination for project kestrel is 31-7-2207."


@dataclass
class Victim:
    """User A and a resource of every kind, by the values a request names them with."""

    user_id: str
    email: str
    refresh_token: str
    conversation_id: str
    user_message_id: str
    assistant_message_id: str
    run_id: str
    document_id: str
    conversations_page_token: str
    documents_page_token: str
    key_id: str
    keys_page_token: str
    group_id: str  # a group A manages
    groups_page_token: str
    members_page_token: str
    collection_id: str  # A's collection: both documents, a read grant to A's group
    other_collection_id: str  # A's second, empty collection
    collections_page_token: str
    collection_documents_page_token: str
    generation: str = "generation-1"

    def owned(self) -> set[str]:
        """Every value that names something of A's."""
        return {str(getattr(self, f.name)) for f in fields(self) if f.name != "generation"}


def ghost_of(victim: Victim) -> Victim:
    """The same shapes of ids, naming nothing that exists."""
    return replace(
        victim,
        user_id=str(uuid.uuid4()),
        conversation_id=str(uuid.uuid4()),
        user_message_id=str(uuid.uuid4()),
        assistant_message_id=str(uuid.uuid4()),
        run_id=uuid.uuid4().hex,
        document_id=str(uuid.uuid4()),
        key_id=str(uuid.uuid4()),
        group_id=str(uuid.uuid4()),
        collection_id=str(uuid.uuid4()),
        other_collection_id=str(uuid.uuid4()),
    )


class Expect(enum.Enum):
    """What user B gets when a USER method's request names A's resources."""

    NOT_FOUND = "NOT_FOUND, as for an id that does not exist"
    NOTHING_OF_THEIRS = "OK or INVALID_ARGUMENT, with nothing of A's in the answer"
    ACTS_ON_CALLER = "the id is ignored: the call reads or changes B's own account"
    SESSION_SURVIVES = "whatever B gets, A's refresh token still works afterwards"
    NO_IDS = "the request names no resource: only the token checks apply"
    ADMIN_REQUIRED = "PERMISSION_DENIED (ADMIN_REQUIRED), as for an id that does not exist"


@dataclass(frozen=True)
class Row:
    build: Callable[[Victim], Message]
    expect: Expect = Expect.NO_IDS
    # Whether A repeats the call as a control (off where it would destroy A's fixtures).
    control: bool = True
    # More requests of the method, for id fields that cannot go in one request together
    # (an edit or a regenerate): each is attacked, and expected, like `build`.
    also: tuple[Callable[[Victim], Message], ...] = ()
    # Requests of the method with an expectation of their own (a listing or a search narrowed
    # to one of A's collections is NOT_FOUND, where the plain one shows B nothing of A's).
    besides: tuple["Row", ...] = ()

    @property
    def builds(self) -> tuple[Callable[[Victim], Message], ...]:
        return (self.build, *self.also)

    @property
    def variants(self) -> tuple["Row", ...]:
        return (self, *self.besides)


def request(path: str, **values: Any) -> Callable[[Victim], Message]:
    """A row's builder: `values` are constants or functions of the victim."""

    def build(victim: Victim) -> Message:
        resolved = {k: v(victim) if callable(v) else v for k, v in values.items()}
        return new_request(BY_PATH[path], **resolved)

    return build


_AUTH = "/agentmesh.auth.v1.AuthService/"
_USERS = "/agentmesh.auth.v1.UserService/"
_AGENT = "/agentmesh.agent.v1.AgentService/"
_KB = "/agentmesh.knowledge.v1.KnowledgeBaseService/"
_FEEDBACK = "/agentmesh.feedback.v1.FeedbackService/"
_ANALYTICS = "/agentmesh.analytics.v1.AnalyticsService/"
_INDEXING = "/agentmesh.indexing.v1.IndexingService/"
_AUDIT = "/agentmesh.audit.v1.AuditService/"
_API_KEYS = "/agentmesh.auth.v1.ApiKeyService/"
_GROUPS = "/agentmesh.teams.v1.GroupService/"
_COLLECTIONS = "/agentmesh.knowledge.v1.CollectionService/"


def _user_change(
    victim: Victim, role: user_pb2.Role.ValueType = user_pb2.ROLE_USER
) -> dict[str, Any]:
    return {
        "user": user_pb2.User(user_id=victim.user_id, full_name="Mallory", role=role),
        "update_mask": field_mask_pb2.FieldMask(
            paths=["full_name", "role"] if role != user_pb2.ROLE_USER else ["full_name"]
        ),
    }


def _grant(
    victim: Victim, grantee: str, access: collection_pb2.CollectionAccess.ValueType
) -> collection_pb2.CollectionGrant:
    """A grant on A's collection for A's group or A's own account."""
    if grantee == "group":
        return collection_pb2.CollectionGrant(group_id=victim.group_id, access=access)
    return collection_pb2.CollectionGrant(user_id=victim.user_id, access=access)


def _passage() -> list[indexing_pb.IndexedPassage]:
    return [indexing_pb.IndexedPassage(index=0, text="planted", dense=[0.1] * 384)]


# How to build each method's request against A. A new RPC needs a row here.
ROWS: dict[str, Row] = {
    _AUTH + "Register": Row(request(_AUTH + "Register", email="x@example.com", password=PASSWORD)),
    _AUTH + "Login": Row(request(_AUTH + "Login", email=lambda v: v.email, password="wrong")),
    _AUTH + "RefreshToken": Row(request(_AUTH + "RefreshToken", refresh_token="not-a-token")),
    _AUTH + "AcceptInvitation": Row(
        request(_AUTH + "AcceptInvitation", invitation_token="inv_unknown", password=PASSWORD)
    ),
    # B hands in A's refresh token: B may end its own sessions, never A's.
    _AUTH + "Logout": Row(
        request(_AUTH + "Logout", refresh_token=lambda v: v.refresh_token),
        Expect.SESSION_SURVIVES,
        control=False,
    ),
    _AUTH + "ChangePassword": Row(
        request(_AUTH + "ChangePassword", current_password="wrong", new_password="x" * 12),
        control=False,
    ),
    _USERS + "GetCurrentUser": Row(request(_USERS + "GetCurrentUser")),
    _USERS + "UpdateCurrentUser": Row(
        lambda v: new_request(BY_PATH[_USERS + "UpdateCurrentUser"], **_user_change(v)),
        Expect.ACTS_ON_CALLER,
        control=False,
    ),
    _USERS + "ListUsers": Row(request(_USERS + "ListUsers")),
    _USERS + "GetUser": Row(request(_USERS + "GetUser", user_id=lambda v: v.user_id)),
    _USERS + "UpdateUser": Row(
        lambda v: new_request(
            BY_PATH[_USERS + "UpdateUser"], **_user_change(v, user_pb2.ROLE_ADMIN)
        )
    ),
    _USERS + "DeleteUser": Row(request(_USERS + "DeleteUser", user_id=lambda v: v.user_id)),
    _USERS + "CreateUser": Row(
        request(
            _USERS + "CreateUser",
            email="created-by-b@example.com",
            role=user_pb2.ROLE_ADMIN,
            kind=user_pb2.USER_KIND_SERVICE,
        )
    ),
    _USERS + "DisableUser": Row(request(_USERS + "DisableUser", user_id=lambda v: v.user_id)),
    _USERS + "EnableUser": Row(request(_USERS + "EnableUser", user_id=lambda v: v.user_id)),
    # B's export holds B's data only: the leak check finds none of A's ids or text in it.
    _USERS + "ExportCurrentUser": Row(request(_USERS + "ExportCurrentUser")),
    # Only ever the caller's own account; a wrong password keeps B's for the next rows.
    _USERS + "DeleteCurrentUser": Row(
        request(_USERS + "DeleteCurrentUser", current_password="wrong"), control=False
    ),
    # Another account's keys are an administrator's business (service accounts only).
    _API_KEYS + "CreateApiKey": Row(
        request(_API_KEYS + "CreateApiKey", name="intruder's", user_id=lambda v: v.user_id),
        Expect.ADMIN_REQUIRED,
    ),
    _API_KEYS + "ListApiKeys": Row(
        request(
            _API_KEYS + "ListApiKeys",
            page_size=1,
            page_token=lambda v: v.keys_page_token,
            user_id=lambda v: v.user_id,
        ),
        Expect.ADMIN_REQUIRED,
    ),
    _API_KEYS + "RevokeApiKey": Row(
        request(_API_KEYS + "RevokeApiKey", api_key_id=lambda v: v.key_id),
        Expect.NOT_FOUND,
        control=False,
    ),
    # Groups: only administrators make, rename and delete them; a group B does not belong
    # to is NOT_FOUND, as one that does not exist.
    _GROUPS + "CreateGroup": Row(request(_GROUPS + "CreateGroup", name="B's group")),
    _GROUPS + "UpdateGroup": Row(
        request(
            _GROUPS + "UpdateGroup",
            group=lambda v: group_pb2.Group(group_id=v.group_id, name="Taken over"),
        )
    ),
    _GROUPS + "DeleteGroup": Row(request(_GROUPS + "DeleteGroup", group_id=lambda v: v.group_id)),
    _GROUPS + "GetGroup": Row(
        request(_GROUPS + "GetGroup", group_id=lambda v: v.group_id), Expect.NOT_FOUND
    ),
    _GROUPS + "ListGroups": Row(
        request(_GROUPS + "ListGroups", page_size=1, page_token=lambda v: v.groups_page_token),
        Expect.NOTHING_OF_THEIRS,
    ),
    _GROUPS + "ListGroupMembers": Row(
        request(
            _GROUPS + "ListGroupMembers",
            group_id=lambda v: v.group_id,
            page_size=1,
            page_token=lambda v: v.members_page_token,
        ),
        Expect.NOT_FOUND,
    ),
    # B adds A (already a member: A's control would be ALREADY_EXISTS), removes A, or makes
    # A a manager: each on a group B cannot see.
    _GROUPS + "AddGroupMember": Row(
        request(
            _GROUPS + "AddGroupMember",
            group_id=lambda v: v.group_id,
            user_id=lambda v: v.user_id,
            role=group_pb2.GROUP_ROLE_MANAGER,
        ),
        Expect.NOT_FOUND,
        control=False,
    ),
    _GROUPS + "RemoveGroupMember": Row(
        request(
            _GROUPS + "RemoveGroupMember",
            group_id=lambda v: v.group_id,
            user_id=lambda v: v.user_id,
        ),
        Expect.NOT_FOUND,
        control=False,
    ),
    _GROUPS + "SetGroupMemberRole": Row(
        request(
            _GROUPS + "SetGroupMemberRole",
            group_id=lambda v: v.group_id,
            user_id=lambda v: v.user_id,
            role=group_pb2.GROUP_ROLE_MEMBER,
        ),
        Expect.NOT_FOUND,
        control=False,  # A would step down
    ),
    _AGENT + "Query": Row(
        request(
            _AGENT + "Query",
            query="What did I say?",
            conversation_id=lambda v: v.conversation_id,
            edit_message_id=lambda v: v.user_message_id,
        ),
        Expect.NOT_FOUND,
        also=(
            request(
                _AGENT + "Query",
                conversation_id=lambda v: v.conversation_id,
                regenerate_message_id=lambda v: v.assistant_message_id,
            ),
        ),
    ),
    _AGENT + "StreamQuery": Row(
        request(
            _AGENT + "StreamQuery",
            query="What did I say?",
            conversation_id=lambda v: v.conversation_id,
            edit_message_id=lambda v: v.user_message_id,
        ),
        Expect.NOT_FOUND,
        also=(
            request(
                _AGENT + "StreamQuery",
                conversation_id=lambda v: v.conversation_id,
                regenerate_message_id=lambda v: v.assistant_message_id,
            ),
        ),
    ),
    _AGENT + "AttachRun": Row(
        request(_AGENT + "AttachRun", run_id=lambda v: v.run_id), Expect.NOT_FOUND
    ),
    _AGENT + "CancelRun": Row(
        request(_AGENT + "CancelRun", run_id=lambda v: v.run_id), Expect.NOT_FOUND
    ),
    _AGENT + "ListConversations": Row(
        request(
            _AGENT + "ListConversations",
            page_size=1,
            page_token=lambda v: v.conversations_page_token,
        ),
        Expect.NOTHING_OF_THEIRS,
    ),
    _AGENT + "GetConversation": Row(
        request(_AGENT + "GetConversation", conversation_id=lambda v: v.conversation_id),
        Expect.NOT_FOUND,
    ),
    _AGENT + "SwitchBranch": Row(
        request(
            _AGENT + "SwitchBranch",
            conversation_id=lambda v: v.conversation_id,
            message_id=lambda v: v.user_message_id,
        ),
        Expect.NOT_FOUND,
    ),
    _AGENT + "DeleteConversation": Row(
        request(_AGENT + "DeleteConversation", conversation_id=lambda v: v.conversation_id),
        Expect.NOT_FOUND,
        control=False,
    ),
    _KB + "UploadDocument": Row(
        request(
            _KB + "UploadDocument",
            filename="replacement.txt",
            content=b"Overwritten by someone else.",
            document_id=lambda v: v.document_id,
        ),
        Expect.NOT_FOUND,
        control=False,
        # B uploads into A's collection.
        besides=(
            Row(
                request(
                    _KB + "UploadDocument",
                    filename="planted.txt",
                    content=b"Planted in someone else's collection.",
                    collection_ids=lambda v: [v.collection_id],
                ),
                Expect.NOT_FOUND,
                control=False,
            ),
        ),
    ),
    _KB + "ListDocuments": Row(
        request(_KB + "ListDocuments", page_size=1, page_token=lambda v: v.documents_page_token),
        Expect.NOTHING_OF_THEIRS,
        besides=(
            Row(
                request(
                    _KB + "ListDocuments",
                    collection_id=lambda v: v.collection_id,
                    page_size=1,
                    page_token=lambda v: v.collection_documents_page_token,
                ),
                Expect.NOT_FOUND,
            ),
        ),
    ),
    _KB + "GetDocument": Row(
        request(_KB + "GetDocument", document_id=lambda v: v.document_id), Expect.NOT_FOUND
    ),
    _KB + "DeleteDocument": Row(
        request(_KB + "DeleteDocument", document_id=lambda v: v.document_id),
        Expect.NOT_FOUND,
        control=False,
    ),
    _KB + "SearchKnowledgeBase": Row(
        request(
            _KB + "SearchKnowledgeBase",
            query=SECRET,
            top_k=50,
            document_ids=lambda v: [v.document_id],
        ),
        Expect.NOTHING_OF_THEIRS,
        besides=(
            Row(
                request(
                    _KB + "SearchKnowledgeBase",
                    query=SECRET,
                    top_k=50,
                    collection_ids=lambda v: [v.collection_id],
                ),
                Expect.NOT_FOUND,
            ),
        ),
    ),
    # Collections: one B may not read is NOT_FOUND for every RPC, as one that does not exist.
    _COLLECTIONS + "CreateCollection": Row(
        request(
            _COLLECTIONS + "CreateCollection",
            name="B's collection in A's group",
            owner_group_id=lambda v: v.group_id,
        ),
        Expect.NOT_FOUND,
    ),
    _COLLECTIONS + "GetCollection": Row(
        request(_COLLECTIONS + "GetCollection", collection_id=lambda v: v.collection_id),
        Expect.NOT_FOUND,
    ),
    _COLLECTIONS + "ListCollections": Row(
        request(
            _COLLECTIONS + "ListCollections",
            page_size=1,
            page_token=lambda v: v.collections_page_token,
        ),
        Expect.NOTHING_OF_THEIRS,
    ),
    _COLLECTIONS + "DeleteCollection": Row(
        request(_COLLECTIONS + "DeleteCollection", collection_id=lambda v: v.collection_id),
        Expect.NOT_FOUND,
        control=False,
    ),
    # B adds A's document to A's collection (it is there already: A's control changes
    # nothing), removes it, or moves it to A's other collection.
    _COLLECTIONS + "AddCollectionDocument": Row(
        request(
            _COLLECTIONS + "AddCollectionDocument",
            collection_id=lambda v: v.collection_id,
            document_id=lambda v: v.document_id,
        ),
        Expect.NOT_FOUND,
    ),
    _COLLECTIONS + "RemoveCollectionDocument": Row(
        request(
            _COLLECTIONS + "RemoveCollectionDocument",
            collection_id=lambda v: v.collection_id,
            document_id=lambda v: v.document_id,
        ),
        Expect.NOT_FOUND,
        control=False,
    ),
    _COLLECTIONS + "MoveDocument": Row(
        request(
            _COLLECTIONS + "MoveDocument",
            document_id=lambda v: v.document_id,
            from_collection_id=lambda v: v.collection_id,
            to_collection_id=lambda v: v.other_collection_id,
        ),
        Expect.NOT_FOUND,
        control=False,
    ),
    # B gives A's group write access (A's control: the read grant it has, again), or A
    # themselves read access (no control: a grant to the owner is not A's to expect).
    _COLLECTIONS + "GrantCollectionAccess": Row(
        request(
            _COLLECTIONS + "GrantCollectionAccess",
            collection_id=lambda v: v.collection_id,
            grant=lambda v: _grant(v, "group", collection_pb2.COLLECTION_ACCESS_WRITE),
        ),
        Expect.NOT_FOUND,
        control=False,
        besides=(
            Row(
                request(
                    _COLLECTIONS + "GrantCollectionAccess",
                    collection_id=lambda v: v.collection_id,
                    grant=lambda v: _grant(v, "user", collection_pb2.COLLECTION_ACCESS_READ),
                ),
                Expect.NOT_FOUND,
                control=False,
            ),
            Row(
                request(
                    _COLLECTIONS + "GrantCollectionAccess",
                    collection_id=lambda v: v.collection_id,
                    grant=lambda v: _grant(v, "group", collection_pb2.COLLECTION_ACCESS_READ),
                ),
                Expect.NOT_FOUND,
            ),
        ),
    ),
    _COLLECTIONS + "RevokeCollectionAccess": Row(
        request(
            _COLLECTIONS + "RevokeCollectionAccess",
            collection_id=lambda v: v.collection_id,
            grant=lambda v: _grant(v, "group", collection_pb2.COLLECTION_ACCESS_READ),
        ),
        Expect.NOT_FOUND,
        control=False,
        also=(
            request(
                _COLLECTIONS + "RevokeCollectionAccess",
                collection_id=lambda v: v.collection_id,
                grant=lambda v: _grant(v, "user", collection_pb2.COLLECTION_ACCESS_READ),
            ),
        ),
    ),
    _COLLECTIONS + "ListCollectionGrants": Row(
        request(_COLLECTIONS + "ListCollectionGrants", collection_id=lambda v: v.collection_id),
        Expect.NOT_FOUND,
    ),
    _FEEDBACK + "SubmitFeedback": Row(
        request(
            _FEEDBACK + "SubmitFeedback",
            message_id=lambda v: v.assistant_message_id,
            rating=2,  # RATING_THUMBS_DOWN
            comment="sabotage",
        ),
        Expect.NOT_FOUND,
        control=False,  # A's own feedback would change what the snapshot compares
    ),
    _FEEDBACK + "ListFeedback": Row(
        request(
            _FEEDBACK + "ListFeedback",
            user_id=lambda v: v.user_id,
            conversation_id=lambda v: v.conversation_id,
        )
    ),
    _FEEDBACK + "GetFeedbackStats": Row(request(_FEEDBACK + "GetFeedbackStats")),
    _ANALYTICS + "GetUsage": Row(request(_ANALYTICS + "GetUsage")),
    _ANALYTICS + "GetSystemStats": Row(request(_ANALYTICS + "GetSystemStats")),
    _ANALYTICS + "GetUserStats": Row(
        request(_ANALYTICS + "GetUserStats", user_id=lambda v: v.user_id)
    ),
    _AUDIT + "ListAuditEvents": Row(
        request(
            _AUDIT + "ListAuditEvents",
            actor_id=lambda v: v.user_id,
            target_id=lambda v: v.user_id,
        )
    ),
    _INDEXING + "UpsertPassages": Row(
        request(
            _INDEXING + "UpsertPassages",
            document_id=lambda v: v.document_id,
            owner_id=lambda v: v.user_id,
            generation=lambda v: v.generation,
            passages=lambda v: _passage(),
            collection_ids=lambda v: [v.collection_id],
        )
    ),
    _INDEXING + "DeleteGeneration": Row(
        request(
            _INDEXING + "DeleteGeneration",
            document_id=lambda v: v.document_id,
            generation=lambda v: v.generation,
        )
    ),
    _INDEXING + "DeleteDocumentPassages": Row(
        request(_INDEXING + "DeleteDocumentPassages", document_id=lambda v: v.document_id)
    ),
    _INDEXING + "DeleteOwnerPassages": Row(
        request(_INDEXING + "DeleteOwnerPassages", owner_id=lambda v: v.user_id)
    ),
    _INDEXING + "EmbedTexts": Row(
        request(_INDEXING + "EmbedTexts", texts=["hello"], kind=indexing_pb.EMBEDDING_KIND_QUERY)
    ),
}


def _required_ids(method: MethodDescriptor, access: Access) -> list[str]:
    """The id fields a row must fill with A's values: all of them where users may call the
    method; where they may not, the cursor is left out (only a caller who may list has one)."""
    found = id_fields(method.input_type)
    return found if access is Access.USER else [f for f in found if f != "page_token"]


DUMMY = Victim(
    user_id=str(uuid.uuid4()),
    email="a@example.com",
    refresh_token="refresh",
    conversation_id=str(uuid.uuid4()),
    user_message_id=str(uuid.uuid4()),
    assistant_message_id=str(uuid.uuid4()),
    run_id=uuid.uuid4().hex,
    document_id=str(uuid.uuid4()),
    conversations_page_token="conversations-cursor",
    documents_page_token="documents-cursor",
    key_id=str(uuid.uuid4()),
    keys_page_token="keys-cursor",
    group_id=str(uuid.uuid4()),
    groups_page_token="groups-cursor",
    members_page_token="members-cursor",
    collection_id=str(uuid.uuid4()),
    other_collection_id=str(uuid.uuid4()),
    collections_page_token="collections-cursor",
    collection_documents_page_token="collection-documents-cursor",
)


def test_every_rpc_has_a_row_an_access_level_and_names_the_victim() -> None:
    paths = {method_path(m) for m in METHODS}
    assert not paths - set(ROWS), f"RPCs without a row in ROWS: {sorted(paths - set(ROWS))}"
    assert not set(ROWS) - paths, f"rows for RPCs that do not exist: {sorted(set(ROWS) - paths)}"
    assert not paths - set(RPC_ACCESS), f"not in RPC_ACCESS: {sorted(paths - set(RPC_ACCESS))}"
    for path in sorted(paths):
        method, row, access = BY_PATH[path], ROWS[path], RPC_ACCESS[path]
        built = [build(DUMMY) for variant in row.variants for build in variant.builds]
        assert all(b.DESCRIPTOR is method.input_type for b in built), path
        for field_path in _required_ids(method, access):
            values = [v for b in built for v in values_at(b, field_path)]
            assert values, f"{path}: the row leaves {field_path} empty; name A's resource"
            assert set(values) <= DUMMY.owned(), f"{path}: {field_path}={values} is not A's"
        if access is Access.USER:
            names = id_fields(method.input_type)
            if names and row.expect is Expect.NO_IDS:
                pytest.fail(f"{path} names {names}: say what B must get (Expect)")
        elif row.expect is not Expect.NO_IDS:
            pytest.fail(f"{path} is {access.name}: its expectation comes from the access table")


# --- A, B and an administrator ---------------------------------------------------------


@dataclass
class Cast:
    app: Application
    stubs: Stubs
    victim: Victim
    owner: Account
    intruder: Account
    admin: Account


async def _query(stubs: Stubs, account: Account, text: str, cid: str = "") -> Any:
    return await stubs.agent.Query(
        agent_pb.QueryRequest(query=text, conversation_id=cid), metadata=account.metadata
    )


@pytest.fixture(scope="module")
async def cast(app: Application, stubs: Stubs) -> AsyncIterator[Cast]:
    owner = await new_user(stubs, "victim")
    admin = await new_admin(app, stubs)
    first = await _query(stubs, owner, "Remember that my locker code is 4417.")
    await _query(stubs, owner, "And what about the weather?")
    conversations = await stubs.agent.ListConversations(
        agent_pb.ListConversationsRequest(page_size=1), metadata=owner.metadata
    )
    document = await ingest(stubs, owner, "kestrel.txt", f"{SECRET}\n\nKestrel notes.".encode())
    second = await ingest(stubs, owner, "second.txt", b"Another of A's documents, about basalt.")
    documents = await stubs.kb.ListDocuments(
        kb.ListDocumentsRequest(page_size=1), metadata=owner.metadata
    )
    key = await _new_key(stubs, owner, "first")
    await _new_key(stubs, owner, "second")
    keys = await stubs.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(page_size=1), metadata=owner.metadata
    )
    assert conversations.next_page_token and documents.next_page_token
    assert keys.next_page_token
    group_id, groups_token, members_token = await _groups_of(stubs, admin, owner)
    collection_ids, collection_tokens = await _collections_of(
        stubs, owner, [document.document_id, second.document_id], group_id
    )
    victim = Victim(
        user_id=owner.user_id,
        email=owner.email,
        refresh_token=owner.refresh_token,
        conversation_id=first.conversation_id,
        user_message_id=first.user_message_id,
        assistant_message_id=first.message.message_id,
        run_id=first.run_id,
        document_id=document.document_id,
        conversations_page_token=conversations.next_page_token,
        documents_page_token=documents.next_page_token,
        key_id=key.api_key.api_key_id,
        keys_page_token=keys.next_page_token,
        group_id=group_id,
        groups_page_token=groups_token,
        members_page_token=members_token,
        collection_id=collection_ids[0],
        other_collection_id=collection_ids[1],
        collections_page_token=collection_tokens[0],
        collection_documents_page_token=collection_tokens[1],
    )
    intruder = await new_user(stubs, "intruder")
    yield Cast(app, stubs, victim, owner, intruder, admin)


async def _groups_of(stubs: Stubs, admin: Account, owner: Account) -> tuple[str, str, str]:
    """A group A manages with another member, and a second one A belongs to: A's group id
    and A's cursors into both lists."""
    groups = groups_grpc.GroupServiceStub(stubs.channel)
    made = []
    for name in ("kestrel team", "basalt team"):
        created = await groups.CreateGroup(
            groups_pb.CreateGroupRequest(name=f"{name} {uuid.uuid4().hex[:8]}"),
            metadata=admin.metadata,
        )
        made.append(created.group.group_id)
    managed, other = made
    colleague = await new_user(stubs, "colleague")
    for group_id, user_id, role in (
        (managed, owner.user_id, group_pb2.GROUP_ROLE_MANAGER),
        (managed, colleague.user_id, group_pb2.GROUP_ROLE_MEMBER),
        (other, owner.user_id, group_pb2.GROUP_ROLE_MEMBER),
    ):
        await groups.AddGroupMember(
            groups_pb.AddGroupMemberRequest(group_id=group_id, user_id=user_id, role=role),
            metadata=admin.metadata,
        )
    listed = await groups.ListGroups(
        groups_pb.ListGroupsRequest(page_size=1), metadata=owner.metadata
    )
    members = await groups.ListGroupMembers(
        groups_pb.ListGroupMembersRequest(group_id=managed, page_size=1), metadata=owner.metadata
    )
    assert listed.next_page_token and members.next_page_token
    return managed, listed.next_page_token, members.next_page_token


async def _collections_of(
    stubs: Stubs, owner: Account, document_ids: list[str], group_id: str
) -> tuple[tuple[str, str], tuple[str, str]]:
    """A's two collections, the first holding A's documents and read by A's group, and A's
    cursors into A's collections and into the first one's documents."""
    collections = coll_grpc.CollectionServiceStub(stubs.channel)
    made = []
    for name in ("kestrel files", "basalt files"):
        created = await collections.CreateCollection(
            coll_pb.CreateCollectionRequest(name=name), metadata=owner.metadata
        )
        made.append(created.collection.collection_id)
    holding, empty = made
    for document_id in document_ids:
        await collections.AddCollectionDocument(
            coll_pb.AddCollectionDocumentRequest(collection_id=holding, document_id=document_id),
            metadata=owner.metadata,
        )
    await collections.GrantCollectionAccess(
        coll_pb.GrantCollectionAccessRequest(
            collection_id=holding,
            grant=collection_pb2.CollectionGrant(
                group_id=group_id, access=collection_pb2.COLLECTION_ACCESS_READ
            ),
        ),
        metadata=owner.metadata,
    )
    listed = await collections.ListCollections(
        coll_pb.ListCollectionsRequest(page_size=1), metadata=owner.metadata
    )
    held = await stubs.kb.ListDocuments(
        kb.ListDocumentsRequest(collection_id=holding, page_size=1), metadata=owner.metadata
    )
    assert listed.next_page_token and held.next_page_token
    return (holding, empty), (listed.next_page_token, held.next_page_token)


async def _new_key(stubs: Stubs, account: Account, name: str) -> Any:
    return await stubs.keys.CreateApiKey(
        keys_pb.CreateApiKeyRequest(name=name), metadata=account.metadata
    )


async def state_of(cast: Cast) -> dict[str, Any]:
    """Everything of A's an attack could change: profile, conversations and their messages
    (with feedback), documents, searchable passages, the run's replay."""
    stubs, owner, victim = cast.stubs, cast.owner, cast.victim
    me = (
        await stubs.users.GetCurrentUser(users_pb.GetCurrentUserRequest(), metadata=owner.metadata)
    ).user
    listed = await stubs.agent.ListConversations(
        agent_pb.ListConversationsRequest(page_size=100), metadata=owner.metadata
    )
    conversations = {}
    for conversation in listed.conversations:
        detail = await stubs.agent.GetConversation(
            agent_pb.GetConversationRequest(conversation_id=conversation.conversation_id),
            metadata=owner.metadata,
        )
        conversations[conversation.conversation_id] = (
            detail.conversation.active_message_id,
            [(m.message_id, m.role, m.content, m.HasField("feedback")) for m in detail.messages],
        )
    documents = await stubs.kb.ListDocuments(
        kb.ListDocumentsRequest(page_size=100), metadata=owner.metadata
    )
    hits = await search(stubs, owner, SECRET, top_k=50, document_ids=[victim.document_id])
    replay = await invoke(
        stubs.channel,
        BY_PATH[_AGENT + "AttachRun"],
        agent_pb.AttachRunRequest(run_id=victim.run_id),
        owner.metadata,
    )
    keys = await stubs.keys.ListApiKeys(
        keys_pb.ListApiKeysRequest(page_size=200), metadata=owner.metadata
    )
    groups = groups_grpc.GroupServiceStub(stubs.channel)
    my_groups = await groups.ListGroups(
        groups_pb.ListGroupsRequest(page_size=200), metadata=owner.metadata
    )
    members = await groups.ListGroupMembers(
        groups_pb.ListGroupMembersRequest(group_id=victim.group_id, page_size=200),
        metadata=owner.metadata,
    )
    collections = coll_grpc.CollectionServiceStub(stubs.channel)
    my_collections = await collections.ListCollections(
        coll_pb.ListCollectionsRequest(page_size=200), metadata=owner.metadata
    )
    grants = await collections.ListCollectionGrants(
        coll_pb.ListCollectionGrantsRequest(collection_id=victim.collection_id),
        metadata=owner.metadata,
    )
    held = await stubs.kb.ListDocuments(
        kb.ListDocumentsRequest(collection_id=victim.collection_id, page_size=100),
        metadata=owner.metadata,
    )
    return {
        "user": (me.user_id, me.email, me.full_name, me.role),
        "keys": sorted((k.api_key_id, k.name, k.HasField("revoked_at")) for k in keys.api_keys),
        "conversations": conversations,
        "documents": sorted(
            (
                d.document_id,
                d.content_sha256,
                d.status,
                d.chunk_count,
                d.shared,
                d.title,
                sorted(d.collection_ids),
            )
            for d in documents.documents
        ),
        "passages": sorted((h.chunk_id, h.text) for h in hits),
        "run": (replay.code, [r.WhichOneof("event") for r in replay.responses]),
        "groups": sorted(
            (g.group_id, g.name, g.description, g.member_count, g.caller_role)
            for g in my_groups.groups
        ),
        "members": sorted((m.user_id, m.role) for m in members.members),
        "collections": sorted(
            (c.collection_id, c.name, c.owner_group_id, c.document_count, c.caller_access)
            for c in my_collections.collections
        ),
        "grants": sorted((g.user_id, g.group_id, g.everyone, g.access) for g in grants.grants),
        "collection documents": sorted(
            (d.document_id, tuple(sorted(d.collection_ids))) for d in held.documents
        ),
    }


def _leaks(cast: Cast, sent: Message, outcome: Outcome) -> set[str]:
    """A's values in B's answer that B did not send (ids, email, the secret's text)."""
    descriptor = typing.cast(Descriptor, sent.DESCRIPTOR)
    given = {v for f in id_fields(descriptor) for v in values_at(sent, f)}
    secrets = (cast.victim.owned() | {SECRET, "kestrel", "locker code"}) - given
    shown = "\n".join(text_format.MessageToString(r) for r in outcome.responses)
    return {value for value in secrets if value and value in shown}


async def _call(
    cast: Cast, path: str, request: Message, metadata: tuple[tuple[str, str], ...] = ()
) -> Outcome:
    outcome = await invoke(cast.stubs.channel, BY_PATH[path], request, metadata)
    assert (problem := refusal_problem(outcome)) is None, problem
    return outcome


def _expect(outcome: Outcome, code: grpc.StatusCode, reason: str | None = None) -> None:
    assert outcome.code == code, f"{outcome}; expected {code.name}"
    if reason is not None:
        info = error_info_of(outcome)
        assert info is not None and info.reason == reason, f"{outcome}: reason {info}"


# --- the matrix --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(BY_PATH))
async def test_no_one_reaches_another_users_resources(cast: Cast, path: str) -> None:
    row, access = ROWS.get(path), RPC_ACCESS.get(path)
    assert row is not None, f"{path} has no row in ROWS"
    assert access is not None, f"{path} is not in RPC_ACCESS"
    for variant in row.variants:
        for build in variant.builds:
            await _attack(cast, path, variant, access, build)


async def _attack(
    cast: Cast, path: str, row: Row, access: Access, build: Callable[[Victim], Message]
) -> None:
    request = build(cast.victim)
    if access is Access.PUBLIC:
        assert not id_fields(BY_PATH[path].input_type), f"public {path} names resources"
        return
    before = await state_of(cast)

    _expect(await _call(cast, path, request), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING")
    forged = await _call(cast, path, request, bearer("eyJhbGciOiJub25lIn0.e30."))
    _expect(forged, grpc.StatusCode.UNAUTHENTICATED)

    intruder = cast.intruder.metadata
    if access is Access.ADMIN:
        outcome = await _call(cast, path, request, intruder)
        _expect(outcome, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    elif access is Access.SERVICE:
        for metadata in (intruder, cast.admin.metadata):
            _expect(await _call(cast, path, request, metadata), grpc.StatusCode.UNAUTHENTICATED)
    else:
        outcome = await _call(cast, path, request, intruder)
        assert not (leaked := _leaks(cast, request, outcome)), f"{outcome} showed {leaked}"
        await _check_user_row(cast, path, row, build, outcome)

    assert await state_of(cast) == before, f"{path} by user B changed A's resources"
    if access is Access.USER and row.control and row.expect is not Expect.NO_IDS:
        control = await _call(cast, path, request, cast.owner.metadata)
        assert control.ok, f"A's own call failed, so B's refusal proves nothing: {control}"


async def _check_user_row(
    cast: Cast, path: str, row: Row, build: Callable[[Victim], Message], outcome: Outcome
) -> None:
    if row.expect is Expect.NOT_FOUND:
        _expect(outcome, grpc.StatusCode.NOT_FOUND)
        events = [r.WhichOneof("event") for r in outcome.responses]
        assert set(events) <= {"error"}, f"{path}: B's stream got {events} before NOT_FOUND"
        ghost = await _call(cast, path, build(ghost_of(cast.victim)), cast.intruder.metadata)
        ours, theirs = error_info_of(outcome), error_info_of(ghost)
        assert (outcome.code, ours and ours.reason) == (ghost.code, theirs and theirs.reason), (
            f"{path}: A's id gives {outcome}, a missing id {ghost}: existence shows"
        )
    elif row.expect is Expect.ADMIN_REQUIRED:
        _expect(outcome, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
        ghost = await _call(cast, path, build(ghost_of(cast.victim)), cast.intruder.metadata)
        _expect(ghost, grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
    elif row.expect is Expect.NOTHING_OF_THEIRS:
        assert outcome.code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}, outcome
        if outcome.ok:
            listed = outcome.responses[0]
            items = [
                *getattr(listed, "results", []),
                *getattr(listed, "documents", []),
                *getattr(listed, "conversations", []),
                *getattr(listed, "groups", []),
                *getattr(listed, "collections", []),
            ]
            mine = [
                i
                for i in items
                if cast.victim.user_id
                in (getattr(i, "owner_id", ""), getattr(i, "owner_user_id", ""))
            ]
            assert not mine, f"{path}: B got A's {mine}"
            for item in items:
                for name in ("document_id", "conversation_id", "group_id", "collection_id"):
                    assert getattr(item, name, "") not in cast.victim.owned(), (path, item)
    elif row.expect is Expect.ACTS_ON_CALLER:
        assert outcome.ok, outcome
        (response,) = outcome.responses
        assert response.user.user_id == cast.intruder.user_id, f"{path} acted on {response}"
    elif row.expect is Expect.SESSION_SURVIVES:
        refreshed = await cast.stubs.auth.RefreshToken(
            auth_pb.RefreshTokenRequest(refresh_token=cast.victim.refresh_token)
        )
        cast.victim.refresh_token = refreshed.refresh_token
        cast.owner.refresh_token = refreshed.refresh_token


async def test_the_victims_documents_are_ready(cast: Cast) -> None:
    """The fixture itself: A's document is searchable by A (the search row's control)."""
    document = await cast.stubs.kb.GetDocument(
        kb.GetDocumentRequest(document_id=cast.victim.document_id), metadata=cast.owner.metadata
    )
    assert document.document.status == kb_pb.DOCUMENT_STATUS_READY
    assert await search(cast.stubs, cast.owner, SECRET, document_ids=[cast.victim.document_id])
