"""Feedback on assistant answers: one per user and message (submitting again replaces it),
an administrators' listing with filters, and summary statistics over a range."""

import enum
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Select, String, and_, case, cast, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.agent.models import Conversation, Message
from services.auth.principal import Principal
from services.db import parse_uuid, require_uuid, utc_day, utcnow
from services.errors import InvalidArgument, NotFound, Violations
from services.feedback.models import Feedback
from services.pagination import decode_cursor, page_size, split_page
from services.usage_events.recorder import EventKind, EventRecorder

MAX_COMMENT_CHARS = 2000
DEFAULT_STATS_DAYS = 30


class Rating(enum.StrEnum):
    THUMBS_UP = "thumbs_up"
    THUMBS_DOWN = "thumbs_down"


class Reason(enum.StrEnum):
    WRONG = "wrong"
    INCOMPLETE = "incomplete"
    BAD_CITATION = "bad_citation"
    HARMFUL = "harmful"
    OTHER = "other"


@dataclass(frozen=True)
class Submission:
    """A feedback as submitted; `rating` None and unknown reasons are validation errors."""

    message_id: str
    rating: Rating | None
    score: int = 0
    reasons: list[Reason | None] = field(default_factory=list)
    comment: str = ""


@dataclass(frozen=True)
class FeedbackFilter:
    rating: Rating | None = None
    reason: Reason | None = None
    user_id: str = ""
    conversation_id: str = ""
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class FeedbackPage:
    items: list[Feedback]
    next_page_token: str


@dataclass(frozen=True)
class DayCount:
    day: str  # YYYY-MM-DD, UTC
    positive: int
    negative: int


@dataclass(frozen=True)
class FeedbackStats:
    start: datetime
    end: datetime
    total: int
    positive: int
    negative: int
    average_score: float
    by_reason: list[tuple[Reason, int]]
    by_day: list[DayCount]

    @property
    def positive_ratio(self) -> float:
        return self.positive / self.total if self.total else 0.0


def _validate(submission: Submission) -> uuid.UUID:
    violations = Violations()
    message_id = parse_uuid(submission.message_id)
    if message_id is None:
        violations.add("message_id", "must be a message id (a UUID)")
    if submission.rating is None:
        violations.add("rating", "is required: thumbs up or thumbs down")
    if not (submission.score == 0 or 1 <= submission.score <= 5):
        violations.add("score", "must be from 1 to 5, or 0 when not given")
    if any(reason is None for reason in submission.reasons):
        violations.add("reasons", "contains an unknown reason")
    if len(submission.comment) > MAX_COMMENT_CHARS:
        violations.add("comment", f"must be at most {MAX_COMMENT_CHARS} characters")
    violations.raise_if_any()
    assert message_id is not None
    return message_id


def _not_found() -> NotFound:
    return NotFound("message not found", reason="MESSAGE_NOT_FOUND")


class FeedbackService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], events: EventRecorder) -> None:
        self._sessions = sessions
        self._events = events

    async def submit(self, principal: Principal, submission: Submission) -> tuple[Feedback, bool]:
        """Store the caller's feedback on one of their assistant messages; (feedback, created)."""
        message_id = _validate(submission)
        try:
            feedback, created = await self._upsert(principal, message_id, submission)
        except IntegrityError:
            # A concurrent first submission won the insert: this one becomes the update.
            feedback, created = await self._upsert(principal, message_id, submission)
        self._events.record(
            EventKind.FEEDBACK,
            user_id=principal.user_id,
            code=feedback.rating,
            success=True,
            data={"score": feedback.score, "created": created},
        )
        return feedback, created

    async def _upsert(
        self, principal: Principal, message_id: uuid.UUID, submission: Submission
    ) -> tuple[Feedback, bool]:
        async with self._sessions.begin() as s:
            owned = await s.scalar(
                select(Message.conversation_id)
                .join(Conversation, Conversation.id == Message.conversation_id)
                .where(
                    Message.id == message_id,
                    Message.role == "assistant",
                    Conversation.user_id == principal.user_id,
                )
            )
            if owned is None:  # missing, someone else's, or not an answer: all look the same
                raise _not_found()
            feedback = await s.scalar(
                select(Feedback).where(
                    Feedback.user_id == principal.user_id, Feedback.message_id == message_id
                )
            )
            created = feedback is None
            now = utcnow()
            if feedback is None:
                feedback = Feedback(
                    message_id=message_id,
                    conversation_id=owned,
                    user_id=principal.user_id,
                    created_at=now,
                )
                s.add(feedback)
            assert submission.rating is not None
            feedback.rating = submission.rating.value
            feedback.score = submission.score or None
            feedback.reasons = sorted({r.value for r in submission.reasons if r is not None})
            feedback.comment = submission.comment
            feedback.updated_at = now
        return feedback, created

    async def mine(
        self, principal: Principal, message_ids: Collection[uuid.UUID]
    ) -> dict[uuid.UUID, Feedback]:
        """The caller's own feedback on these messages, by message id."""
        if not message_ids:
            return {}
        async with self._sessions() as s:
            rows = await s.scalars(
                select(Feedback).where(
                    Feedback.user_id == principal.user_id, Feedback.message_id.in_(message_ids)
                )
            )
            return {feedback.message_id: feedback for feedback in rows}

    async def list(self, size: int, token: str, where: FeedbackFilter) -> FeedbackPage:
        """All users' feedback, newest first (by when it was first given), filtered."""
        limit = page_size(size)
        cursor = decode_cursor(token)
        query = select(Feedback).order_by(Feedback.created_at.desc(), Feedback.id.desc())
        if where.rating is not None:
            query = query.where(Feedback.rating == where.rating.value)
        if where.user_id:
            query = query.where(Feedback.user_id == require_uuid(where.user_id, field="user_id"))
        if where.conversation_id:
            cid = require_uuid(where.conversation_id, field="conversation_id")
            query = query.where(Feedback.conversation_id == cid)
        query = _in_range(query, where.start, where.end)
        if cursor is not None:
            query = query.where(
                or_(
                    Feedback.created_at < cursor.at,
                    and_(Feedback.created_at == cursor.at, Feedback.id < cursor.id),
                )
            )
        if where.reason is not None:
            query = query.where(_lists(where.reason))
        async with self._sessions() as s:
            rows = list((await s.scalars(query.limit(limit + 1))).all())
        return FeedbackPage(*split_page(rows, limit))

    async def stats(self, start: datetime | None, end: datetime | None) -> FeedbackStats:
        """Totals, ratio, mean score, counts by reason and by UTC day over [start, end)."""
        end = end or utcnow()
        start = start or end - timedelta(days=DEFAULT_STATS_DAYS)
        if start >= end:
            raise InvalidArgument.of("start_time", "must be before end_time")
        positive = func.sum(case((Feedback.rating == Rating.THUMBS_UP.value, 1), else_=0))
        negative = func.sum(case((Feedback.rating == Rating.THUMBS_DOWN.value, 1), else_=0))
        in_range = and_(Feedback.created_at >= start, Feedback.created_at < end)
        async with self._sessions() as s:
            dialect = s.get_bind().dialect.name
            total, ups, downs, mean = (
                await s.execute(
                    select(
                        func.count(Feedback.id), positive, negative, func.avg(Feedback.score)
                    ).where(in_range)
                )
            ).one()
            day = utc_day(Feedback.created_at, dialect)
            days = (
                await s.execute(
                    select(day, positive, negative).where(in_range).group_by(day).order_by(day)
                )
            ).all()
            counts = (
                await s.execute(
                    select(*(func.sum(case((_lists(r), 1), else_=0)) for r in Reason)).where(
                        in_range
                    )
                )
            ).one()
        by_reason = sorted(
            ((r, int(n or 0)) for r, n in zip(Reason, counts, strict=True) if n),
            key=lambda item: (-item[1], item[0].value),
        )
        return FeedbackStats(
            start=start,
            end=end,
            total=int(total or 0),
            positive=int(ups or 0),
            negative=int(downs or 0),
            average_score=float(mean or 0.0),
            by_reason=by_reason,
            by_day=[DayCount(str(d), int(p), int(n)) for d, p, n in days],
        )


def _lists(reason: Reason) -> ColumnElement[bool]:
    """Whether a feedback lists `reason`: its JSON list, as text, holds the quoted value
    (reasons are a closed set of plain words, so this matches exactly on both databases)."""
    return cast(Feedback.reasons, String).like(f'%"{reason.value}"%')


def _in_range(
    query: Select[Feedback], start: datetime | None, end: datetime | None
) -> Select[Feedback]:
    if start is not None and end is not None and start >= end:
        raise InvalidArgument.of("start_time", "must be before end_time")
    if start is not None:
        query = query.where(Feedback.created_at >= start)
    if end is not None:
        query = query.where(Feedback.created_at < end)
    return query
