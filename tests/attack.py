"""The standing attack suite's shared pieces (issue 16): every RPC of the contract read off
the generated descriptors, a generic caller that needs no stub, the checks every refusal
must pass, and hypothesis strategies that build any request message from its descriptor."""

import importlib
import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import strategies as st

from server.config import ROOT

GEN = ROOT / "gen"
ERROR_DOMAIN = "agentmesh"
# Statuses that mean the server failed, never the caller: an unhandled exception (UNKNOWN)
# or an unexpected one caught by the error interceptor (INTERNAL).
SERVER_FAULTS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})
# What a status message must never show a client: Python exceptions, classes, source
# paths, tracebacks, object addresses.
PYTHON_LEAK = re.compile(
    r"Traceback|File \"|\.py\b|<class |<module |site-packages|/work/|/usr/lib/"
    r"|\b0x[0-9a-f]{8,}\b|\b[A-Z][A-Za-z]*(?:Error|Exception)\b"
)
REASON = re.compile(r"^[A-Z][A-Z0-9_]*$")


# --- the contract -------------------------------------------------------------------------


def contract_methods() -> list[MethodDescriptor]:
    """Every method of every agentmesh service in gen/ (internal ones included), sorted."""
    methods: dict[str, MethodDescriptor] = {}
    for path in sorted((GEN / "agentmesh").rglob("*_pb2.py")):
        module = importlib.import_module(".".join(path.relative_to(GEN).with_suffix("").parts))
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods[method_path(method)] = method
    assert methods, "no agentmesh service under gen/"
    return [methods[name] for name in sorted(methods)]


def method_path(method: MethodDescriptor) -> str:
    """The full method name a channel calls: `/agentmesh.pkg.v1.Service/Method`."""
    return f"/{method.containing_service.full_name}/{method.name}"


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def new_request(method: MethodDescriptor, **fields: Any) -> Message:
    return message_class(method.input_type)(**fields)


WELL_KNOWN = "google.protobuf."


def id_fields(descriptor: Descriptor, prefix: str = "", depth: int = 0) -> list[str]:
    """Paths of the fields that name a resource: `*_id`, `*_ids` and `page_token` (a cursor
    is a pointer into someone's list), in nested messages too (`user.user_id`)."""
    found: list[str] = []
    for item in descriptor.fields:
        path = prefix + item.name
        if item.type == FieldDescriptor.TYPE_MESSAGE:
            nested = item.message_type
            assert nested is not None
            if (
                depth < 2
                and not nested.full_name.startswith(WELL_KNOWN)
                and not nested.GetOptions().map_entry
            ):
                found += id_fields(nested, path + ".", depth + 1)
        elif item.type == FieldDescriptor.TYPE_STRING and (
            item.name.endswith(("_id", "_ids")) or item.name == "page_token"
        ):
            found.append(path)
    return found


def values_at(message: Message, path: str) -> list[str]:
    """The string values a request carries at a dotted field path (repeated: each one)."""
    head, _, rest = path.partition(".")
    value = getattr(message, head)
    if rest:
        return values_at(value, rest) if message.HasField(head) else []
    if isinstance(value, str):
        return [value] if value else []
    return [str(v) for v in value]


# --- calling any method ---------------------------------------------------------------


@dataclass
class Outcome:
    """How a call ended: its status, what it returned (every message of a stream), and the
    error when it failed."""

    method: str
    code: grpc.StatusCode
    details: str
    responses: list[Any] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    def __str__(self) -> str:
        return f"{self.method} -> {self.code.name}: {self.details!r}"


def _identity(raw: bytes) -> bytes:
    return raw


async def invoke(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message | bytes,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 60.0,
) -> Outcome:
    """Call `method` with a message, or with raw bytes sent as they are (the response is
    then raw bytes too); a server stream is read to its end."""
    name = method_path(method)
    if isinstance(request, bytes):
        serialize: Callable[[Any], bytes] = _identity
        deserialize: Callable[[bytes], Any] = _identity
    else:
        serialize = message_class(method.input_type).SerializeToString
        deserialize = message_class(method.output_type).FromString
    responses: list[Any] = []
    try:
        if method.server_streaming:
            stream_call: Any = channel.unary_stream(name, serialize, deserialize)
            async for response in stream_call(request, metadata=tuple(metadata), timeout=timeout):
                responses.append(response)
        else:
            unary_call: Any = channel.unary_unary(name, serialize, deserialize)
            responses.append(await unary_call(request, metadata=tuple(metadata), timeout=timeout))
    except grpc.aio.AioRpcError as error:
        return Outcome(name, error.code(), error.details() or "", responses, error)
    return Outcome(name, grpc.StatusCode.OK, "", responses)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


# --- what every refusal must look like ---------------------------------------------------


def rich_status(outcome: Outcome) -> status_pb2.Status | None:
    if outcome.error is None:
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(outcome.error)
    except ValueError:  # details that contradict the call's own status
        return None
    return status


def error_info_of(outcome: Outcome) -> error_details_pb2.ErrorInfo | None:
    status = rich_status(outcome)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def server_fault(outcome: Outcome) -> str | None:
    """Why `outcome` shows a server-side failure or a leak (None: a clean answer)."""
    if outcome.code in SERVER_FAULTS:
        return f"{outcome}: a server fault, never an answer to a request"
    if leak := PYTHON_LEAK.search(outcome.details):
        return f"{outcome}: the message shows Python internals ({leak.group(0)!r})"
    return None


def refusal_problem(outcome: Outcome) -> str | None:
    """What is wrong with a failed call's error (None: fine, or the call succeeded): never
    UNKNOWN/INTERNAL, no Python internals, a google.rpc.Status whose code is the call's,
    ErrorInfo{reason UPPER_SNAKE, domain agentmesh}."""
    if outcome.ok:
        return None
    if fault := server_fault(outcome):
        return fault
    status = rich_status(outcome)
    if status is None:
        return f"{outcome}: no google.rpc.Status details (grpc-status-details-bin)"
    if status.code != outcome.code.value[0]:
        return f"{outcome}: details carry code {status.code}"
    info = error_info_of(outcome)
    if info is None:
        return f"{outcome}: no ErrorInfo among the details"
    if not REASON.match(info.reason) or info.domain != ERROR_DOMAIN:
        return f"{outcome}: ErrorInfo {info.reason!r}/{info.domain!r}"
    return None


# --- requests from descriptors ---------------------------------------------------------

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
# Strings attackers try: ids of the right shape and the wrong one, injections, traversal,
# format strings, control and bidi characters, huge ones.
NASTY_STRINGS = [
    "",
    " ",
    "0",
    "-1",
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "0" * 32,
    "' OR 1=1 --",
    '"; DROP TABLE users; --',
    "../../../../etc/passwd",
    "/etc/passwd",
    "%s%s%s%n",
    "{0.__class__}",
    "{{7*7}}",
    "${jndi:ldap://127.0.0.1/x}",
    "<script>alert(1)</script>",
    "\x00",
    "a\x00b",
    "\r\n\r\nX-Injected: 1",
    "\u202eevil\u202c",
    "\ufeff",
    "\U0001f600" * 50,
    "\u210c\U0001d522\U0001d529\U0001d529\U0001d52c \ufdfd",  # Fraktur, a ligature
    "x" * 10_000,
    "ROLE_ADMIN",
    "email,full_name,role,password",
    "http://169.254.169.254/latest/meta-data/",
]
SIZE_ROOM = 2_000  # the longest random string (huge ones come from NASTY_STRINGS)
NASTY_BYTES = [
    b"",
    b"\x00" * 64,
    b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF",
    b"PK\x03\x04" + b"\x00" * 26,
    b"PK\x05\x06" + b"\x00" * 18,
    b"MZ\x90\x00\x03\x00\x00\x00",
    b"\x7fELF\x02\x01\x01\x00",
    b"\xff\xfe\x00\x00",
    b"plain text about basalt and granite.\n\nA second paragraph.",
    b"# Title\n\n- item one\n- item two\n",
]


def strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(NASTY_STRINGS),
        st.uuids().map(str),
        st.text(max_size=40),
        st.text(st.characters(codec="utf-8"), max_size=SIZE_ROOM),
        st.text(string.printable, max_size=200),
    )


def _scalar(item: FieldDescriptor, ids: Sequence[str]) -> st.SearchStrategy[Any]:
    kind = item.type
    if kind in INT_RANGES:
        low, high = INT_RANGES[kind]
        edges = [v for v in (low, high, 0, 1, 2, 100, 101, 1_000_000, -1) if low <= v <= high]
        return st.one_of(st.sampled_from(edges), st.integers(low, high))
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        assert item.enum_type is not None
        known = [v.number for v in item.enum_type.values]
        # proto3 enums are open: any int32 reaches the server.
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.sampled_from(NASTY_BYTES), st.binary(max_size=512))
    if kind == FieldDescriptor.TYPE_STRING:
        if ids and item.name.endswith(("_id", "_ids")):
            # Real ids half the time, so the calls get past "not found" into the handlers.
            return st.one_of(st.sampled_from(list(ids)), strings())
        return strings()
    raise AssertionError(f"no strategy for field type {kind} ({item.full_name})")


def _timestamp() -> st.SearchStrategy[dict[str, Any]]:
    # Valid instants, and seconds/nanos outside what a Timestamp may hold.
    return st.fixed_dictionaries(
        {
            "seconds": st.one_of(
                st.integers(-62135596800, 253402300799),
                st.sampled_from([0, -1, -62135596801, 253402300800, 2**63 - 1, -(2**63)]),
            ),
            "nanos": st.one_of(
                st.integers(0, 999_999_999), st.sampled_from([-1, 10**9, 2**31 - 1, -(2**31)])
            ),
        }
    )


def _field(item: FieldDescriptor, depth: int, ids: Sequence[str]) -> st.SearchStrategy[Any]:
    if item.type == FieldDescriptor.TYPE_MESSAGE:
        nested = item.message_type
        assert nested is not None
        if nested.GetOptions().map_entry:
            key, value = nested.fields_by_name["key"], nested.fields_by_name["value"]
            return st.dictionaries(
                _field(key, depth, ids), _field(value, depth + 1, ids), max_size=4
            )
        single: st.SearchStrategy[Any] = message_strategy(nested, depth + 1, ids)
    else:
        single = _scalar(item, ids)
    if item.is_repeated:
        return st.lists(single, max_size=5)
    return single


def message_strategy(
    descriptor: Descriptor, depth: int = 0, ids: Sequence[str] = ()
) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with any subset of fields set to hostile values: unicode and
    huge strings, extreme and negative ints, NaN, enum numbers the enum does not have,
    nested messages (to depth 3), timestamps out of range, random bytes; `*_id` fields
    also take the real `ids` given."""
    cls = message_class(descriptor)
    if descriptor.full_name == "google.protobuf.Timestamp":
        return _timestamp().map(lambda values: cls(**values))
    if depth > 3:
        return st.just(cls())
    optional = {item.name: _field(item, depth, ids) for item in descriptor.fields}
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: build(cls, values))


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    message = cls()
    for name, value in values.items():
        target = getattr(message, name)
        if isinstance(value, Message):
            target.CopyFrom(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(message, name, value)
    return message


@st.composite
def _flipped(draw: st.DrawFn, original: bytes) -> bytes:
    if not original:
        return draw(st.binary(min_size=1, max_size=16))
    raw = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


def mutated(original: bytes) -> st.SearchStrategy[bytes]:
    """Bytes near a valid encoding: cut short, bytes changed, a length or varint inflated,
    junk appended."""
    return st.one_of(
        st.integers(0, max(len(original) - 1, 0)).map(lambda cut: original[:cut]),
        _flipped(original),
        st.binary(min_size=1, max_size=32).map(lambda tail: original + tail),
        st.sampled_from(
            [
                original + b"\x0a\xff\xff\xff\xff\x0f",  # field 1, length 2^32: truncated
                original + b"\x08" + b"\xff" * 10,  # a varint longer than 64 bits
                original + b"\xfa\xff\xff\xff\x0f\x00",  # the largest field number
                b"\x0b\x0b\x0b\x0b",  # start-group tags with no end
                b"\x0a\x05\x0a\x03\x0a\x01",  # nested lengths that run past the end
            ]
        ),
    )


def random_id() -> str:
    return str(uuid.uuid4())
