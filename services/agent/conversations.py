"""Conversations and their messages: ownership checks, where a run's messages go in the
tree (services/agent/conversation_tree.py) and the history it reads, the atomic save of a
run, listing and search (most recently updated first), branch switching and deletion.
Feedback on messages belongs to the feedback package, above this one: its rows go with a
deleted conversation by the foreign keys' ON DELETE CASCADE."""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import and_, delete, func, literal, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from services.agent.conversation_search import matching, search_words
from services.agent.conversation_tree import Tree
from services.agent.models import Conversation, Message
from services.auth.principal import Principal
from services.db import require_uuid, utcnow
from services.errors import InvalidArgument, NotFound
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
    messages: list[Message]
    """The active branch, from the first question to the active leaf."""
    siblings: dict[uuid.UUID, list[uuid.UUID]]
    """Each message of `messages`: the messages with its parent, oldest first."""
    message_count: int
    """Every message of the conversation, every branch."""


@dataclass(frozen=True)
class Branch:
    """Where a run's question and answer go, and the history it reads."""

    parent_id: uuid.UUID | None
    """The question's parent (None: a first question)."""
    history: list[Message] = field(default_factory=list)
    """The branch up to `parent_id`, its last messages, oldest first."""
    question: Message | None = None
    """The stored question a regenerated answer answers again (None: a new question)."""


def _not_found() -> NotFound:
    return NotFound("conversation not found", reason="CONVERSATION_NOT_FOUND")


def _message_not_found(field_name: str) -> NotFound:
    return NotFound(
        f"{field_name}: no such message in this conversation", reason="MESSAGE_NOT_FOUND"
    )


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

    async def _message(
        self, s: AsyncSession, cid: uuid.UUID, mid: uuid.UUID, field_name: str, role: str
    ) -> Message:
        """Message `mid` of conversation `cid`, which must have `role`."""
        message = await s.get(Message, mid)
        if message is None or message.conversation_id != cid:
            raise _message_not_found(field_name)
        if message.role != role:
            kind = "a question" if role == "user" else "an answer"
            raise InvalidArgument.of(field_name, f"must name {kind}")
        return message

    @staticmethod
    async def _path(s: AsyncSession, leaf: uuid.UUID | None, limit: int) -> list[Message]:
        """The last `limit` messages of the branch ending at `leaf`, oldest first: a
        recursive query up the parents, so a long conversation is not read whole."""
        if leaf is None or limit <= 0:
            return []
        up = aliased(Message)
        path = (
            select(Message.id, Message.parent_id, literal(0).label("depth"))
            .where(Message.id == leaf)
            .cte("path", recursive=True)
        )
        path = path.union_all(
            select(up.id, up.parent_id, path.c.depth + 1)
            .join(path, up.id == path.c.parent_id)
            .where(path.c.depth < limit - 1)
        )
        rows = await s.scalars(
            select(Message).join(path, Message.id == path.c.id).order_by(path.c.depth.desc())
        )
        return list(rows.all())

    async def branch(
        self,
        principal: Principal,
        cid: uuid.UUID,
        limit: int,
        *,
        edit: uuid.UUID | None = None,
        regenerate: uuid.UUID | None = None,
    ) -> Branch:
        """Where a run in one of the caller's conversations goes: after the active leaf; or
        beside the question `edit`; or, for `regenerate`, a new answer beside that one."""
        async with self._sessions() as s:
            conversation = await self._owned(s, principal, cid)
            question = None
            if edit is not None:
                parent = (await self._message(s, cid, edit, "edit_message_id", "user")).parent_id
            elif regenerate is not None:
                answer = await self._message(
                    s, cid, regenerate, "regenerate_message_id", "assistant"
                )
                question = await s.get(Message, answer.parent_id) if answer.parent_id else None
                if question is None:  # an answer always has its question
                    raise _message_not_found("regenerate_message_id")
                parent = question.parent_id
            else:
                parent = conversation.active_message_id
            return Branch(parent, await self._path(s, parent, limit), question)

    async def save_run(
        self,
        principal: Principal,
        *,
        conversation_id: uuid.UUID,
        title: str | None,
        parent_id: uuid.UUID | None,
        question: Message,
        answer: Message,
        question_stored: bool = False,
    ) -> tuple[uuid.UUID, ...]:
        """Store a run's question (unless `question_stored`: a regenerated answer's) after
        `parent_id`, its answer after it, and make the answer the active leaf, in one
        transaction; `title` set creates the conversation. The answer's siblings (every
        answer to the question, oldest first). A conversation deleted meanwhile is NOT_FOUND
        and nothing is kept."""
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
                            active_message_id=answer.id,
                        )
                    )
                    await s.flush()
                else:
                    conversation = await self._owned(s, principal, conversation_id)
                    conversation.updated_at = now
                    conversation.active_message_id = answer.id
                answer.conversation_id = conversation_id
                answer.parent_id = question.id
                # Strictly after the question, so a branch reads back in order.
                answer.created_at = now + timedelta(milliseconds=1)
                if not question_stored:
                    question.conversation_id, question.parent_id = conversation_id, parent_id
                    question.created_at = now
                    s.add(question)
                    await s.flush()  # the answer's parent first
                s.add(answer)
                await s.flush()
                siblings = await s.scalars(
                    select(Message.id)
                    .where(Message.parent_id == question.id)
                    .order_by(Message.created_at, Message.id)
                )
                return tuple(siblings.all())
        except IntegrityError:
            raise _not_found() from None

    async def list(
        self, principal: Principal, size: int, token: str, query: str = ""
    ) -> ConversationPage:
        """A page of the caller's conversations, most recently updated first; with `query`,
        only those whose title or one of whose messages has all its words."""
        limit = page_size(size)
        cursor = decode_cursor(token)
        words = search_words(query)
        count = (
            select(func.count(Message.id))
            .where(Message.conversation_id == Conversation.id)
            .scalar_subquery()
        )
        statement = (
            select(Conversation, count)
            .where(Conversation.user_id == principal.user_id)
            .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
            .limit(limit + 1)
        )
        if cursor is not None:
            statement = statement.where(
                or_(
                    Conversation.updated_at < cursor.at,
                    and_(Conversation.updated_at == cursor.at, Conversation.id < cursor.id),
                )
            )
        async with self._sessions() as s:
            if words:
                statement = statement.where(matching(words, s.get_bind().dialect.name))
            rows = (await s.execute(statement)).all()
        counts = {conversation.id: n for conversation, n in rows}
        page, next_token = split_page(
            [conversation for conversation, _ in rows], limit, at=lambda c: c.updated_at
        )
        return ConversationPage([ConversationSummary(c, counts[c.id]) for c in page], next_token)

    @staticmethod
    async def _messages(s: AsyncSession, cid: uuid.UUID) -> Sequence[Message]:
        """Every message of a conversation, oldest first."""
        rows = await s.scalars(
            select(Message)
            .where(Message.conversation_id == cid)
            .order_by(Message.created_at, Message.id)
        )
        return rows.all()

    @staticmethod
    def _detail(conversation: Conversation, tree: Tree) -> ConversationDetail:
        path = tree.path_to(tree.active_leaf(conversation.active_message_id))
        siblings = {m.id: tree.siblings(m) for m in path}
        return ConversationDetail(conversation, path, siblings, len(tree.by_id))

    async def get(self, principal: Principal, cid: uuid.UUID) -> ConversationDetail:
        """A conversation with its active branch and the siblings along it."""
        async with self._sessions() as s:
            conversation = await self._owned(s, principal, cid)
            return self._detail(conversation, Tree.of(await self._messages(s, cid)))

    async def switch_branch(
        self, principal: Principal, cid: uuid.UUID, mid: uuid.UUID
    ) -> ConversationDetail:
        """Make the branch through message `mid` the active one (its newest leaf)."""
        async with self._sessions.begin() as s:
            conversation = await self._owned(s, principal, cid)
            tree = Tree.of(await self._messages(s, cid))
            if mid not in tree.by_id:
                raise _message_not_found("message_id")
            conversation.active_message_id = tree.leaf_under(mid)
            return self._detail(conversation, tree)

    async def delete(self, principal: Principal, cid: uuid.UUID) -> None:
        """Delete a conversation and its messages (their feedback cascades), all or nothing."""
        async with self._sessions.begin() as s:
            await self._owned(s, principal, cid)
            await s.execute(delete(Message).where(Message.conversation_id == cid))
            await s.execute(delete(Conversation).where(Conversation.id == cid))
