"""FeedbackService: users' judgements of answers, and the administrators' view of them."""

from typing import Any

from agentmesh.feedback.v1 import feedback_pb2 as feedback_pb
from agentmesh.feedback.v1 import feedback_service_pb2 as service_pb
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as feedback_grpc

from server.request_context import current_principal
from server.servicers.timestamps import optional_time, to_timestamp
from services.errors import InvalidArgument
from services.feedback.models import Feedback
from services.feedback.service import (
    FeedbackFilter,
    FeedbackService,
    Rating,
    Reason,
    Submission,
)

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


def _filter(request: service_pb.ListFeedbackRequest) -> FeedbackFilter:
    if request.rating and request.rating not in RATING_FROM_PROTO:
        raise InvalidArgument.of("rating", "is not a known rating")
    if request.reason and request.reason not in REASON_FROM_PROTO:
        raise InvalidArgument.of("reason", "is not a known reason")
    return FeedbackFilter(
        rating=RATING_FROM_PROTO.get(request.rating),
        reason=REASON_FROM_PROTO.get(request.reason),
        user_id=request.user_id,
        conversation_id=request.conversation_id,
        start=optional_time(request, "start_time"),
        end=optional_time(request, "end_time"),
    )


class FeedbackServicer(feedback_grpc.FeedbackServiceServicer):
    def __init__(self, feedback: FeedbackService) -> None:
        self._feedback = feedback

    async def SubmitFeedback(
        self, request: service_pb.SubmitFeedbackRequest, context: Any
    ) -> service_pb.SubmitFeedbackResponse:
        submission = Submission(
            message_id=request.message_id,
            rating=RATING_FROM_PROTO.get(request.rating),
            score=request.score,
            reasons=[REASON_FROM_PROTO.get(r) for r in request.reasons],
            comment=request.comment,
        )
        feedback, created = await self._feedback.submit(current_principal(), submission)
        return service_pb.SubmitFeedbackResponse(
            feedback=feedback_to_proto(feedback), created=created
        )

    async def ListFeedback(
        self, request: service_pb.ListFeedbackRequest, context: Any
    ) -> service_pb.ListFeedbackResponse:
        page = await self._feedback.list(request.page_size, request.page_token, _filter(request))
        return service_pb.ListFeedbackResponse(
            feedback=[feedback_to_proto(f) for f in page.items],
            next_page_token=page.next_page_token,
        )

    async def GetFeedbackStats(
        self, request: service_pb.GetFeedbackStatsRequest, context: Any
    ) -> service_pb.GetFeedbackStatsResponse:
        stats = await self._feedback.stats(
            optional_time(request, "start_time"), optional_time(request, "end_time")
        )
        return service_pb.GetFeedbackStatsResponse(
            total=stats.total,
            positive=stats.positive,
            negative=stats.negative,
            positive_ratio=stats.positive_ratio,
            average_score=stats.average_score,
            by_reason=[
                service_pb.ReasonCount(reason=REASON_TO_PROTO[r.value], count=n)
                for r, n in stats.by_reason
            ],
            by_day=[
                service_pb.DailyFeedback(date=d.day, positive=d.positive, negative=d.negative)
                for d in stats.by_day
            ],
            start_time=to_timestamp(stats.start),
            end_time=to_timestamp(stats.end),
        )
