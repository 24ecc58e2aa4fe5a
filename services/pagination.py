"""Opaque keyset page tokens (AIP-158): a page token encodes the sort key of the last
item of the previous page, never an offset."""

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar
from uuid import UUID

from services.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200


@dataclass(frozen=True)
class Cursor:
    """The position after the last item of a page: its timestamp and id."""

    at: datetime
    id: UUID


def page_size(
    requested: int, *, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE
) -> int:
    """The page size to use: `default` for 0, `requested` capped at `maximum`."""
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)


class Keyed(Protocol):
    """A row ordered by (created_at, id), as every keyset-paged list here is."""

    @property
    def created_at(self) -> datetime: ...
    @property
    def id(self) -> UUID: ...


RowT = TypeVar("RowT", bound=Keyed)


def split_page(
    rows: list[RowT], size: int, at: Callable[[RowT], datetime] | None = None
) -> tuple[list[RowT], str]:
    """The page in `rows` (fetched with limit size + 1) and the token of the next, if any;
    `at` is the timestamp the rows are ordered by (created_at unless given)."""
    if len(rows) <= size:
        return rows, ""
    last = rows[size - 1]
    return rows[:size], encode_cursor(Cursor(at(last) if at else last.created_at, last.id))


def encode_cursor(cursor: Cursor) -> str:
    raw = json.dumps({"t": cursor.at.isoformat(), "i": str(cursor.id)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(token: str) -> Cursor | None:
    """The cursor in `token`; None for an empty token. A malformed token is INVALID_ARGUMENT."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor = Cursor(at=datetime.fromisoformat(data["t"]), id=UUID(data["i"]))
        if cursor.at.tzinfo is None:
            raise ValueError("naive timestamp")
        return cursor
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise InvalidArgument([FieldViolation("page_token", "is not a valid page token")]) from None
