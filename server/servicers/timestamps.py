"""Timestamp conversion for servicers (protobuf accepts datetimes at run time, but its
type stubs do not)."""

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(value: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp
