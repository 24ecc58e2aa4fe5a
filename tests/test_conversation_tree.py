"""Conversations as trees, end to end over gRPC with the scripted LLM: an edited question or
a regenerated answer is a sibling branch, the active leaf decides what GetConversation
shows and what the next question follows, the agent's history is the active branch only,
SwitchBranch moves between branches, feedback stays on its message, search finds
conversations by title and text; and the migration turns old conversations into one branch
each."""

from __future__ import annotations  # the Async stub types exist only in the .pyi files

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import grpc
import pytest
from agentmesh.agent.v1 import agent_pb2
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.feedback.v1 import feedback_pb2 as fb
from agentmesh.feedback.v1 import feedback_service_pb2 as fb_service
from agentmesh.feedback.v1 import feedback_service_pb2_grpc as fb_grpc
from sqlalchemy import insert, select

from server import migrations
from server.main import Application
from services.agent.models import Conversation, Message
from services.auth.models import User
from services.auth.principal import Role
from services.db import create_engine
from tests.agent import of_kind
from tests.backends import Database
from tests.fake_llm import JSON, FakeLlm, Script
from tests.harness import Account, Stubs, new_user, running_app
from tests.rpc_errors import field_violations

USER, ASSISTANT = agent_pb2.MESSAGE_ROLE_USER, agent_pb2.MESSAGE_ROLE_ASSISTANT


@pytest.fixture(scope="module")
async def tree_app(
    database: Database, llm: FakeLlm, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Application, Stubs]]:
    async with running_app(
        database.url,
        tmp_path_factory.mktemp("tree"),
        llm_base_url=llm.base_url,
        llm_model="scripted-model",
        llm_max_retries=0,
        intent_confidence=1.01,  # the (scripted) LLM classifies every question
    ) as running:
        yield running


def numbered_answers() -> Script:
    """Answers that say which synthesis request they were (1, 2, ...): every answer differs."""
    seen = {"n": 0}

    def answer(body: JSON) -> str:
        seen["n"] += 1
        return f"Answer number {seen['n']}."

    return Script(intent="follow_up", answer=answer)


@pytest.fixture
async def agent_stubs(tree_app: tuple[Application, Stubs], llm: FakeLlm) -> Stubs:
    llm.reset(numbered_answers())
    return tree_app[1]


async def ask(stubs: Stubs, account: Account, **fields: str) -> agent_pb.RunStarted:
    """A streamed run to its end; its RunStarted."""
    request = agent_pb.StreamQueryRequest(**fields)
    events = [e async for e in stubs.agent.StreamQuery(request, metadata=account.metadata)]
    assert of_kind(events, "completed"), events
    (started,) = of_kind(events, "run_started")
    return cast(agent_pb.RunStarted, started)


async def detail(stubs: Stubs, account: Account, cid: str) -> agent_pb.GetConversationResponse:
    return await stubs.agent.GetConversation(
        agent_pb.GetConversationRequest(conversation_id=cid), metadata=account.metadata
    )


def path_of(
    conversation: agent_pb.GetConversationResponse | agent_pb.SwitchBranchResponse,
) -> list[tuple[int, str]]:
    return [(m.role, m.content) for m in conversation.messages]


def history_seen(llm: FakeLlm) -> str:
    """Everything the last synthesis request gave the model."""
    return json.dumps(llm.requests_of("stream")[-1]["messages"])


async def test_edit_and_regenerate_add_branches_and_history_follows_the_active_one(
    agent_stubs: Stubs, llm: FakeLlm
) -> None:
    stubs = agent_stubs
    me = await new_user(stubs, "tree")
    first = await ask(stubs, me, query="What cools the Zephyr reactor?")
    cid = first.conversation_id
    second = await ask(stubs, me, query="And who designed it?", conversation_id=cid)
    before = await detail(stubs, me, cid)
    assert [m.message_id for m in before.messages] == [
        first.user_message_id,
        first.assistant_message_id,
        second.user_message_id,
        second.assistant_message_id,
    ]
    assert [m.parent_message_id for m in before.messages] == [
        "",
        first.user_message_id,
        first.assistant_message_id,
        second.user_message_id,
    ]
    assert before.conversation.active_message_id == second.assistant_message_id
    assert all(list(m.sibling_message_ids) == [m.message_id] for m in before.messages)

    # Regenerate the second answer: the same question, a new answer beside the old one.
    again = await ask(
        stubs, me, conversation_id=cid, regenerate_message_id=second.assistant_message_id
    )
    assert again.user_message_id == second.user_message_id
    assert not again.conversation_created
    seen = history_seen(llm)
    assert "What cools the Zephyr reactor?" in seen and "And who designed it?" in seen
    assert "Answer number 2." not in seen  # the answer being replaced is not history
    regenerated = await detail(stubs, me, cid)
    assert [m.message_id for m in regenerated.messages][-1] == again.assistant_message_id
    assert list(regenerated.messages[-1].sibling_message_ids) == [
        second.assistant_message_id,
        again.assistant_message_id,
    ]
    assert regenerated.conversation.message_count == 5

    # Edit the second question: a new question beside it, answered from the first exchange.
    edited = await ask(
        stubs,
        me,
        query="Where was it built?",
        conversation_id=cid,
        edit_message_id=second.user_message_id,
    )
    seen = history_seen(llm)
    assert "Where was it built?" in seen and "What cools the Zephyr reactor?" in seen
    assert "And who designed it?" not in seen  # the other branch is not history
    on_edit = await detail(stubs, me, cid)
    assert path_of(on_edit)[2:] == [(USER, "Where was it built?"), (ASSISTANT, "Answer number 4.")]
    assert on_edit.messages[2].parent_message_id == first.assistant_message_id
    assert list(on_edit.messages[2].sibling_message_ids) == [
        second.user_message_id,
        edited.user_message_id,
    ]

    # Back to the first version of the question: its newest answer is the leaf.
    switched = await stubs.agent.SwitchBranch(
        agent_pb.SwitchBranchRequest(conversation_id=cid, message_id=second.user_message_id),
        metadata=me.metadata,
    )
    assert switched.conversation.active_message_id == again.assistant_message_id
    assert [m.message_id for m in switched.messages][2:] == [
        second.user_message_id,
        again.assistant_message_id,
    ]
    assert path_of(await detail(stubs, me, cid)) == path_of(switched)

    # The next question follows the active leaf, with that branch as its history.
    follow = await ask(stubs, me, query="How hot does it run?", conversation_id=cid)
    seen = history_seen(llm)
    assert "Answer number 3." in seen and "Where was it built?" not in seen
    final = await detail(stubs, me, cid)
    assert final.messages[-2].parent_message_id == again.assistant_message_id
    assert final.conversation.active_message_id == follow.assistant_message_id
    assert final.conversation.message_count == 9


async def test_feedback_stays_on_the_answer_it_was_given_to(agent_stubs: Stubs) -> None:
    stubs = agent_stubs
    me = await new_user(stubs, "tree-feedback")
    first = await ask(stubs, me, query="Tell me about sodium cooling.")
    cid = first.conversation_id
    await fb_grpc.FeedbackServiceStub(stubs.channel).SubmitFeedback(
        fb_service.SubmitFeedbackRequest(
            message_id=first.assistant_message_id, rating=fb.RATING_THUMBS_UP
        ),
        metadata=me.metadata,
    )
    again = await ask(
        stubs, me, conversation_id=cid, regenerate_message_id=first.assistant_message_id
    )
    assert not (await detail(stubs, me, cid)).messages[-1].HasField("feedback")
    back = await stubs.agent.SwitchBranch(
        agent_pb.SwitchBranchRequest(conversation_id=cid, message_id=first.assistant_message_id),
        metadata=me.metadata,
    )
    assert back.messages[-1].message_id == first.assistant_message_id
    assert back.messages[-1].feedback.rating == fb.RATING_THUMBS_UP
    assert list(back.messages[-1].sibling_message_ids) == [
        first.assistant_message_id,
        again.assistant_message_id,
    ]


async def refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_a_branch_that_does_not_fit_is_refused_and_stores_nothing(agent_stubs: Stubs) -> None:
    stubs = agent_stubs
    me = await new_user(stubs, "tree-errors")
    other = await new_user(stubs, "tree-other")
    mine = await ask(stubs, me, query="A first question.")
    theirs = await ask(stubs, other, query="Someone else's question.")
    cid = mine.conversation_id

    def run(**fields: str) -> object:
        request = agent_pb.QueryRequest(**fields)
        return stubs.agent.Query(request, metadata=me.metadata)

    cases = {
        "edit_message_id": run(
            query="x", conversation_id=cid, edit_message_id=mine.assistant_message_id
        ),
        "regenerate_message_id": run(
            conversation_id=cid, regenerate_message_id=mine.user_message_id
        ),
        "query": run(
            query="x", conversation_id=cid, regenerate_message_id=mine.assistant_message_id
        ),
        "conversation_id": run(query="x", edit_message_id=mine.user_message_id),
    }
    for field, call in cases.items():
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(error), (field, error.details())
    both = await refused(
        run(
            conversation_id=cid,
            edit_message_id=mine.user_message_id,
            regenerate_message_id=mine.assistant_message_id,
        )
    )
    assert both.code() == grpc.StatusCode.INVALID_ARGUMENT
    malformed = await refused(run(query="x", conversation_id=cid, edit_message_id="nope"))
    assert "edit_message_id" in field_violations(malformed)
    # A message of another conversation (someone else's) is not in this one.
    foreign = await refused(
        run(query="x", conversation_id=cid, edit_message_id=theirs.user_message_id)
    )
    assert foreign.code() == grpc.StatusCode.NOT_FOUND
    switch_foreign = await refused(
        stubs.agent.SwitchBranch(
            agent_pb.SwitchBranchRequest(conversation_id=cid, message_id=theirs.user_message_id),
            metadata=me.metadata,
        )
    )
    assert switch_foreign.code() == grpc.StatusCode.NOT_FOUND
    not_mine = await refused(
        stubs.agent.SwitchBranch(
            agent_pb.SwitchBranchRequest(
                conversation_id=theirs.conversation_id, message_id=theirs.user_message_id
            ),
            metadata=me.metadata,
        )
    )
    assert not_mine.code() == grpc.StatusCode.NOT_FOUND
    after = await detail(stubs, me, cid)
    assert after.conversation.message_count == 2
    assert after.conversation.active_message_id == mine.assistant_message_id


async def test_search_finds_titles_and_message_text_of_the_callers_conversations(
    agent_stubs: Stubs, tree_app: tuple[Application, Stubs]
) -> None:
    stubs = agent_stubs
    me = await new_user(stubs, "tree-search")
    other = await new_user(stubs, "tree-search-other")
    reactor = await ask(stubs, me, query="How is the reactor cooled?")
    await ask(stubs, me, query="The sodium loop runs hot", conversation_id=reactor.conversation_id)
    await ask(stubs, me, query="Lunch menu for Friday")
    await ask(stubs, other, query="Another reactor question")

    async def found(query: str) -> list[str]:
        page = await stubs.agent.ListConversations(
            agent_pb.ListConversationsRequest(query=query), metadata=me.metadata
        )
        return [c.conversation_id for c in page.conversations]

    assert await found("reactor") == [reactor.conversation_id]  # a title
    assert await found("sodium LOOP") == [reactor.conversation_id]  # message text, any case
    assert await found("sodium lunch") == []  # every word, in one title or message
    assert len(await found("")) == 2
    assert await found("100%_") == []  # LIKE's wildcards are plain characters
    if tree_app[0].settings.resolved_database_url.startswith("postgresql"):
        assert await found("reactors cooling") == [reactor.conversation_id]  # stemming
    too_long = await refused(
        stubs.agent.ListConversations(
            agent_pb.ListConversationsRequest(query="x" * 201), metadata=me.metadata
        )
    )
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_migration_makes_each_old_conversation_one_branch(
    database: Database, tmp_path: Path
) -> None:
    """Rows written at revision 0005 (the tables' columns of then, through their typed
    columns) come out of 0006 as a chain, the newest message the active leaf."""
    db = Database(database.backend, tmp_path)
    url = await db.create()
    try:
        await asyncio.to_thread(migrations.upgrade, url, "0005")
        engine = create_engine(url)
        user, cid = uuid.uuid4(), uuid.uuid4()
        ids = [uuid.uuid4() for _ in range(4)]
        start = datetime(2026, 1, 1, tzinfo=UTC)
        async with engine.begin() as connection:
            await connection.execute(
                insert(User).values(
                    id=user, email="old@example.com", full_name="Old", password_hash="x",
                    kind="person", role=Role.USER, created_at=start, updated_at=start,
                )
            )  # fmt: skip
            await connection.execute(
                insert(Conversation).values(
                    id=cid, user_id=user, title="Old", created_at=start, updated_at=start
                )
            )
            for n, mid in enumerate(ids):
                await connection.execute(
                    insert(Message).values(
                        id=mid, conversation_id=cid, role=("user", "assistant")[n % 2],
                        content=f"message {n}", citations=[], tool_calls=[], prompt_tokens=0,
                        completion_tokens=0, created_at=start + timedelta(seconds=n),
                    )
                )  # fmt: skip
        await asyncio.to_thread(migrations.upgrade, url)
        async with engine.connect() as connection:
            parents = dict((await connection.execute(select(Message.id, Message.parent_id))).all())
            active = await connection.scalar(select(Conversation.active_message_id))
        await engine.dispose()
        assert parents == {ids[0]: None, ids[1]: ids[0], ids[2]: ids[1], ids[3]: ids[2]}
        assert active == ids[-1]
    finally:
        await db.drop()
