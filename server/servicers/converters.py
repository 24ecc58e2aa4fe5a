"""Converters of the messages that several servicers send: timestamps, users, feedback and
search results. A converter used by one servicer stays beside it."""

from datetime import UTC, datetime
from typing import Any, Protocol

from agentmesh.auth.v1 import user_pb2 as user_pb
from agentmesh.feedback.v1 import feedback_pb2 as feedback_pb
from agentmesh.knowledge.v1 import knowledge_pb2 as kb_pb
from google.protobuf.timestamp_pb2 import Timestamp

from services.auth.models import User
from services.auth.principal import Role
from services.errors import InvalidArgument
from services.feedback.models import Feedback
from services.feedback.service import Rating, Reason

ROLE_TO_PROTO = {Role.USER: user_pb.ROLE_USER, Role.ADMIN: user_pb.ROLE_ADMIN}
KIND_TO_PROTO = {"person": user_pb.USER_KIND_PERSON, "service": user_pb.USER_KIND_SERVICE}
RATING_FROM_PROTO = {
    feedback_pb.RATING_THUMBS_UP: Rating.THUMBS_UP,
    feedback_pb.RATING_THUMBS_DOWN: Rating.THUMBS_DOWN,
}
RATING_TO_PROTO = {rating.value: value for value, rating in RATING_FROM_PROTO.items()}
REASON_FROM_PROTO = {
    feedback_pb.FEEDBACK_REASON_WRONG: Reason.WRONG,
    feedback_pb.FEEDBACK_REASON_INCOMPLETE: Reason.INCOMPLETE,
    feedback_pb.FEEDBACK_REASON_BAD_CITATION: Reason.BAD_CITATION,
    feedback_pb.FEEDBACK_REASON_HARMFUL: Reason.HARMFUL,
    feedback_pb.FEEDBACK_REASON_OTHER: Reason.OTHER,
}
REASON_TO_PROTO = {reason.value: value for value, reason in REASON_FROM_PROTO.items()}
# Keyed by the legs' names: the knowledge service's `Leg` values and the agent tools'
# retrieval payload both use them.
LEG_TO_PROTO = {"dense": kb_pb.RETRIEVAL_LEG_DENSE, "sparse": kb_pb.RETRIEVAL_LEG_SPARSE}


def to_timestamp(value: datetime) -> Timestamp:
    # protobuf accepts datetimes at run time, but its type stubs do not.
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp


def optional_time(request: Any, name: str) -> datetime | None:
    """The aware UTC datetime in the request's Timestamp field `name`, None when unset;
    INVALID_ARGUMENT on that field when it lies outside years 1-9999."""
    if not request.HasField(name):
        return None
    value: Timestamp = getattr(request, name)
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.of(name, "is not a valid timestamp") from None


def user_to_proto(user: User) -> user_pb.User:
    return user_pb.User(
        user_id=str(user.id),
        email=user.email,
        full_name=user.full_name,
        role=ROLE_TO_PROTO[user.role],
        created_at=to_timestamp(user.created_at),
        updated_at=to_timestamp(user.updated_at),
        kind=KIND_TO_PROTO.get(user.kind, user_pb.USER_KIND_UNSPECIFIED),
        disabled=user.disabled_at is not None,
    )


def feedback_to_proto(feedback: Feedback) -> feedback_pb.Feedback:
    return feedback_pb.Feedback(
        feedback_id=str(feedback.id),
        message_id=str(feedback.message_id),
        conversation_id=str(feedback.conversation_id),
        user_id=str(feedback.user_id),
        rating=RATING_TO_PROTO.get(feedback.rating, feedback_pb.RATING_UNSPECIFIED),
        score=feedback.score or 0,
        reasons=[REASON_TO_PROTO[r] for r in feedback.reasons if r in REASON_TO_PROTO],
        comment=feedback.comment,
        created_at=to_timestamp(feedback.created_at),
        updated_at=to_timestamp(feedback.updated_at),
    )


class SearchHit(Protocol):
    """What a search result is made from: a knowledge-base `Passage`, or the passage an
    agent tool reports in its retrieval event."""

    @property
    def chunk_id(self) -> str: ...
    @property
    def document_id(self) -> object: ...
    @property
    def document_title(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def page(self) -> int: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def chunk_index(self) -> int: ...
    @property
    def legs(self) -> frozenset[str]: ...


def search_result_to_proto(hit: SearchHit) -> kb_pb.SearchResult:
    return kb_pb.SearchResult(
        chunk_id=hit.chunk_id,
        document_id=str(hit.document_id),
        document_title=hit.document_title,
        text=hit.text,
        score=hit.score,
        page=hit.page,
        start_offset=hit.start,
        end_offset=hit.end,
        chunk_index=hit.chunk_index,
        legs=sorted(LEG_TO_PROTO[leg] for leg in hit.legs),
    )
