"""FeedbackService: users' judgements of answers, and the administrators' view of them."""

from typing import Any

from agentmesh.feedback.v1 import feedback_service_pb2 as service_pb
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as feedback_grpc

from server.request_context import current_principal
from server.servicers.converters import (
    RATING_FROM_PROTO,
    REASON_FROM_PROTO,
    REASON_TO_PROTO,
    feedback_to_proto,
    optional_time,
    to_timestamp,
)
from services.errors import InvalidArgument
from services.feedback.service import (
    FeedbackFilter,
    FeedbackService,
    Submission,
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
