"""The per-user storage quota: the sizes of a user's documents (as uploaded) added up may
not exceed a limit (0: unlimited). An upload counts when it is stored, a replacement counts
its new size instead of the old one, and a delete gives the bytes back at once.

The check runs inside the upload's transaction after its document row is written, and
that transaction first locks the owner's row: on PostgreSQL one owner's uploads take turns
at that lock, on SQLite at the database's single write lock, so each check sees every
upload committed before it and two concurrent uploads can never both pass on the same
room. The limit is therefore exact; what it does not count is the upload's bytes kept for
ingestion until it ends (at most one copy per document).
"""

import uuid

from sqlalchemy.ext.asyncio import AsyncSession

from services.errors import QuotaViolation, ResourceExhausted
from services.knowledge import queries
from services.quotas.service import Allowance


class StorageStatus(Allowance):
    """A user's storage quota: its limit in bytes (0 with `unlimited`) and the bytes used."""


async def storage_status(s: AsyncSession, *, owner_id: uuid.UUID, limit: int) -> StorageStatus:
    """How much of their storage quota the owner's documents take."""
    return StorageStatus(limit, await queries.stored_bytes(s, owner_id=owner_id))


async def check_storage(
    s: AsyncSession, *, owner_id: uuid.UUID, limit: int, upload_bytes: int
) -> None:
    """RESOURCE_EXHAUSTED (QuotaFailure, STORAGE_QUOTA_EXCEEDED) when the owner's documents,
    the upload's already written in this transaction, exceed `limit` bytes."""
    if not limit:
        return
    total = await queries.stored_bytes(s, owner_id=owner_id)
    if total <= limit:
        return
    others = total - upload_bytes  # a replaced document's old size is already gone
    raise ResourceExhausted(
        f"storage quota exceeded: the document is {upload_bytes} bytes, and your other"
        f" documents leave {max(limit - others, 0)} of {limit} bytes; delete some to make room",
        violations=[QuotaViolation(f"user:{owner_id}", f"{limit} bytes of stored documents")],
        reason="STORAGE_QUOTA_EXCEEDED",
        metadata={"limit_bytes": str(limit), "used_bytes": str(others)},
    )
