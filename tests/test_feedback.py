"""FeedbackService against the real server on SQLite and PostgreSQL: answers come from the
agent in extractive mode (the shared application has no LLM)."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import uuid
from datetime import UTC, datetime
from typing import cast

import aiohttp
import grpc
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.feedback.v1 import feedback_pb2 as fb
from agentmesh.feedback.v1 import feedback_service_pb2 as fb_service
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from google.protobuf.timestamp_pb2 import Timestamp

from server.main import Application
from services.feedback.models import Feedback
from tests.harness import Account, Stubs, new_admin, new_user
from tests.rpc_errors import error_info, field_violations


@pytest.fixture(scope="session")
def feedback(stubs: Stubs) -> fb_grpc.FeedbackServiceAsyncStub:
    return fb_grpc.FeedbackServiceStub(stubs.channel)


async def answer(stubs: Stubs, account: Account, question: str = "hello") -> agent_pb.QueryResponse:
    reply: agent_pb.QueryResponse = await stubs.agent.Query(
        agent_pb.QueryRequest(query=question), metadata=account.metadata
    )
    return reply


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


async def test_submitting_again_replaces_the_feedback_and_shows_in_the_conversation(
    stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    user = await new_user(stubs)
    reply = await answer(stubs, user)
    first = await feedback.SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=reply.message.message_id,
            rating=fb.RATING_THUMBS_DOWN,
            reasons=[fb.FEEDBACK_REASON_WRONG, fb.FEEDBACK_REASON_INCOMPLETE],
            comment="Not what I asked.",
            score=2,
        ),
        metadata=user.metadata,
    )
    assert first.created and first.feedback.conversation_id == reply.conversation_id
    second = await feedback.SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=reply.message.message_id, rating=fb.RATING_THUMBS_UP, score=5
        ),
        metadata=user.metadata,
    )
    assert not second.created
    assert second.feedback.feedback_id == first.feedback.feedback_id
    assert second.feedback.rating == fb.RATING_THUMBS_UP and second.feedback.score == 5
    assert list(second.feedback.reasons) == [] and second.feedback.comment == ""
    assert second.feedback.created_at == first.feedback.created_at

    stored = await stubs.agent.GetConversation(
        agent_pb.GetConversationRequest(conversation_id=reply.conversation_id),
        metadata=user.metadata,
    )
    question, answered = stored.messages
    assert not question.HasField("feedback")
    assert answered.role == agent_pb2.MESSAGE_ROLE_ASSISTANT
    assert answered.feedback == second.feedback


async def test_feedback_on_someone_elses_or_a_missing_message_is_not_found(
    stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    owner, other = await new_user(stubs), await new_user(stubs)
    reply = await answer(stubs, owner)
    for account, message_id in [
        (other, reply.message.message_id),  # someone else's answer
        (owner, reply.user_message_id),  # the owner's own question, not an answer
        (owner, str(uuid.uuid4())),  # no such message
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await feedback.SubmitFeedback(
                fb_service.SubmitFeedbackRequest(message_id=message_id, rating=fb.RATING_THUMBS_UP),
                metadata=account.metadata,
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert error_info(caught.value).reason == "MESSAGE_NOT_FOUND"


async def test_invalid_feedback_names_every_bad_field(
    stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    user = await new_user(stubs)
    request = fb_service.SubmitFeedbackRequest(
        message_id="not-a-uuid",
        score=6,
        reasons=[cast(fb.FeedbackReason.ValueType, 99)],  # a value the enum does not know
        comment="x" * 2001,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feedback.SubmitFeedback(request, metadata=user.metadata)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(caught.value)) == {
        "message_id",
        "rating",
        "score",
        "reasons",
        "comment",
    }


async def test_concurrent_submissions_keep_one_feedback(
    stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    user = await new_user(stubs)
    reply = await answer(stubs, user)
    request = fb_service.SubmitFeedbackRequest(
        message_id=reply.message.message_id, rating=fb.RATING_THUMBS_UP
    )
    results = await asyncio.gather(
        *(feedback.SubmitFeedback(request, metadata=user.metadata) for _ in range(8))
    )
    assert sum(r.created for r in results) == 1
    assert len({r.feedback.feedback_id for r in results}) == 1


async def test_listing_and_stats_are_for_administrators(
    stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    user = await new_user(stubs)
    for call in (
        feedback.ListFeedback(fb_service.ListFeedbackRequest(), metadata=user.metadata),
        feedback.GetFeedbackStats(fb_service.GetFeedbackStatsRequest(), metadata=user.metadata),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def seed(
    app: Application, message: agent_pb.QueryResponse, user_id: str, **fields: object
) -> None:
    """A feedback row with a chosen time, on a real message (the API always stamps now)."""
    async with app.domain.sessions.begin() as s:
        s.add(
            Feedback(
                message_id=uuid.UUID(message.message.message_id),
                conversation_id=uuid.UUID(message.conversation_id),
                user_id=uuid.UUID(user_id),
                updated_at=fields["created_at"],
                **fields,
            )
        )


async def test_list_filters_and_pages_newest_first(
    app: Application, stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    alice, bob = await new_user(stubs), await new_user(stubs)
    base = datetime(2003, 5, 1, tzinfo=UTC)
    rows = []
    for n, (who, rating, reasons) in enumerate(
        [
            (alice, "thumbs_up", []),
            (alice, "thumbs_down", ["wrong"]),
            (bob, "thumbs_down", ["bad_citation", "wrong"]),
            (bob, "thumbs_up", ["other"]),
        ]
    ):
        reply = await answer(stubs, who, f"question {n}")
        created = base.replace(hour=n)
        await seed(app, reply, who.user_id, rating=rating, reasons=reasons, created_at=created)
        rows.append((who, reply))

    async def listed(**filters: object) -> list[str]:
        request = fb_service.ListFeedbackRequest(
            start_time=ts(base),
            end_time=ts(base.replace(day=2)),
            **filters,  # type: ignore[arg-type]
        )
        page = await feedback.ListFeedback(request, metadata=admin.metadata)
        return [f.message_id for f in page.feedback]

    ids = [reply.message.message_id for _, reply in rows]
    assert await listed() == ids[::-1]
    assert await listed(rating=fb.RATING_THUMBS_DOWN) == [ids[2], ids[1]]
    assert await listed(reason=fb.FEEDBACK_REASON_WRONG) == [ids[2], ids[1]]
    assert await listed(reason=fb.FEEDBACK_REASON_OTHER) == [ids[3]]
    assert await listed(user_id=alice.user_id) == [ids[1], ids[0]]
    assert await listed(conversation_id=rows[2][1].conversation_id) == [ids[2]]
    first = await feedback.ListFeedback(
        fb_service.ListFeedbackRequest(
            page_size=3, start_time=ts(base), end_time=ts(base.replace(day=2))
        ),
        metadata=admin.metadata,
    )
    rest = await feedback.ListFeedback(
        fb_service.ListFeedbackRequest(
            page_size=3,
            page_token=first.next_page_token,
            start_time=ts(base),
            end_time=ts(base.replace(day=2)),
        ),
        metadata=admin.metadata,
    )
    assert [f.message_id for f in [*first.feedback, *rest.feedback]] == ids[::-1]
    assert rest.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feedback.ListFeedback(
            fb_service.ListFeedbackRequest(user_id="nope"), metadata=admin.metadata
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Deleting a conversation deletes its feedback.
    await stubs.agent.DeleteConversation(
        agent_pb.DeleteConversationRequest(conversation_id=rows[2][1].conversation_id),
        metadata=bob.metadata,
    )
    assert await listed(conversation_id=rows[2][1].conversation_id) == []


async def test_stats_are_exact_over_a_range_with_day_boundaries(
    app: Application, stubs: Stubs, feedback: fb_grpc.FeedbackServiceAsyncStub
) -> None:
    admin = await new_admin(app, stubs)
    user = await new_user(stubs)
    start, end = datetime(1999, 12, 30, tzinfo=UTC), datetime(2000, 1, 2, tzinfo=UTC)
    seeded = [
        (datetime(1999, 12, 29, 23, 59, 59, tzinfo=UTC), "thumbs_up", None, []),  # before
        (start, "thumbs_up", 5, []),  # the first instant counts
        (datetime(1999, 12, 30, 23, 59, 59, tzinfo=UTC), "thumbs_down", 1, ["wrong"]),
        (datetime(1999, 12, 31, 0, 0, 0, tzinfo=UTC), "thumbs_down", None, ["wrong", "harmful"]),
        (datetime(2000, 1, 1, 12, 0, tzinfo=UTC), "thumbs_up", 3, ["other"]),
        (end, "thumbs_down", 1, ["wrong"]),  # the end is exclusive
    ]
    for n, (created, rating, score, reasons) in enumerate(seeded):
        reply = await answer(stubs, user, f"stats question {n}")
        await seed(
            app,
            reply,
            user.user_id,
            rating=rating,
            score=score,
            reasons=reasons,
            created_at=created,
        )
    stats = await feedback.GetFeedbackStats(
        fb_service.GetFeedbackStatsRequest(start_time=ts(start), end_time=ts(end)),
        metadata=admin.metadata,
    )
    assert (stats.total, stats.positive, stats.negative) == (4, 2, 2)
    assert stats.positive_ratio == pytest.approx(0.5)
    assert stats.average_score == pytest.approx((5 + 1 + 3) / 3)
    assert [(r.reason, r.count) for r in stats.by_reason] == [
        (fb.FEEDBACK_REASON_WRONG, 2),
        (fb.FEEDBACK_REASON_HARMFUL, 1),
        (fb.FEEDBACK_REASON_OTHER, 1),
    ]
    assert [(d.date, d.positive, d.negative) for d in stats.by_day] == [
        ("1999-12-30", 1, 1),
        ("1999-12-31", 0, 1),
        ("2000-01-01", 1, 0),
    ]
    assert stats.start_time == ts(start) and stats.end_time == ts(end)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await feedback.GetFeedbackStats(
            fb_service.GetFeedbackStatsRequest(start_time=ts(end), end_time=ts(start)),
            metadata=admin.metadata,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_feedback_over_rest(stubs: Stubs, rest: aiohttp.ClientSession) -> None:
    user = await new_user(stubs)
    reply = await answer(stubs, user)
    async with rest.post(
        "/v1/feedback",
        json={"message_id": reply.message.message_id, "rating": "RATING_THUMBS_UP", "score": 4},
        headers={"authorization": f"Bearer {user.access_token}"},
    ) as response:
        body = await response.json()
    assert response.status == 200 and body["created"] is True
    assert body["feedback"]["rating"] == "RATING_THUMBS_UP" and body["feedback"]["score"] == 4
