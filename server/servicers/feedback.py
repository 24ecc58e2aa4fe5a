"""Feedback conversions (the FeedbackService servicer joins them with its issue)."""

from agentmesh.feedback.v1 import feedback_pb2 as feedback_pb

from server.servicers.timestamps import to_timestamp
from services.feedback.models import Feedback

RATING_TO_PROTO = {
    "thumbs_up": feedback_pb.RATING_THUMBS_UP,
    "thumbs_down": feedback_pb.RATING_THUMBS_DOWN,
}
REASON_TO_PROTO = {
    "wrong": feedback_pb.FEEDBACK_REASON_WRONG,
    "incomplete": feedback_pb.FEEDBACK_REASON_INCOMPLETE,
    "bad_citation": feedback_pb.FEEDBACK_REASON_BAD_CITATION,
    "harmful": feedback_pb.FEEDBACK_REASON_HARMFUL,
    "other": feedback_pb.FEEDBACK_REASON_OTHER,
}


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
