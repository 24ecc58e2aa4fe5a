"""The documents table, the uploads waiting for ingestion, and the collections documents are
shared through; passages live in the vector index, keyed by document id and generation.

Who may read a passage is decided by the database at query time (the caller's own
documents, and the collections the caller's grants and groups reach) and written into the
search's filter; each point carries the ids of its document's collections for that filter.
A document's `acl_version` counts changes to its collections, and `indexed_acl_version` is
the one its points carry: they differ only until the knowledge base writes the new list.
"""

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from services.db import Base, UTCDateTime, new_id, utcnow


class DocumentStatus(StrEnum):
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


class Stage(StrEnum):
    """How far the latest ingestion got (for a FAILED document: where it failed)."""

    QUEUED = "queued"
    PARSING = "parsing"
    CHUNKING = "chunking"
    EMBEDDING = "embedding"
    INDEXING = "indexing"
    DONE = "done"


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (
        Index("ix_documents_owner_id_created_at", "owner_id", "created_at"),
        Index("ix_documents_owner_id_content_sha256", "owner_id", "content_sha256"),
        Index("ix_documents_status", "status"),
        Index("ix_documents_acl_stale", "acl_version", "indexed_acl_version"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    owner_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(300))
    filename: Mapped[str] = mapped_column(String(255))
    document_type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    content_sha256: Mapped[str] = mapped_column(String(64))
    page_count: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    # `metadata` is reserved by SQLAlchemy's declarative base, hence the attribute name.
    extra: Mapped[dict[str, str]] = mapped_column("metadata", JSON, default=dict)
    # The indexed generation searches see, and the one being ingested (None when idle).
    generation: Mapped[str | None] = mapped_column(String(32))
    pending_generation: Mapped[str | None] = mapped_column(String(32))
    acl_version: Mapped[int] = mapped_column(Integer, default=0)
    indexed_acl_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class DocumentUpload(Base):
    """Uploaded bytes waiting for (or in) ingestion; deleted once ingestion ends. Kept in the
    database so a restarted (or another) server can resume the ingestion."""

    __tablename__ = "document_uploads"

    document_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE"), primary_key=True
    )
    generation: Mapped[str] = mapped_column(String(32))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# The built-in collection every user reads: where the documents an administrator shares go
# (the `shared` flag of earlier versions, migrated in 0009). Administrators manage it.
EVERYONE_COLLECTION_ID = uuid.UUID("00000000-0000-4000-8000-00000000e0e1")


class Collection(Base):
    """A named set of documents, owned by an account or a group (or by no one: built in)."""

    __tablename__ = "collections"
    __table_args__ = (
        CheckConstraint("owner_user_id IS NULL OR owner_group_id IS NULL", name="one_owner"),
        Index("ix_collections_owner_user_id", "owner_user_id"),
        Index("ix_collections_owner_group_id", "owner_group_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(String(1000), default="")
    owner_user_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE")
    )
    owner_group_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE")
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CollectionDocument(Base):
    """A document's membership of a collection."""

    __tablename__ = "collection_documents"
    __table_args__ = (
        PrimaryKeyConstraint("collection_id", "document_id"),
        Index("ix_collection_documents_document_id", "document_id"),
    )

    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE")
    )
    document_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CollectionGrant(Base):
    """Read or write access to a collection for one account, a group's members or everyone
    (`grantee` is "user:<id>", "group:<id>" or "everyone", unique per collection; the id
    columns cascade the grant away with the account or group)."""

    __tablename__ = "collection_grants"
    __table_args__ = (
        PrimaryKeyConstraint("collection_id", "grantee"),
        CheckConstraint("access IN ('read', 'write')", name="access"),
        Index("ix_collection_grants_user_id", "user_id"),
        Index("ix_collection_grants_group_id", "group_id"),
    )

    collection_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("collections.id", ondelete="CASCADE")
    )
    grantee: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    group_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"))
    access: Mapped[str] = mapped_column(String(8))
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
