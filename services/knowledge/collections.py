"""Collections of documents: owned by an account or a group, shared by read and write
grants to accounts, groups and everyone (issue 23). Who may do what is
`collection_access.py`; keeping the index's copy of each document's collections is
`acl_sync.py`. A collection the caller may not read is NOT_FOUND, as one that does not
exist; a change their access does not allow is PERMISSION_DENIED."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.auth.models import User
from services.auth.principal import Principal
from services.db import utcnow
from services.errors import FailedPrecondition, NotFound, PermissionDenied, Violations
from services.knowledge.acl_sync import AclSync, bump
from services.knowledge.collection_access import (
    EVERYONE,
    GRANTED,
    Access,
    access_to,
    document_collections,
    group_grantee,
    readable_collections,
    user_grantee,
    visible_documents,
)
from services.knowledge.models import (
    EVERYONE_COLLECTION_ID,
    Collection,
    CollectionDocument,
    CollectionGrant,
    Document,
)
from services.pagination import decode_cursor, page_size, split_page
from services.teams.groups import clean_description, clean_name, uuid_field
from services.teams.models import Group, GroupMember

MAX_GRANTS = 1000  # per collection
MAX_UPLOAD_COLLECTIONS = 20  # collections one upload may go into


@dataclass(frozen=True)
class CollectionView:
    collection: Collection
    document_count: int
    access: Access


@dataclass(frozen=True)
class Grantee:
    """Exactly one of: an account, a group, everyone."""

    user_id: uuid.UUID | None = None
    group_id: uuid.UUID | None = None
    everyone: bool = False

    @property
    def key(self) -> str:
        if self.user_id is not None:
            return user_grantee(self.user_id)
        if self.group_id is not None:
            return group_grantee(self.group_id)
        return EVERYONE


@dataclass(frozen=True)
class GrantView:
    grantee: Grantee
    access: Access
    granted_at: datetime


def collection_not_found() -> NotFound:
    return NotFound("collection not found", reason="COLLECTION_NOT_FOUND")


def document_not_found() -> NotFound:
    return NotFound("document not found", reason="DOCUMENT_NOT_FOUND")


def write_denied() -> PermissionDenied:
    return PermissionDenied(
        "you may not change this collection's documents", reason="COLLECTION_WRITE_DENIED"
    )


async def require_access(
    s: AsyncSession, principal: Principal, collection_id: uuid.UUID, needed: Access
) -> tuple[Collection, Access]:
    """The collection and the caller's access, at least `needed`: NOT_FOUND if the caller
    may not read it (or it does not exist), PERMISSION_DENIED if they may, but not enough."""
    collection = await s.get(Collection, collection_id)
    access = await access_to(s, principal, collection) if collection is not None else Access.NONE
    if collection is None or access < Access.READ:
        raise collection_not_found()
    if access < needed:
        if needed is Access.MANAGE:
            raise PermissionDenied(
                "only the collection's owner, the managers of its group and administrators "
                "manage it",
                reason="COLLECTION_MANAGE_DENIED",
            )
        raise write_denied()
    return collection, access


async def add_to(s: AsyncSession, collection_id: uuid.UUID, document_id: uuid.UUID) -> bool:
    """Put a document in a collection (in the caller's transaction); False if it was."""
    held = await s.get(CollectionDocument, (collection_id, document_id))
    if held is not None:
        return False
    s.add(CollectionDocument(collection_id=collection_id, document_id=document_id))
    await bump(s, [document_id])
    return True


async def _remove_from(s: AsyncSession, collection_id: uuid.UUID, document_id: uuid.UUID) -> None:
    result = await s.execute(
        delete(CollectionDocument).where(
            CollectionDocument.collection_id == collection_id,
            CollectionDocument.document_id == document_id,
        )
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        raise document_not_found()
    await bump(s, [document_id])


class CollectionService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], acl: AclSync) -> None:
        self._sessions = sessions
        self._acl = acl

    async def create(
        self, principal: Principal, *, name: str, description: str, owner_group_id: str
    ) -> CollectionView:
        violations = Violations()
        clean = clean_name(name, violations)
        about = clean_description(description, violations)
        group_id = (
            uuid_field(owner_group_id, "owner_group_id", violations) if owner_group_id else None
        )
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            if group_id is not None:
                await self._require_group_manager(s, principal, group_id)
            collection = Collection(
                name=clean,
                description=about,
                owner_user_id=None if group_id is not None else principal.user_id,
                owner_group_id=group_id,
            )
            s.add(collection)
            await s.flush()
        return CollectionView(collection, 0, Access.MANAGE)

    async def _require_group_manager(
        self, s: AsyncSession, principal: Principal, group_id: uuid.UUID
    ) -> None:
        if await s.get(Group, group_id) is None:
            raise NotFound("group not found", reason="GROUP_NOT_FOUND")
        if principal.is_admin:
            return
        role = await s.scalar(
            select(GroupMember.role).where(
                GroupMember.group_id == group_id, GroupMember.user_id == principal.user_id
            )
        )
        if role is None:
            raise NotFound("group not found", reason="GROUP_NOT_FOUND")
        if role != "manager":
            raise PermissionDenied(
                "only the group's managers make collections it owns",
                reason="GROUP_MANAGER_REQUIRED",
            )

    async def get(self, principal: Principal, raw_id: str) -> CollectionView:
        parsed = self._id(raw_id)
        async with self._sessions() as s:
            collection, access = await require_access(s, principal, parsed, Access.READ)
            count = await self._count(s, [collection.id])
        return CollectionView(collection, count.get(collection.id, 0), access)

    async def list_readable(
        self, principal: Principal, *, requested_page_size: int, page_token: str
    ) -> tuple[list[CollectionView], str]:
        size = page_size(requested_page_size)
        after = decode_cursor(page_token)
        query = select(Collection).where(Collection.id.in_(readable_collections(principal)))
        if after is not None:
            query = query.where(
                or_(
                    Collection.created_at > after.at,
                    (Collection.created_at == after.at) & (Collection.id > after.id),
                )
            )
        query = query.order_by(Collection.created_at, Collection.id).limit(size + 1)
        async with self._sessions() as s:
            rows, token = split_page(list((await s.scalars(query)).all()), size)
            counts = await self._count(s, [c.id for c in rows])
            views = [
                CollectionView(c, counts.get(c.id, 0), await access_to(s, principal, c))
                for c in rows
            ]
        return views, token

    async def delete(self, principal: Principal, raw_id: str) -> None:
        parsed = self._id(raw_id)
        async with self._sessions.begin() as s:
            collection, _ = await require_access(s, principal, parsed, Access.MANAGE)
            if collection.id == EVERYONE_COLLECTION_ID:
                raise FailedPrecondition(
                    "the collection every user reads is built in and cannot be deleted",
                    reason="BUILT_IN_COLLECTION",
                )
            held = list(
                await s.scalars(
                    select(CollectionDocument.document_id).where(
                        CollectionDocument.collection_id == collection.id
                    )
                )
            )
            await bump(s, held)
            await s.delete(collection)
        await self._acl.sync(held)

    async def add_document(
        self, principal: Principal, raw_collection: str, raw_document: str
    ) -> Document:
        violations = Violations()
        target = uuid_field(raw_collection, "collection_id", violations)
        document_id = uuid_field(raw_document, "document_id", violations)
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            await require_access(s, principal, target, Access.WRITE)
            document = await self._readable_document(s, principal, document_id)
            if document.owner_id != principal.user_id and not principal.is_admin:
                raise PermissionDenied(
                    "only the document's owner puts it in a collection (a collection's "
                    "writers may move it between collections they write)",
                    reason="DOCUMENT_OWNER_REQUIRED",
                )
            added = await add_to(s, target, document.id)
        if added:
            await self._acl.sync([document.id])
        return document

    async def remove_document(
        self, principal: Principal, raw_collection: str, raw_document: str
    ) -> None:
        violations = Violations()
        source = uuid_field(raw_collection, "collection_id", violations)
        document_id = uuid_field(raw_document, "document_id", violations)
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            await require_access(s, principal, source, Access.WRITE)
            await _remove_from(s, source, document_id)
        await self._acl.sync([document_id])

    async def move(
        self, principal: Principal, raw_document: str, raw_from: str, raw_to: str
    ) -> Document:
        violations = Violations()
        document_id = uuid_field(raw_document, "document_id", violations)
        source = uuid_field(raw_from, "from_collection_id", violations)
        target = uuid_field(raw_to, "to_collection_id", violations)
        if raw_from and raw_from == raw_to:
            violations.add("to_collection_id", "must differ from from_collection_id")
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            await require_access(s, principal, source, Access.WRITE)
            await require_access(s, principal, target, Access.WRITE)
            document = await s.get(Document, document_id)
            await _remove_from(s, source, document_id)
            assert document is not None  # a collection held it (cascades delete memberships)
            await add_to(s, target, document_id)
        await self._acl.sync([document_id])
        return document

    async def grant(
        self, principal: Principal, raw_collection: str, grantee: Grantee, access: Access
    ) -> GrantView:
        violations = Violations()
        target = uuid_field(raw_collection, "collection_id", violations)
        if access not in (Access.READ, Access.WRITE):
            violations.add("grant.access", "must be COLLECTION_ACCESS_READ or _WRITE")
        elif grantee.everyone and access is not Access.READ:
            violations.add("grant.access", "everyone may only be granted read access")
        violations.raise_if_any()
        stored = "read" if access is Access.READ else "write"
        try:
            async with self._sessions.begin() as s:
                await require_access(s, principal, target, Access.MANAGE)
                await self._require_grantee(s, grantee)
                row = await s.get(CollectionGrant, (target, grantee.key))
                if row is None:
                    count = await s.scalar(
                        select(func.count()).where(CollectionGrant.collection_id == target)
                    )
                    if (count or 0) >= MAX_GRANTS:
                        raise FailedPrecondition(
                            f"a collection has at most {MAX_GRANTS} grants",
                            reason="TOO_MANY_GRANTS",
                        )
                    row = CollectionGrant(
                        collection_id=target,
                        grantee=grantee.key,
                        user_id=grantee.user_id,
                        group_id=grantee.group_id,
                    )
                    s.add(row)
                row.access = stored
                row.granted_at = utcnow()
                await s.flush()
        except IntegrityError:  # the grantee went meanwhile
            raise self._grantee_gone(grantee) from None
        return GrantView(grantee, GRANTED[stored], row.granted_at)

    async def revoke(self, principal: Principal, raw_collection: str, grantee: Grantee) -> None:
        violations = Violations()
        target = uuid_field(raw_collection, "collection_id", violations)
        violations.raise_if_any()
        async with self._sessions.begin() as s:
            await require_access(s, principal, target, Access.MANAGE)
            result = await s.execute(
                delete(CollectionGrant).where(
                    CollectionGrant.collection_id == target,
                    CollectionGrant.grantee == grantee.key,
                )
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise NotFound("no such grant", reason="GRANT_NOT_FOUND")

    async def grants(self, principal: Principal, raw_collection: str) -> list[GrantView]:
        target = self._id(raw_collection)
        async with self._sessions() as s:
            await require_access(s, principal, target, Access.MANAGE)
            rows = await s.scalars(
                select(CollectionGrant)
                .where(CollectionGrant.collection_id == target)
                .order_by(CollectionGrant.granted_at, CollectionGrant.grantee)
            )
            return [
                GrantView(
                    Grantee(row.user_id, row.group_id, row.grantee == EVERYONE),
                    GRANTED[row.access],
                    row.granted_at,
                )
                for row in rows
            ]

    async def collections_of(self, principal: Principal, document: Document) -> list[uuid.UUID]:
        """The collections holding `document` that the caller may read."""
        async with self._sessions() as s:
            held = await document_collections(s, [document.id], readable_by=principal)
        return held[document.id]

    async def _readable_document(
        self, s: AsyncSession, principal: Principal, document_id: uuid.UUID
    ) -> Document:
        document = (
            await s.scalars(visible_documents(principal).where(Document.id == document_id))
        ).one_or_none()
        if document is None:
            raise document_not_found()
        return document

    async def _require_grantee(self, s: AsyncSession, grantee: Grantee) -> None:
        if grantee.user_id is not None and await s.get(User, grantee.user_id) is None:
            raise self._grantee_gone(grantee)
        if grantee.group_id is not None and await s.get(Group, grantee.group_id) is None:
            raise self._grantee_gone(grantee)

    @staticmethod
    def _grantee_gone(grantee: Grantee) -> NotFound:
        if grantee.user_id is not None:
            return NotFound("user not found", reason="USER_NOT_FOUND")
        return NotFound("group not found", reason="GROUP_NOT_FOUND")

    @staticmethod
    def _id(raw: str, field: str = "collection_id") -> uuid.UUID:
        violations = Violations()
        parsed = uuid_field(raw, field, violations)
        violations.raise_if_any()
        return parsed

    @staticmethod
    async def _count(s: AsyncSession, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        if not ids:
            return {}
        rows = await s.execute(
            select(CollectionDocument.collection_id, func.count())
            .where(CollectionDocument.collection_id.in_(list(ids)))
            .group_by(CollectionDocument.collection_id)
        )
        return {collection: count for collection, count in rows.tuples()}


def parse_grantee(user_id: str, group_id: str, everyone: bool, violations: Violations) -> Grantee:
    """The grantee a request names (exactly one of the three), with its field errors."""
    if user_id:
        return Grantee(user_id=uuid_field(user_id, "grant.user_id", violations))
    if group_id:
        return Grantee(group_id=uuid_field(group_id, "grant.group_id", violations))
    if everyone:
        return Grantee(everyone=True)
    violations.add("grant", "name a grantee: user_id, group_id or everyone")
    return Grantee(everyone=True)


__all__ = [
    "MAX_UPLOAD_COLLECTIONS",
    "CollectionService",
    "CollectionView",
    "GrantView",
    "Grantee",
    "add_to",
    "parse_grantee",
    "require_access",
]
