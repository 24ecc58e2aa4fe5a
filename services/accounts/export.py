"""Export everything the installation holds about one account: its profile, conversations
with their messages, the feedback it gave, and its documents' metadata (passages and
vectors are derived from the uploads and never exported).

Only rows keyed by the caller's own id are read: nothing another account owns can appear,
whatever a conversation or document references. One message holds it all, so each part is
capped (`ExportCaps`); `truncated` says when a cap cut something off.
"""

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.agent.models import Conversation, Message
from services.audit.trail import Actor, AuditAction, AuditTrail
from services.auth.models import User
from services.auth.principal import Principal
from services.db import utcnow
from services.errors import NotFound
from services.feedback.models import Feedback
from services.knowledge.models import Document

T = TypeVar("T")


@dataclass(frozen=True)
class ExportCaps:
    conversations: int = 500
    messages: int = 10_000
    feedback: int = 5_000
    documents: int = 5_000


@dataclass(frozen=True)
class ExportedConversation:
    conversation: Conversation
    messages: list[Message]


@dataclass
class AccountExport:
    user: User
    exported_at: datetime
    conversations: list[ExportedConversation] = field(default_factory=list)
    feedback: list[Feedback] = field(default_factory=list)
    documents: list[Document] = field(default_factory=list)
    truncated: bool = False


class AccountExports:
    """Builds a person's export; every export is in the audit trail."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        audit: AuditTrail,
        caps: ExportCaps | None = None,
    ) -> None:
        self._sessions = sessions
        self._audit = audit
        self._caps = caps or ExportCaps()

    async def export(self, principal: Principal) -> AccountExport:
        """Everything held about the caller, read in one snapshot-like session."""
        owner, caps = principal.user_id, self._caps
        async with self._sessions() as s:
            user = await s.get(User, owner)
            if user is None:
                raise NotFound("user not found", reason="USER_NOT_FOUND")
            result = AccountExport(user=user, exported_at=utcnow())
            conversations = await self._capped(
                s,
                result,
                select(Conversation)
                .where(Conversation.user_id == owner)
                .order_by(Conversation.updated_at.desc(), Conversation.id),
                caps.conversations,
            )
            messages = await self._messages(s, result, [c.id for c in conversations])
            result.conversations = [
                ExportedConversation(c, messages.get(c.id, [])) for c in conversations
            ]
            result.feedback = await self._capped(
                s,
                result,
                select(Feedback)
                .where(Feedback.user_id == owner)
                .order_by(Feedback.created_at, Feedback.id),
                caps.feedback,
            )
            result.documents = await self._capped(
                s,
                result,
                select(Document)
                .where(Document.owner_id == owner)
                .order_by(Document.created_at, Document.id),
                caps.documents,
            )
        await self._audit.record(
            AuditAction.ACCOUNT_EXPORTED,
            actor=Actor(principal.user_id, principal.key_id),
            target_type="user",
            target_id=owner,
            data={"truncated": result.truncated},
        )
        return result

    async def _messages(
        self, s: AsyncSession, result: AccountExport, conversation_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, list[Message]]:
        if not conversation_ids:
            return {}
        rows = await self._capped(
            s,
            result,
            select(Message)
            .where(Message.conversation_id.in_(conversation_ids))
            .order_by(Message.conversation_id, Message.created_at, Message.id),
            self._caps.messages,
        )
        grouped: dict[uuid.UUID, list[Message]] = {}
        for message in rows:
            grouped.setdefault(message.conversation_id, []).append(message)
        return grouped

    @staticmethod
    async def _capped(
        s: AsyncSession, result: AccountExport, query: Select[T], cap: int
    ) -> list[T]:
        """At most `cap` rows of `query`, marking the export truncated past it."""
        rows = list((await s.scalars(query.limit(cap + 1))).all())
        if len(rows) > cap:
            result.truncated = True
        return rows[:cap]
