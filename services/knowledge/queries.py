"""Plain query functions over the documents tables (each takes an open session)."""

import uuid
from collections.abc import Iterable, Sequence

from sqlalchemy import ColumnElement, Select, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.models import User
from services.db import utcnow
from services.knowledge.models import (
    CollectionDocument,
    Document,
    DocumentStatus,
    DocumentUpload,
    Stage,
)
from services.pagination import Cursor


async def get_visible(
    s: AsyncSession, visible: Select[Document], *, document_id: uuid.UUID
) -> Document | None:
    """The document if it is among `visible` (collection_access.visible_documents)."""
    result = await s.scalars(visible.where(Document.id == document_id))
    return result.one_or_none()


async def get_owned(
    s: AsyncSession, *, owner_id: uuid.UUID, document_id: uuid.UUID, lock: bool = False
) -> Document | None:
    query = select(Document).where(Document.id == document_id, Document.owner_id == owner_id)
    if lock:
        query = query.with_for_update()
    return (await s.scalars(query)).one_or_none()


async def find_same_content(
    s: AsyncSession, *, owner_id: uuid.UUID, sha256: str
) -> Document | None:
    """The owner's live (not FAILED) document with this content, if any."""
    query = (
        select(Document)
        .where(
            Document.owner_id == owner_id,
            Document.content_sha256 == sha256,
            Document.status != DocumentStatus.FAILED,
        )
        .order_by(Document.created_at)
        .limit(1)
    )
    return (await s.scalars(query)).one_or_none()


async def list_in_collection(
    s: AsyncSession,
    *,
    collection_id: uuid.UUID,
    status: DocumentStatus | None,
    after: Cursor | None,
    limit: int,
) -> list[Document]:
    """A collection's documents, newest first, after the keyset cursor."""
    held = select(CollectionDocument.document_id).where(
        CollectionDocument.collection_id == collection_id
    )
    return await _newest_first(s, Document.id.in_(held), status, after, limit)


async def list_owned(
    s: AsyncSession,
    *,
    owner_id: uuid.UUID,
    status: DocumentStatus | None,
    after: Cursor | None,
    limit: int,
) -> list[Document]:
    """The owner's documents, newest first, after the keyset cursor."""
    return await _newest_first(s, Document.owner_id == owner_id, status, after, limit)


async def _newest_first(
    s: AsyncSession,
    condition: ColumnElement[bool],
    status: DocumentStatus | None,
    after: Cursor | None,
    limit: int,
) -> list[Document]:
    query = select(Document).where(condition)
    if status is not None:
        query = query.where(Document.status == status)
    if after is not None:
        query = query.where(
            or_(
                Document.created_at < after.at,
                (Document.created_at == after.at) & (Document.id < after.id),
            )
        )
    query = query.order_by(Document.created_at.desc(), Document.id.desc()).limit(limit)
    return list((await s.scalars(query)).all())


async def current_generations(
    s: AsyncSession, visible: Select[Document], *, document_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, Document]:
    """The documents among `document_ids` that are among `visible`, by id (for checking
    search hits)."""
    ids = list(set(document_ids))
    if not ids:
        return {}
    result = await s.scalars(visible.where(Document.id.in_(ids)))
    return {document.id: document for document in result}


async def put_upload(
    s: AsyncSession, *, document_id: uuid.UUID, generation: str, content: bytes
) -> None:
    """Keep `content` for ingestion, replacing a previous upload still waiting."""
    await s.execute(delete(DocumentUpload).where(DocumentUpload.document_id == document_id))
    s.add(DocumentUpload(document_id=document_id, generation=generation, content=content))


async def get_upload(
    s: AsyncSession, *, document_id: uuid.UUID, generation: str
) -> DocumentUpload | None:
    query = select(DocumentUpload).where(
        DocumentUpload.document_id == document_id, DocumentUpload.generation == generation
    )
    return (await s.scalars(query)).one_or_none()


async def set_stage(
    s: AsyncSession, *, document_id: uuid.UUID, generation: str, stage: Stage
) -> bool:
    """Record progress; False when the ingestion is stale (document deleted or replaced)."""
    result = await s.execute(
        update(Document)
        .where(Document.id == document_id, Document.pending_generation == generation)
        .values(stage=stage, updated_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def finish_ingestion(
    s: AsyncSession,
    *,
    document_id: uuid.UUID,
    generation: str,
    values: dict[str, object],
) -> bool:
    """End the ingestion `generation` with `values`; False when it is stale."""
    result = await s.execute(
        update(Document)
        .where(Document.id == document_id, Document.pending_generation == generation)
        .values(pending_generation=None, updated_at=utcnow(), **values)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    await s.execute(
        delete(DocumentUpload).where(
            DocumentUpload.document_id == document_id, DocumentUpload.generation == generation
        )
    )
    return True


async def processing(s: AsyncSession) -> Sequence[tuple[uuid.UUID, str]]:
    """(document id, pending generation) of every document left PROCESSING."""
    query = select(Document.id, Document.pending_generation).where(
        Document.status == DocumentStatus.PROCESSING, Document.pending_generation.is_not(None)
    )
    return [(row[0], str(row[1])) for row in (await s.execute(query)).all()]


async def lock_owner(s: AsyncSession, *, owner_id: uuid.UUID) -> None:
    """Hold the owner's row until the transaction ends, so that one owner's uploads take
    turns (PostgreSQL: FOR NO KEY UPDATE, which leaves inserts referencing the row free;
    SQLite ignores it, its first write serialises writers anyway)."""
    await s.execute(select(User.id).where(User.id == owner_id).with_for_update(key_share=True))


async def stored_bytes(s: AsyncSession, *, owner_id: uuid.UUID) -> int:
    """The sizes of the owner's documents added up, as uploaded."""
    query = select(func.coalesce(func.sum(Document.size_bytes), 0)).where(
        Document.owner_id == owner_id
    )
    return int((await s.execute(query)).scalar_one())
