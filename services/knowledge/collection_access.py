"""Who may do what with a collection, and so with the documents in it, read from the
database on every call (no cache: a revoked grant or a removed member counts at once).

An account's access to a collection is the highest of:
- MANAGE: administrators; the owning account; the managers of the owning group;
- WRITE: the members of the owning group; a write grant to the account or a group of it;
- READ: a read grant to the account, a group of it, or everyone.
A document is readable by its owner and by whoever may read a collection holding it.
"""

import enum
import uuid
from collections.abc import Iterable

from sqlalchemy import Select, false, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.principal import Principal
from services.knowledge.models import Collection, CollectionDocument, CollectionGrant, Document
from services.teams.models import GroupMember


class Access(enum.IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2
    MANAGE = 3


GRANTED = {"read": Access.READ, "write": Access.WRITE}
EVERYONE = "everyone"


def user_grantee(user_id: uuid.UUID) -> str:
    return f"user:{user_id}"


def group_grantee(group_id: uuid.UUID) -> str:
    return f"group:{group_id}"


def _groups_of(user_id: uuid.UUID) -> Select[uuid.UUID]:
    return select(GroupMember.group_id).where(GroupMember.user_id == user_id)


def readable_collections(principal: Principal) -> Select[uuid.UUID]:
    """The ids of the collections `principal` may read (one query, for a subquery)."""
    if principal.is_admin:
        return select(Collection.id)
    user, groups = principal.user_id, _groups_of(principal.user_id)
    granted = select(CollectionGrant.collection_id).where(
        or_(
            CollectionGrant.user_id == user,
            CollectionGrant.group_id.in_(groups),
            CollectionGrant.grantee == EVERYONE,
        )
    )
    return select(Collection.id).where(
        or_(
            Collection.owner_user_id == user,
            Collection.owner_group_id.in_(groups),
            Collection.id.in_(granted),
        )
    )


async def readable_ids(s: AsyncSession, principal: Principal) -> tuple[uuid.UUID, ...]:
    """The collections `principal` may read now, for a search's filter."""
    return tuple((await s.scalars(readable_collections(principal))).all())


def visible_documents(
    principal: Principal, collections: Iterable[uuid.UUID] | None = None, *, own: bool = True
) -> Select[Document]:
    """Documents `principal` may read: their own (if `own`) and those in a collection they
    may read, or in `collections` when given (already checked as readable)."""
    reach = select(CollectionDocument.document_id).where(
        CollectionDocument.collection_id.in_(
            list(collections) if collections is not None else readable_collections(principal)
        )
    )
    return select(Document).where(
        or_(Document.owner_id == principal.user_id if own else false(), Document.id.in_(reach))
    )


async def access_to(s: AsyncSession, principal: Principal, collection: Collection) -> Access:
    """`principal`'s access to `collection`."""
    if principal.is_admin or collection.owner_user_id == principal.user_id:
        return Access.MANAGE
    user = principal.user_id
    roles = dict(
        (
            await s.execute(
                select(GroupMember.group_id, GroupMember.role).where(GroupMember.user_id == user)
            )
        )
        .tuples()
        .all()
    )
    if collection.owner_group_id is not None and collection.owner_group_id in roles:
        return Access.MANAGE if roles[collection.owner_group_id] == "manager" else Access.WRITE
    grantees = [EVERYONE, user_grantee(user), *(group_grantee(g) for g in roles)]
    granted = await s.scalars(
        select(CollectionGrant.access).where(
            CollectionGrant.collection_id == collection.id,
            CollectionGrant.grantee.in_(grantees),
        )
    )
    return max((GRANTED[access] for access in granted), default=Access.NONE)


async def document_collections(
    s: AsyncSession, document_ids: Iterable[uuid.UUID], readable_by: Principal | None = None
) -> dict[uuid.UUID, list[uuid.UUID]]:
    """The collections holding each document (only those `readable_by` may read, if given)."""
    ids = list(set(document_ids))
    if not ids:
        return {}
    query = select(CollectionDocument.document_id, CollectionDocument.collection_id).where(
        CollectionDocument.document_id.in_(ids)
    )
    if readable_by is not None:
        query = query.where(CollectionDocument.collection_id.in_(readable_collections(readable_by)))
    held: dict[uuid.UUID, list[uuid.UUID]] = {document_id: [] for document_id in ids}
    for document_id, collection_id in (
        await s.execute(query.order_by(CollectionDocument.added_at))
    ).tuples():
        held[document_id].append(collection_id)
    return held
