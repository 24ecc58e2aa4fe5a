"""Timestamp conversion for servicers (protobuf accepts datetimes at run time, but its
type stubs do not)."""

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.errors import InvalidArgument


def to_timestamp(value: datetime) -> Timestamp:
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
