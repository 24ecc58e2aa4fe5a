"""Conversations and their messages: ownership checks, history, the atomic save of a run,
listing (most recently updated first) and deletion. Feedback on messages belongs to the
feedback package, above this one: its rows go with a deleted conversation by the foreign
keys' ON DELETE CASCADE."""

import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.agent.models import Conversation, Message
from services.auth.principal import Principal
from services.db import require_uuid, utcnow
from services.errors import NotFound
from services.pagination import decode_cursor, page_size, split_page


@dataclass(frozen=True)
class ConversationSummary:
    conversation: Conversation
    message_count: int


@dataclass(frozen=True)
class ConversationPage:
    conversations: list[ConversationSummary]
    next_page_token: str


@dataclass(frozen=True)
class ConversationDetail:
    conversation: Conversation
    messages: list[Message]  # oldest first


def _not_found() -> NotFound:
    return NotFound("conversation not found", reason="CONVERSATION_NOT_FOUND")


def conversation_id_of(raw: str) -> uuid.UUID:
    """A conversation id from a request (INVALID_ARGUMENT when malformed)."""
    return require_uuid(raw, field="conversation_id")


class ConversationStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def _owned(self, s: AsyncSession, principal: Principal, cid: uuid.UUID) -> Conversation:
        conversation = await s.get(Conversation, cid)
        # Someone else's conversation is indistinguishable from a missing one.
        if conversation is None or conversation.user_id != principal.user_id:
            raise _not_found()
        return conversation

    async def recent_messages(
        self, principal: Principal, cid: uuid.UUID, limit: int
    ) -> list[Message]:
        """The last `limit` messages of one of the caller's conversations, oldest first."""
        async with self._sessions() as s:
            await self._owned(s, principal, cid)
            rows = await s.scalars(
                select(Message)
                .where(Message.conversation_id == cid)
                .order_by(Message.created_at.desc(), Message.id.desc())
                .limit(limit)
            )
            return list(reversed(rows.all()))

    async def save_run(
        self,
        principal: Principal,
        *,
        conversation_id: uuid.UUID,
        title: str | None,
        question: Message,
        answer: Message,
    ) -> None:
        """Store a run's question and answer in one transaction; `title` set creates the
        conversation. A conversation deleted meanwhile is NOT_FOUND and nothing is kept."""
        now = utcnow()
        try:
            async with self._sessions.begin() as s:
                if title is not None:
                    s.add(
                        Conversation(
                            id=conversation_id,
                            user_id=principal.user_id,
                            title=title,
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    await s.flush()
                else:
                    conversation = await self._owned(s, principal, conversation_id)
                    conversation.updated_at = now
                question.conversation_id = answer.conversation_id = conversation_id
                question.created_at = now
                # Strictly after the question, so history reads back in order.
                answer.created_at = now + timedelta(milliseconds=1)
                s.add_all([question, answer])
        except IntegrityError:
            raise _not_found() from None

    async def list(self, principal: Principal, size: int, token: str) -> ConversationPage:
        limit = page_size(size)
        cursor = decode_cursor(token)
        count = (
            select(func.count(Message.id))
            .where(Message.conversation_id == Conversation.id)
            .scalar_subquery()
        )
        query = (
            select(Conversation, count)
            .where(Conversation.user_id == principal.user_id)
            .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
            .limit(limit + 1)
        )
        if cursor is not None:
            query = query.where(
                or_(
                    Conversation.updated_at < cursor.at,
                    and_(Conversation.updated_at == cursor.at, Conversation.id < cursor.id),
                )
            )
        async with self._sessions() as s:
            rows = (await s.execute(query)).all()
        counts = {conversation.id: n for conversation, n in rows}
        page, next_token = split_page(
            [conversation for conversation, _ in rows], limit, at=lambda c: c.updated_at
        )
        return ConversationPage([ConversationSummary(c, counts[c.id]) for c in page], next_token)

    async def get(self, principal: Principal, cid: uuid.UUID) -> ConversationDetail:
        """A conversation with all its messages, oldest first."""
        async with self._sessions() as s:
            conversation = await self._owned(s, principal, cid)
            rows = await s.scalars(
                select(Message)
                .where(Message.conversation_id == cid)
                .order_by(Message.created_at, Message.id)
            )
            return ConversationDetail(conversation, list(rows.all()))

    async def count_messages(self, cid: uuid.UUID) -> int:
        async with self._sessions() as s:
            return int(
                await s.scalar(select(func.count(Message.id)).where(Message.conversation_id == cid))
                or 0
            )

    async def delete(self, principal: Principal, cid: uuid.UUID) -> None:
        """Delete a conversation and its messages (their feedback cascades), all or nothing."""
        async with self._sessions.begin() as s:
            await self._owned(s, principal, cid)
            await s.execute(delete(Message).where(Message.conversation_id == cid))
            await s.execute(delete(Conversation).where(Conversation.id == cid))
