"""Raw-bytes and field fuzzing of every gRPC method (issue 16; RELIABILITY.md item 11).

(a) Random bytes, and bytes near a valid encoding (cut short, flipped, lengths and varints
    inflated, junk appended), sent through a generic channel call with no stub, without a
    token and with the caller the method is for: never UNKNOWN or INTERNAL, no Python
    exception, class or path in the message, and every error a google.rpc.Status with
    ErrorInfo.
(b) Requests built from the descriptor by hypothesis (tests/attack.py message_strategy:
    unicode and huge strings, extreme and negative ints, NaN, enum numbers the enum does
    not have, nested messages, timestamps out of range) sent with a valid token (a user's,
    an administrator's for ADMIN methods, the service credential for SERVICE ones): the
    same checks, plus the in-band `error` events of streams.

The agent methods run for real on the default provider (extractive: no LLM is configured
on the shared application), so Query and StreamQuery fuzzing drives the whole graph, not
only validation. Examples are bounded (FUZZ_EXAMPLES, derandomized: the same run every
time) so the module stays within a couple of minutes on two cores.
"""

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from agentmesh.agent.v1 import agent_service_pb2 as agent_pb
from agentmesh.indexing.v1 import indexing_service_pb2 as indexing_pb
from agentmesh.knowledge.v1 import knowledge_service_pb2 as kb
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from server.access import RPC_ACCESS, Access
from server.main import Application
from tests.attack import (
    PYTHON_LEAK,
    SERVER_FAULTS,
    Outcome,
    bearer,
    contract_methods,
    invoke,
    message_class,
    message_strategy,
    method_path,
    mutated,
    refusal_problem,
    server_fault,
)
from tests.harness import Account, Stubs, new_admin, new_user

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)
HEALTH_CHECK = health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
# Health.Watch never ends and reflection is the one client stream: neither fits a unary
# or server-streaming call (the request check interceptor leaves client streams alone).
RAW_METHODS = [*contract_methods(), HEALTH_CHECK]
STRUCTURED_METHODS = contract_methods()
INTERNAL_CODES = {code.value[0] for code in SERVER_FAULTS}


@dataclass
class Caller:
    metadata: tuple[tuple[str, str], ...]
    ids: list[str]  # real ids the requests may name: the subject's user, its resources


@dataclass
class Callers:
    """Who calls what: per method a fresh subject user with a conversation, a run and a
    document (Logout, ChangePassword, deletes and quotas touch only that one), calling
    itself, or targeted by an administrator (ADMIN) or the service credential (SERVICE)."""

    app: Application
    stubs: Stubs
    admin: Account
    subjects: dict[str, tuple[Account, list[str]]] = field(default_factory=dict)

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "Callers(...)"

    async def _subject(self, path: str) -> tuple[Account, list[str]]:
        if path not in self.subjects:
            user = await new_user(self.stubs, "fuzz")
            reply = await self.stubs.agent.Query(
                agent_pb.QueryRequest(query="Hello there"), metadata=user.metadata
            )
            document = await self.stubs.kb.UploadDocument(
                kb.UploadDocumentRequest(filename="notes.txt", content=b"Fuzz notes."),
                metadata=user.metadata,
            )
            ids = [
                user.user_id,
                reply.conversation_id,
                reply.user_message_id,
                reply.message.message_id,
                reply.run_id,
                document.document.document_id,
            ]
            self.subjects[path] = (user, ids)
        return self.subjects[path]

    async def for_method(self, method: MethodDescriptor) -> Caller:
        if method is HEALTH_CHECK:
            return Caller((), [])
        path = method_path(method)
        access = RPC_ACCESS[path]
        user, ids = await self._subject(path)
        if access is Access.PUBLIC:
            return Caller((), ids)
        if access is Access.ADMIN:
            return Caller(self.admin.metadata, ids)
        if access is Access.SERVICE:
            return Caller(bearer(self.app.domain.service_token), ids)
        return Caller(user.metadata, ids)


@pytest.fixture(scope="module")
async def callers(app: Application, stubs: Stubs) -> AsyncIterator[Callers]:
    yield Callers(app, stubs, await new_admin(app, stubs))


def stream_error_problems(outcome: Outcome) -> list[str]:
    """In-band `error` events of a stream: a clean status too (REST clients see only these)."""
    problems = []
    for response in outcome.responses:
        if not isinstance(response, Message) or "error" not in response.DESCRIPTOR.fields_by_name:
            continue
        if response.WhichOneof("event") != "error":
            continue
        error: status_pb2.Status = response.error  # type: ignore[attr-defined]
        if error.code in INTERNAL_CODES:
            problems.append(f"{outcome.method}: an in-band error with code {error.code}")
        if leak := PYTHON_LEAK.search(error.message):
            problems.append(f"{outcome.method}: in-band error shows {leak.group(0)!r}")
        if not error.details:
            problems.append(f"{outcome.method}: in-band error without details")
    return problems


def _ids(methods: list[MethodDescriptor]) -> list[str]:
    return [method_path(m) for m in methods]


def raw_requests(method: MethodDescriptor, ids: list[str]) -> st.SearchStrategy[bytes]:
    valid = message_strategy(method.input_type, ids=ids).map(lambda m: m.SerializeToString())
    return st.one_of(st.binary(max_size=512), valid, valid.flatmap(mutated))


@pytest.mark.parametrize("method", RAW_METHODS, ids=_ids(RAW_METHODS))
@FUZZ
@given(data=st.data())
async def test_raw_bytes_never_break_the_server(
    callers: Callers, method: MethodDescriptor, data: st.DataObject
) -> None:
    caller = await callers.for_method(method)
    raw = data.draw(raw_requests(method, caller.ids), label="bytes")
    with_token = data.draw(st.booleans(), label="with the caller's token")
    outcome = await invoke(
        callers.stubs.channel, method, raw, caller.metadata if with_token else ()
    )
    event(outcome.code.name)  # pytest --hypothesis-show-statistics shows the spread
    if method is HEALTH_CHECK:  # grpc's own servicer: NOT_FOUND without details (G5)
        assert (problem := server_fault(outcome)) is None, problem
        return
    assert (problem := refusal_problem(outcome)) is None, problem


@pytest.mark.parametrize("method", STRUCTURED_METHODS, ids=_ids(STRUCTURED_METHODS))
@FUZZ
@given(data=st.data())
async def test_hostile_fields_get_clean_answers(
    callers: Callers, method: MethodDescriptor, data: st.DataObject
) -> None:
    caller = await callers.for_method(method)
    request = data.draw(message_strategy(method.input_type, ids=caller.ids), label="request")
    assert isinstance(request, message_class(method.input_type))
    outcome = await invoke(callers.stubs.channel, method, request, caller.metadata)
    event(outcome.code.name)
    assert (problem := refusal_problem(outcome)) is None, problem
    assert not (problems := stream_error_problems(outcome)), problems
    if outcome.code == grpc.StatusCode.UNAUTHENTICATED:
        # Only Logout/ChangePassword can end the fuzz user's own sessions; any other
        # method refusing a valid token is a bug in the token checks (the public credential
        # RPCs refuse the credential in the request).
        assert method.name in {
            "Logout",
            "ChangePassword",
            "Login",
            "RefreshToken",
            "AcceptInvitation",
        }, outcome


# --- what the fuzzer found, pinned ---------------------------------------------------------


@pytest.mark.parametrize("dimension", [0, 3, 385])
async def test_upsert_passages_with_a_vector_of_the_wrong_dimension_is_invalid_argument(
    callers: Callers, dimension: int
) -> None:
    """Found by the field fuzzer: a passage whose dense vector is not the index's dimension
    reaches the embedded Qdrant engine, whose error ends the call INTERNAL."""
    method = next(m for m in STRUCTURED_METHODS if m.name == "UpsertPassages")
    caller = await callers.for_method(method)
    passage = indexing_pb.IndexedPassage(index=0, text="a passage", dense=[0.5] * dimension)
    request = indexing_pb.UpsertPassagesRequest(
        document_id=str(uuid.uuid4()),
        generation="generation-1",
        owner_id=str(uuid.uuid4()),
        passages=[passage],
    )
    outcome = await invoke(callers.stubs.channel, method, request, caller.metadata)
    assert (problem := refusal_problem(outcome)) is None, problem
    assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
