"""Collections (issue 23, items 2-4) against the real server, over gRPC and REST through
Envoy: documents shared through collections with read and write grants to accounts, groups
and everyone, enforced by the vector search itself. A collection the caller may not read is
NOT_FOUND (as one that does not exist); a change their access does not allow is
PERMISSION_DENIED; a passage they may not read never counts towards a search's results."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import json
import uuid
from typing import Any

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.knowledge.v1 import collection_pb2
from agentmesh.knowledge.v1 import collection_service_pb2 as coll_pb
from agentmesh.knowledge.v1 import collection_service_pb2_grpc as coll_grpc
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from agentmesh.teams.v1 import group_pb2
from agentmesh.teams.v1 import group_service_pb2 as groups_pb
from agentmesh.teams.v1 import group_service_pb2_grpc as groups_grpc

from server.main import Application
from tests.agent import of_kind, stream
from tests.harness import Account, Stubs, new_admin, new_user, unique_email
from tests.knowledge import get_document, ingest, search, upload, wait_settled
from tests.rpc_errors import error_info, field_violations

READ = collection_pb2.COLLECTION_ACCESS_READ
WRITE = collection_pb2.COLLECTION_ACCESS_WRITE
MANAGE = collection_pb2.COLLECTION_ACCESS_MANAGE
EVERYONE = "00000000-0000-4000-8000-00000000e0e1"  # the built-in collection every user reads
GHOST = "00000000-0000-4000-8000-000000000000"  # a well-formed id naming nothing
MODES = (kb.SEARCH_MODE_HYBRID, kb.SEARCH_MODE_DENSE, kb.SEARCH_MODE_SPARSE)

KETTLE = b"Descale the copper kettle with white vinegar monthly."
LIGHTHOUSE = (
    b"Skerry lighthouse log. The quartz lantern of the Skerry lighthouse has been powered by "
    b"tidal turbines since 1994; the keeper checks the turbine brushes every spring tide."
)


@pytest.fixture(scope="module")
def collections(stubs: Stubs) -> coll_grpc.CollectionServiceAsyncStub:
    return coll_grpc.CollectionServiceStub(stubs.channel)


@pytest.fixture(scope="module")
def groups(stubs: Stubs) -> groups_grpc.GroupServiceAsyncStub:
    return groups_grpc.GroupServiceStub(stubs.channel)


# --- helpers -------------------------------------------------------------------------------


async def refused(
    call: Any, code: grpc.StatusCode, reason: str | None = None
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    if reason is not None:
        assert error_info(caught.value).reason == reason, error_info(caught.value)
    return caught.value


async def create(
    collections: coll_grpc.CollectionServiceAsyncStub,
    by: Account,
    name: str = "",
    owner_group_id: str = "",
) -> collection_pb2.Collection:
    response = await collections.CreateCollection(
        coll_pb.CreateCollectionRequest(
            name=name or unique_email("collection"),
            description="Shared notes.",
            owner_group_id=owner_group_id,
        ),
        metadata=by.metadata,
    )
    return response.collection


def grant_to(
    access: collection_pb2.CollectionAccess.ValueType = READ,
    *,
    user: Account | None = None,
    group_id: str = "",
    everyone: bool = False,
) -> collection_pb2.CollectionGrant:
    if user is not None:
        return collection_pb2.CollectionGrant(user_id=user.user_id, access=access)
    if group_id:
        return collection_pb2.CollectionGrant(group_id=group_id, access=access)
    return collection_pb2.CollectionGrant(everyone=everyone, access=access)


async def grant(
    collections: coll_grpc.CollectionServiceAsyncStub,
    by: Account,
    collection_id: str,
    what: collection_pb2.CollectionGrant,
) -> collection_pb2.CollectionGrant:
    response = await collections.GrantCollectionAccess(
        coll_pb.GrantCollectionAccessRequest(collection_id=collection_id, grant=what),
        metadata=by.metadata,
    )
    return response.grant


async def revoke(
    collections: coll_grpc.CollectionServiceAsyncStub,
    by: Account,
    collection_id: str,
    what: collection_pb2.CollectionGrant,
) -> None:
    await collections.RevokeCollectionAccess(
        coll_pb.RevokeCollectionAccessRequest(collection_id=collection_id, grant=what),
        metadata=by.metadata,
    )


async def get_collection(
    collections: coll_grpc.CollectionServiceAsyncStub, by: Account, collection_id: str
) -> collection_pb2.Collection:
    response = await collections.GetCollection(
        coll_pb.GetCollectionRequest(collection_id=collection_id), metadata=by.metadata
    )
    return response.collection


async def new_group(
    groups: groups_grpc.GroupServiceAsyncStub,
    admin: Account,
    members: tuple[Account, ...] = (),
    managers: tuple[Account, ...] = (),
) -> str:
    created = await groups.CreateGroup(
        groups_pb.CreateGroupRequest(name=unique_email("group")), metadata=admin.metadata
    )
    group_id = created.group.group_id
    for who, role in [(m, group_pb2.GROUP_ROLE_MEMBER) for m in members] + [
        (m, group_pb2.GROUP_ROLE_MANAGER) for m in managers
    ]:
        await groups.AddGroupMember(
            groups_pb.AddGroupMemberRequest(group_id=group_id, user_id=who.user_id, role=role),
            metadata=admin.metadata,
        )
    return group_id


async def ingest_into(
    stubs: Stubs, who: Account, filename: str, content: bytes, *collection_ids: str
) -> kb_pb.Document:
    """Upload into `collection_ids` and wait until READY."""
    response = await upload(stubs, who, filename, content, collection_ids=list(collection_ids))
    document = await wait_settled(stubs, who, response.document.document_id)
    assert document.status == kb_pb.DOCUMENT_STATUS_READY, document.failure_reason
    return document


async def finds(stubs: Stubs, who: Account, query: str, document_id: str, **fields: object) -> bool:
    """Whether `who`'s search for `query` returns a passage of `document_id`."""
    results = await search(stubs, who, query, top_k=50, **fields)
    return any(r.document_id == document_id for r in results)


async def held_by(stubs: Stubs, who: Account, collection_id: str) -> list[str]:
    """The ids of the documents ListDocuments shows `who` for a collection."""
    response = await stubs.kb.ListDocuments(
        kb.ListDocumentsRequest(collection_id=collection_id, page_size=100), metadata=who.metadata
    )
    return [d.document_id for d in response.documents]


async def every_collection(
    collections: coll_grpc.CollectionServiceAsyncStub, who: Account, page_size: int = 200
) -> list[collection_pb2.Collection]:
    """Every collection ListCollections shows `who`, page after page."""
    seen: list[collection_pb2.Collection] = []
    token = ""
    while True:
        page = await collections.ListCollections(
            coll_pb.ListCollectionsRequest(page_size=page_size, page_token=token),
            metadata=who.metadata,
        )
        seen += page.collections
        token = page.next_page_token
        if not token:
            return seen


def fingerprint(results: list[kb_pb.SearchResult]) -> list[tuple[str, str, float, str]]:
    return [(r.chunk_id, r.document_id, r.score, r.text) for r in results]


# --- reading through a grant ---------------------------------------------------------------


async def test_a_group_read_grant_shows_the_passage_to_members_and_changes_nothing_for_others(
    app: Application,
    stubs: Stubs,
    collections: coll_grpc.CollectionServiceAsyncStub,
    groups: groups_grpc.GroupServiceAsyncStub,
) -> None:
    admin = await new_admin(app, stubs)
    owner, reader, outsider = (
        await new_user(stubs, "owner"),
        await new_user(stubs, "reader"),
        await new_user(stubs, "outsider"),
    )
    group_id = await new_group(groups, admin, members=(reader,))
    # The outsider has documents of their own on the same topic, so their results are not
    # empty and A's passages would have something to displace.
    for i, text in enumerate(
        (
            b"Harbour lighthouse notes: the lantern is powered by diesel, not tidal turbines.",
            b"Tidal turbines on the northern coast power several lighthouses and a keeper's "
            b"cottage; the brushes wear out every spring.",
            b"A lighthouse keeper's diary: the quartz lens was polished before the spring tide.",
        )
    ):
        await ingest(stubs, outsider, f"own{i}.txt", text)
    query = "quartz lantern lighthouse tidal turbines keeper spring tide"
    # top_k below the outsider's passage count: a search that dropped A's passages after
    # taking the best top_k would come back short.
    before = {mode: await search(stubs, outsider, query, top_k=2, mode=mode) for mode in MODES}
    assert all(len(results) == 2 for results in before.values()), before

    collection = await create(collections, owner)
    assert collection.owner_user_id == owner.user_id and collection.caller_access == MANAGE
    document = await ingest_into(stubs, owner, "skerry.txt", LIGHTHOUSE, collection.collection_id)
    assert list(document.collection_ids) == [collection.collection_id]
    given = await grant(collections, owner, collection.collection_id, grant_to(group_id=group_id))
    assert (given.group_id, given.access) == (group_id, READ) and given.HasField("granted_at")

    # The group member finds it, in the default scope and narrowed to the collection.
    assert await finds(stubs, reader, query, document.document_id)
    narrowed = await search(
        stubs, reader, query, top_k=50, collection_ids=[collection.collection_id]
    )
    assert narrowed and {r.document_id for r in narrowed} == {document.document_id}
    seen = await get_document(stubs, reader, document.document_id)
    assert list(seen.collection_ids) == [collection.collection_id]
    assert await held_by(stubs, reader, collection.collection_id) == [document.document_id]
    shown = await get_collection(collections, reader, collection.collection_id)
    assert (shown.caller_access, shown.document_count) == (READ, 1)

    after = {mode: await search(stubs, outsider, query, top_k=2, mode=mode) for mode in MODES}
    assert all(r.document_id != document.document_id for rs in after.values() for r in rs)
    await refused(get_document(stubs, outsider, document.document_id), grpc.StatusCode.NOT_FOUND)
    not_readable = await refused(
        search(stubs, outsider, query, collection_ids=[collection.collection_id]),
        grpc.StatusCode.NOT_FOUND,
    )
    missing = await refused(
        search(stubs, outsider, query, collection_ids=[GHOST]), grpc.StatusCode.NOT_FOUND
    )
    assert error_info(not_readable).reason == error_info(missing).reason

    # Leaving the group ends the access at the very next call.
    await groups.RemoveGroupMember(
        groups_pb.RemoveGroupMemberRequest(group_id=group_id, user_id=reader.user_id),
        metadata=admin.metadata,
    )
    assert not await finds(stubs, reader, query, document.document_id)
    await refused(get_document(stubs, reader, document.document_id), grpc.StatusCode.NOT_FOUND)
    await refused(
        search(stubs, reader, query, collection_ids=[collection.collection_id]),
        grpc.StatusCode.NOT_FOUND,
    )
    await refused(
        get_collection(collections, reader, collection.collection_id), grpc.StatusCode.NOT_FOUND
    )
    # The owner still finds it, so the searches above could have.
    assert await finds(stubs, owner, query, document.document_id)

    # Last: the outsider's results were what they were before A's document existed: the
    # permission is in the index's query, so A's passages take no place in top_k. Dense
    # scores are the same to the bit. Sparse (BM25) scores are not compared: the engine's
    # IDF is a statistic of the whole index (Qdrant's IDF modifier), so any new passage with
    # a query term moves every tenant's BM25 weights, though never what they see (README,
    # "Collections and grants").
    assert {m: [r.chunk_id for r in after[m]] for m in MODES} == {
        m: [r.chunk_id for r in before[m]] for m in MODES
    }
    dense = kb.SEARCH_MODE_DENSE
    assert fingerprint(after[dense]) == fingerprint(before[dense])


async def test_revoking_a_grant_takes_effect_on_the_next_search(
    app: Application, stubs: Stubs, collections: coll_grpc.CollectionServiceAsyncStub
) -> None:
    owner, reader, anyone = (
        await new_user(stubs, "owner"),
        await new_user(stubs, "reader"),
        await new_user(stubs, "anyone"),
    )
    collection = await create(collections, owner)
    cid = collection.collection_id
    text = b"Orchard ledger: the heritage pear trees are grafted onto quince rootstock."
    document = await ingest_into(stubs, owner, "orchard.txt", text, cid)
    query = "heritage pear grafted quince rootstock"
    assert not await finds(stubs, reader, query, document.document_id)

    await grant(collections, owner, cid, grant_to(user=reader))
    await grant(collections, owner, cid, grant_to(everyone=True))
    listed = await collections.ListCollectionGrants(
        coll_pb.ListCollectionGrantsRequest(collection_id=cid), metadata=owner.metadata
    )
    assert [(g.WhichOneof("grantee"), g.access) for g in listed.grants] == [
        ("user_id", READ),
        ("everyone", READ),
    ]
    assert listed.grants[0].user_id == reader.user_id
    assert await finds(stubs, reader, query, document.document_id)
    assert await finds(stubs, anyone, query, document.document_id)

    await revoke(collections, owner, cid, grant_to(user=reader))
    # The everyone grant still gives the reader access: only the user grant is gone.
    assert await finds(stubs, reader, query, document.document_id)
    await revoke(collections, owner, cid, grant_to(everyone=True))
    assert not await finds(stubs, reader, query, document.document_id)
    assert not await finds(stubs, anyone, query, document.document_id)
    await refused(get_collection(collections, reader, cid), grpc.StatusCode.NOT_FOUND)
    await refused(
        revoke(collections, owner, cid, grant_to(user=reader)),
        grpc.StatusCode.NOT_FOUND,
        "GRANT_NOT_FOUND",
    )
    listed = await collections.ListCollectionGrants(
        coll_pb.ListCollectionGrantsRequest(collection_id=cid), metadata=owner.metadata
    )
    assert not listed.grants
    assert await finds(stubs, owner, query, document.document_id)


# --- writing: read vs write grants, moves ------------------------------------------------


async def test_read_cannot_change_a_collection_write_can_and_move_switches_collections(
    app: Application, stubs: Stubs, collections: coll_grpc.CollectionServiceAsyncStub
) -> None:
    owner, editor, stranger = (
        await new_user(stubs, "owner"),
        await new_user(stubs, "editor"),
        await new_user(stubs, "stranger"),
    )
    first = (await create(collections, owner)).collection_id
    second = (await create(collections, owner)).collection_id
    query = "copper kettle descaling vinegar"
    document = await ingest_into(stubs, owner, "kettle.txt", KETTLE, first)
    private = await ingest(stubs, owner, "private.txt", b"The owner's private tea notes.")
    mine = await ingest(stubs, editor, "mine.txt", b"The editor's note on porcelain teapots.")
    await grant(collections, owner, first, grant_to(READ, user=editor))
    await grant(collections, owner, second, grant_to(READ, user=editor))

    # READ: no adding, no uploading into, no removing.
    await refused(
        collections.AddCollectionDocument(
            coll_pb.AddCollectionDocumentRequest(collection_id=first, document_id=mine.document_id),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(
        upload(stubs, editor, "new.txt", b"An editor's fresh note.", collection_ids=[first]),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    listed = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=editor.metadata)
    assert [d.document_id for d in listed.documents] == [mine.document_id]
    await refused(
        collections.RemoveCollectionDocument(
            coll_pb.RemoveCollectionDocumentRequest(
                collection_id=first, document_id=document.document_id
            ),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await refused(
        collections.MoveDocument(
            coll_pb.MoveDocumentRequest(
                document_id=document.document_id, from_collection_id=first, to_collection_id=second
            ),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    assert await held_by(stubs, owner, first) == [document.document_id]

    # WRITE (granting again replaces the access): add, remove, upload into.
    await grant(collections, owner, first, grant_to(WRITE, user=editor))
    assert (await get_collection(collections, editor, first)).caller_access == WRITE
    added = await collections.AddCollectionDocument(
        coll_pb.AddCollectionDocumentRequest(collection_id=first, document_id=mine.document_id),
        metadata=editor.metadata,
    )
    assert list(added.document.collection_ids) == [first]
    assert set(await held_by(stubs, owner, first)) == {document.document_id, mine.document_id}
    await collections.RemoveCollectionDocument(
        coll_pb.RemoveCollectionDocumentRequest(collection_id=first, document_id=mine.document_id),
        metadata=editor.metadata,
    )
    assert await held_by(stubs, owner, first) == [document.document_id]
    assert not list((await get_document(stubs, editor, mine.document_id)).collection_ids)
    uploaded = await ingest_into(stubs, editor, "fresh.txt", b"Fresh: oolong steeping.", first)
    assert uploaded.owner_id == editor.user_id
    assert set(await held_by(stubs, owner, first)) == {document.document_id, uploaded.document_id}
    # Writing is not managing.
    for call in (
        collections.GrantCollectionAccess(
            coll_pb.GrantCollectionAccessRequest(
                collection_id=first, grant=grant_to(READ, user=stranger)
            ),
            metadata=editor.metadata,
        ),
        collections.ListCollectionGrants(
            coll_pb.ListCollectionGrantsRequest(collection_id=first), metadata=editor.metadata
        ),
        collections.DeleteCollection(
            coll_pb.DeleteCollectionRequest(collection_id=first), metadata=editor.metadata
        ),
    ):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED)
    # A document the editor cannot read is NOT_FOUND.
    await refused(
        collections.AddCollectionDocument(
            coll_pb.AddCollectionDocumentRequest(
                collection_id=first, document_id=private.document_id
            ),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )

    # Moving needs write access to both collections, then takes the document across.
    await refused(
        collections.MoveDocument(
            coll_pb.MoveDocumentRequest(
                document_id=document.document_id, from_collection_id=first, to_collection_id=second
            ),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await grant(collections, owner, second, grant_to(WRITE, user=editor))
    # The editor reads the owner's document (through the first collection) but does not own
    # it: they cannot put it in another collection.
    await refused(
        collections.AddCollectionDocument(
            coll_pb.AddCollectionDocumentRequest(
                collection_id=second, document_id=document.document_id
            ),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    moved = await collections.MoveDocument(
        coll_pb.MoveDocumentRequest(
            document_id=document.document_id, from_collection_id=first, to_collection_id=second
        ),
        metadata=editor.metadata,
    )
    assert list(moved.document.collection_ids) == [second]
    assert document.document_id not in await held_by(stubs, editor, first)
    assert await held_by(stubs, editor, second) == [document.document_id]
    assert list((await get_document(stubs, owner, document.document_id)).collection_ids) == [second]
    assert (await get_collection(collections, owner, second)).document_count == 1
    assert await finds(stubs, editor, query, document.document_id)
    assert await finds(stubs, editor, query, document.document_id, collection_ids=[second])
    assert not await finds(stubs, editor, query, document.document_id, collection_ids=[first])
    await refused(
        collections.MoveDocument(
            coll_pb.MoveDocumentRequest(
                document_id=document.document_id, from_collection_id=first, to_collection_id=second
            ),
            metadata=editor.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    # The owner uploading identical content into the first collection puts that same
    # document there too.
    again = await upload(stubs, owner, "kettle-again.txt", KETTLE, collection_ids=[first])
    assert again.deduplicated and again.document.document_id == document.document_id
    assert set((await get_document(stubs, owner, document.document_id)).collection_ids) == {
        first,
        second,
    }

    # A collection the caller cannot read is NOT_FOUND everywhere, as one that does not exist.
    theirs = await ingest(stubs, stranger, "s.txt", b"The stranger's own note on kettles.")
    for collection_id in (first, GHOST):
        attempt: Any
        for attempt in (
            get_collection(collections, stranger, collection_id),
            collections.AddCollectionDocument(
                coll_pb.AddCollectionDocumentRequest(
                    collection_id=collection_id, document_id=theirs.document_id
                ),
                metadata=stranger.metadata,
            ),
            collections.RemoveCollectionDocument(
                coll_pb.RemoveCollectionDocumentRequest(
                    collection_id=collection_id, document_id=document.document_id
                ),
                metadata=stranger.metadata,
            ),
            collections.ListCollectionGrants(
                coll_pb.ListCollectionGrantsRequest(collection_id=collection_id),
                metadata=stranger.metadata,
            ),
            collections.GrantCollectionAccess(
                coll_pb.GrantCollectionAccessRequest(
                    collection_id=collection_id, grant=grant_to(READ, user=stranger)
                ),
                metadata=stranger.metadata,
            ),
            collections.DeleteCollection(
                coll_pb.DeleteCollectionRequest(collection_id=collection_id),
                metadata=stranger.metadata,
            ),
            stubs.kb.ListDocuments(
                kb.ListDocumentsRequest(collection_id=collection_id), metadata=stranger.metadata
            ),
            search(stubs, stranger, query, collection_ids=[collection_id]),
            upload(stubs, stranger, "x.txt", b"Planted note.", collection_ids=[collection_id]),
        ):
            await refused(attempt, grpc.StatusCode.NOT_FOUND)
    assert set(await held_by(stubs, owner, first)) == {document.document_id, uploaded.document_id}


# --- deleting a collection or a group ---------------------------------------------------


async def test_deleting_the_collection_or_the_group_leaves_no_path_to_the_passage(
    app: Application,
    stubs: Stubs,
    collections: coll_grpc.CollectionServiceAsyncStub,
    groups: groups_grpc.GroupServiceAsyncStub,
) -> None:
    admin = await new_admin(app, stubs)
    owner, reader = await new_user(stubs, "owner"), await new_user(stubs, "reader")
    group_id = await new_group(groups, admin, members=(reader,))
    other_group_id = await new_group(groups, admin, members=(reader,))
    through_collection = (await create(collections, owner)).collection_id
    through_group = (await create(collections, owner)).collection_id
    query = "saltmarsh samphire harvest tides"
    document = await ingest_into(
        stubs,
        owner,
        "samphire.txt",
        b"Saltmarsh samphire is harvested between the July and August neap tides.",
        through_collection,
        through_group,
    )
    await grant(collections, owner, through_collection, grant_to(group_id=group_id))
    await grant(collections, owner, through_group, grant_to(group_id=other_group_id))
    assert await finds(stubs, reader, query, document.document_id)
    assert await finds(
        stubs, reader, query, document.document_id, collection_ids=[through_collection]
    )
    assert await finds(stubs, reader, query, document.document_id, collection_ids=[through_group])

    await collections.DeleteCollection(
        coll_pb.DeleteCollectionRequest(collection_id=through_collection), metadata=owner.metadata
    )
    await refused(get_collection(collections, owner, through_collection), grpc.StatusCode.NOT_FOUND)
    await refused(
        search(stubs, reader, query, collection_ids=[through_collection]),
        grpc.StatusCode.NOT_FOUND,
    )
    # Still reachable through the other collection, and only through it.
    assert list((await get_document(stubs, reader, document.document_id)).collection_ids) == [
        through_group
    ]
    assert await finds(stubs, reader, query, document.document_id)

    await groups.DeleteGroup(
        groups_pb.DeleteGroupRequest(group_id=other_group_id), metadata=admin.metadata
    )
    assert not await finds(stubs, reader, query, document.document_id)
    await refused(get_document(stubs, reader, document.document_id), grpc.StatusCode.NOT_FOUND)
    await refused(get_collection(collections, reader, through_group), grpc.StatusCode.NOT_FOUND)
    listed = await collections.ListCollectionGrants(
        coll_pb.ListCollectionGrantsRequest(collection_id=through_group), metadata=owner.metadata
    )
    assert not listed.grants  # the group's grant went with the group
    # The document stays with its owner, who still finds it.
    kept = await get_document(stubs, owner, document.document_id)
    assert list(kept.collection_ids) == [through_group]
    assert await finds(stubs, owner, query, document.document_id)


# --- group-owned collections -------------------------------------------------------------


async def test_a_group_collection_is_made_by_a_manager_and_written_by_members(
    app: Application,
    stubs: Stubs,
    collections: coll_grpc.CollectionServiceAsyncStub,
    groups: groups_grpc.GroupServiceAsyncStub,
) -> None:
    admin = await new_admin(app, stubs)
    manager, member, outsider = (
        await new_user(stubs, "manager"),
        await new_user(stubs, "member"),
        await new_user(stubs, "outsider"),
    )
    group_id = await new_group(groups, admin, members=(member,), managers=(manager,))
    await refused(
        create(collections, member, owner_group_id=group_id), grpc.StatusCode.PERMISSION_DENIED
    )
    await refused(create(collections, outsider, owner_group_id=group_id), grpc.StatusCode.NOT_FOUND)
    collection = await create(collections, manager, owner_group_id=group_id)
    cid = collection.collection_id
    assert (collection.owner_group_id, collection.owner_user_id) == (group_id, "")
    assert collection.caller_access == MANAGE
    assert (await get_collection(collections, member, cid)).caller_access == WRITE
    assert (await get_collection(collections, admin, cid)).caller_access == MANAGE
    await refused(get_collection(collections, outsider, cid), grpc.StatusCode.NOT_FOUND)

    # A member uploads into it; every member finds it; the outsider does not.
    query = "walnut veneer steam bending"
    document = await ingest_into(
        stubs,
        member,
        "veneer.txt",
        b"Walnut veneer is softened by steam bending before it is glued to the frame.",
        cid,
    )
    assert await finds(stubs, manager, query, document.document_id)
    assert not await finds(stubs, outsider, query, document.document_id)
    # Members write; managers manage.
    for call in (
        collections.DeleteCollection(
            coll_pb.DeleteCollectionRequest(collection_id=cid), metadata=member.metadata
        ),
        collections.GrantCollectionAccess(
            coll_pb.GrantCollectionAccessRequest(
                collection_id=cid, grant=grant_to(READ, user=outsider)
            ),
            metadata=member.metadata,
        ),
    ):
        await refused(call, grpc.StatusCode.PERMISSION_DENIED)
    await grant(collections, manager, cid, grant_to(READ, user=outsider))
    assert await finds(stubs, outsider, query, document.document_id)
    assert cid in [c.collection_id for c in await every_collection(collections, admin)]

    # Deleting the group deletes its collection: nobody reaches the passage through it.
    await groups.DeleteGroup(
        groups_pb.DeleteGroupRequest(group_id=group_id), metadata=admin.metadata
    )
    await refused(get_collection(collections, admin, cid), grpc.StatusCode.NOT_FOUND)
    for who in (manager, outsider):
        assert not await finds(stubs, who, query, document.document_id)
    # The uploader still owns the document.
    assert await finds(stubs, member, query, document.document_id)


# --- the built-in collection every user reads ------------------------------------------


async def test_a_shared_upload_lands_in_the_collection_every_user_reads(
    app: Application, stubs: Stubs, collections: coll_grpc.CollectionServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    response = await upload(
        stubs,
        admin,
        "handbook.txt",
        b"Staff handbook: the marmalade committee meets on the third Thursday.",
        shared=True,
    )
    document = await wait_settled(stubs, admin, response.document.document_id)
    assert document.status == kb_pb.DOCUMENT_STATUS_READY and document.shared
    assert EVERYONE in document.collection_ids
    try:
        assert document.document_id in await held_by(stubs, admin, EVERYONE)
        for _ in range(2):
            user = await new_user(stubs, "newcomer")
            question = "when does the marmalade committee meet"
            assert await finds(stubs, user, question, document.document_id)
            assert await finds(
                stubs,
                user,
                "marmalade committee",
                document.document_id,
                collection_ids=[EVERYONE],
            )
            built_in = await get_collection(collections, user, EVERYONE)
            assert built_in.caller_access == READ and built_in.owner_user_id == ""
            listed = await collections.ListCollections(
                coll_pb.ListCollectionsRequest(), metadata=user.metadata
            )
            assert [c.collection_id for c in listed.collections] == [EVERYONE]
            # Reading is not writing: a user cannot add to it.
            await refused(
                upload(stubs, user, "mine.txt", b"Planted.", collection_ids=[EVERYONE]),
                grpc.StatusCode.PERMISSION_DENIED,
            )
        await refused(
            collections.DeleteCollection(
                coll_pb.DeleteCollectionRequest(collection_id=EVERYONE), metadata=admin.metadata
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            "BUILT_IN_COLLECTION",
        )
        assert (await get_collection(collections, admin, EVERYONE)).caller_access == MANAGE
    finally:
        await stubs.kb.DeleteDocument(
            kb.DeleteDocumentRequest(document_id=document.document_id), metadata=admin.metadata
        )


# --- listing -----------------------------------------------------------------------------


async def test_each_user_lists_the_collections_they_read_oldest_first(
    app: Application, stubs: Stubs, collections: coll_grpc.CollectionServiceAsyncStub
) -> None:
    owner, reader = await new_user(stubs, "owner"), await new_user(stubs, "reader")
    made = [(await create(collections, owner)).collection_id for _ in range(3)]
    await grant(collections, owner, made[1], grant_to(READ, user=reader))
    seen = [
        (c.collection_id, c.caller_access)
        for c in await every_collection(collections, owner, page_size=2)
    ]
    assert seen == [(EVERYONE, READ)] + [(cid, MANAGE) for cid in made]
    listed = await collections.ListCollections(
        coll_pb.ListCollectionsRequest(), metadata=reader.metadata
    )
    assert [(c.collection_id, c.caller_access) for c in listed.collections] == [
        (EVERYONE, READ),
        (made[1], READ),
    ]
    await refused(
        collections.ListCollections(
            coll_pb.ListCollectionsRequest(page_size=-1), metadata=owner.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        collections.ListCollections(
            coll_pb.ListCollectionsRequest(page_token="garbage"), metadata=owner.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )


# --- validation --------------------------------------------------------------------------


async def test_invalid_requests_are_invalid_argument_with_their_fields(
    app: Application, stubs: Stubs, collections: coll_grpc.CollectionServiceAsyncStub
) -> None:
    owner, other = await new_user(stubs, "owner"), await new_user(stubs, "other")
    for request, fields in (
        (coll_pb.CreateCollectionRequest(name=""), {"name"}),
        (coll_pb.CreateCollectionRequest(name="x" * 101), {"name"}),
        (coll_pb.CreateCollectionRequest(name="ok", description="d" * 1001), {"description"}),
        (coll_pb.CreateCollectionRequest(name="ok", owner_group_id="nope"), {"owner_group_id"}),
    ):
        error = await refused(
            collections.CreateCollection(request, metadata=owner.metadata),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert set(field_violations(error)) == fields, (request, field_violations(error))
    error = await refused(
        collections.GetCollection(
            coll_pb.GetCollectionRequest(collection_id="nope"), metadata=owner.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"collection_id"}
    error = await refused(
        collections.AddCollectionDocument(
            coll_pb.AddCollectionDocumentRequest(collection_id="nope", document_id="nope"),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert set(field_violations(error)) == {"collection_id", "document_id"}
    for call in (
        collections.DeleteCollection(
            coll_pb.DeleteCollectionRequest(collection_id="nope"), metadata=owner.metadata
        ),
        collections.RemoveCollectionDocument(
            coll_pb.RemoveCollectionDocumentRequest(collection_id=GHOST, document_id="nope"),
            metadata=owner.metadata,
        ),
        collections.ListCollectionGrants(
            coll_pb.ListCollectionGrantsRequest(collection_id="nope"), metadata=owner.metadata
        ),
        search(stubs, owner, "anything", collection_ids=["nope"]),
    ):
        await refused(call, grpc.StatusCode.INVALID_ARGUMENT)

    cid = (await create(collections, owner)).collection_id
    await refused(
        collections.MoveDocument(
            coll_pb.MoveDocumentRequest(
                document_id=GHOST, from_collection_id=cid, to_collection_id=cid
            ),
            metadata=owner.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for bad in (
        grant_to(WRITE, everyone=True),  # everyone may only read
        grant_to(MANAGE, user=other),  # managing follows from ownership, never a grant
        grant_to(collection_pb2.COLLECTION_ACCESS_UNSPECIFIED, user=other),
        collection_pb2.CollectionGrant(access=READ),  # no grantee
        collection_pb2.CollectionGrant(user_id="nope", access=READ),
    ):
        await refused(grant(collections, owner, cid, bad), grpc.StatusCode.INVALID_ARGUMENT)
    await refused(
        revoke(collections, owner, cid, collection_pb2.CollectionGrant()),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    await refused(
        grant(collections, owner, cid, collection_pb2.CollectionGrant(user_id=GHOST, access=READ)),
        grpc.StatusCode.NOT_FOUND,
        "USER_NOT_FOUND",
    )
    await refused(
        grant(collections, owner, cid, grant_to(READ, group_id=GHOST)),
        grpc.StatusCode.NOT_FOUND,
        "GROUP_NOT_FOUND",
    )
    await refused(
        upload(
            stubs,
            owner,
            "many.txt",
            b"Too many collections.",
            collection_ids=[str(uuid.uuid4()) for _ in range(21)],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    # Nothing of the refused calls was stored.
    listed = await collections.ListCollectionGrants(
        coll_pb.ListCollectionGrantsRequest(collection_id=cid), metadata=owner.metadata
    )
    assert not listed.grants
    documents = await stubs.kb.ListDocuments(kb.ListDocumentsRequest(), metadata=owner.metadata)
    assert not documents.documents


# --- REST through Envoy ----------------------------------------------------------------


async def rest_call(
    rest: aiohttp.ClientSession, method: str, path: str, token: str, body: Any = None
) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {token}"}
    async with rest.request(method, path, json=body, headers=headers) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else {}


async def test_collections_over_rest(
    app: Application, stubs: Stubs, rest: aiohttp.ClientSession
) -> None:
    owner, reader = await new_user(stubs, "restowner"), await new_user(stubs, "restreader")
    name = "REST " + unique_email("shelf")
    status, body = await rest_call(
        rest,
        "POST",
        "/v1/kb/collections",
        owner.access_token,
        {"name": name, "description": "Via Envoy"},
    )
    assert status == 200 and body["collection"]["name"] == name, body
    assert body["collection"]["caller_access"] == "COLLECTION_ACCESS_MANAGE", body
    cid = body["collection"]["collection_id"]
    status, body = await rest_call(rest, "GET", f"/v1/kb/collections/{cid}", reader.access_token)
    assert status == 404, body
    status, body = await rest_call(
        rest,
        "POST",
        f"/v1/kb/collections/{cid}/grants",
        owner.access_token,
        {"grant": {"user_id": reader.user_id, "access": "COLLECTION_ACCESS_READ"}},
    )
    assert status == 200, body
    assert body["grant"]["user_id"] == reader.user_id, body
    assert body["grant"]["access"] == "COLLECTION_ACCESS_READ", body
    status, body = await rest_call(rest, "GET", "/v1/kb/collections", reader.access_token)
    assert status == 200, body
    shown = {c["collection_id"]: c for c in body["collections"]}
    assert set(shown) == {EVERYONE, cid}, body
    assert shown[cid]["caller_access"] == "COLLECTION_ACCESS_READ" and shown[cid]["name"] == name
    status, body = await rest_call(
        rest,
        "POST",
        f"/v1/kb/collections/{cid}/grants",
        reader.access_token,
        {"grant": {"everyone": True, "access": "COLLECTION_ACCESS_READ"}},
    )
    assert status == 403, body
    status, body = await rest_call(
        rest, "POST", "/v1/kb/collections", owner.access_token, {"name": ""}
    )
    assert status == 400, body
    violations = next(d for d in body["details"] if d["@type"].endswith("BadRequest"))
    assert [v["field"] for v in violations["field_violations"]] == ["name"]


# --- the agent cites only what the caller may read ----------------------------------------


async def test_the_agent_cites_a_collection_passage_only_for_its_readers(
    app: Application,
    stubs: Stubs,
    collections: coll_grpc.CollectionServiceAsyncStub,
    groups: groups_grpc.GroupServiceAsyncStub,
) -> None:
    # The shared application answers extractively (no LLM configured): its citations are the
    # passages its knowledge-base retrieval returned for the caller.
    assert app.settings.resolved_llm_provider == "extractive"
    admin = await new_admin(app, stubs)
    owner, reader, outsider = (
        await new_user(stubs, "owner"),
        await new_user(stubs, "reader"),
        await new_user(stubs, "outsider"),
    )
    group_id = await new_group(groups, admin, members=(reader,))
    cid = (await create(collections, owner)).collection_id
    document = await ingest_into(
        stubs,
        owner,
        "zephyr.txt",
        b"The Zephyr research reactor is cooled with liquid sodium at 550 degrees Celsius.",
        cid,
    )
    await grant(collections, owner, cid, grant_to(group_id=group_id))
    question = "How is the Zephyr research reactor cooled?"

    events = await stream(stubs, reader, question)
    citations = of_kind(events, "citation")
    assert any(c.document_id == document.document_id for c in citations), citations
    cited = next(c for c in citations if c.document_id == document.document_id)
    assert cited.source_type == agent_pb2.SOURCE_TYPE_KNOWLEDGE_BASE
    assert "liquid sodium" in cited.snippet
    assert "liquid sodium" in of_kind(events, "completed")[0].message.content

    events = await stream(stubs, outsider, question)
    assert all(c.document_id != document.document_id for c in of_kind(events, "citation"))
    retrievals = of_kind(events, "retrieval")
    assert all(r.document_id != document.document_id for x in retrievals for r in x.results)
    message = of_kind(events, "completed")[0].message
    assert "liquid sodium" not in message.content
    assert all(c.document_id != document.document_id for c in message.citations)
