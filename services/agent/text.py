"""User text on its way into a prompt: control characters stripped, length capped."""

import re
import unicodedata

from services.errors import InvalidArgument

# C0/C1 controls except tab and newline, plus the bidi overrides that hide text.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_query(raw: str, *, max_chars: int, field: str = "query") -> str:
    """`raw` normalised (NFC, no control characters, trimmed); INVALID_ARGUMENT when empty
    or longer than `max_chars`."""
    text = _CONTROL.sub("", unicodedata.normalize("NFC", raw.replace("\r\n", "\n"))).strip()
    if not text:
        raise InvalidArgument.of(field, "must not be empty")
    if len(text) > max_chars:
        raise InvalidArgument.of(field, f"must be at most {max_chars} characters")
    return text


def title_from(question: str, limit: int = 80) -> str:
    """A conversation title: the first line of the first question, cut at a word."""
    line = question.split("\n", 1)[0].strip()
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0] or line[:limit]
    return cut.rstrip(" ,.;:") + "…"
