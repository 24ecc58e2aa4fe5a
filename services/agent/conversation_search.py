"""The filter of a conversation search: conversations whose title, or one of whose messages,
contains every word of the query. PostgreSQL's full-text search (English stemming, so
"reactors" finds "reactor") where the database is PostgreSQL; elsewhere (SQLite) a
case-insensitive substring match of each word."""

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute

from services.agent.models import Conversation, Message
from services.errors import InvalidArgument

MAX_QUERY_CHARS = 200
# PostgreSQL's text search configuration: English stemming and stop words.
TEXT_SEARCH_CONFIG = "english"


def search_words(raw: str) -> list[str]:
    """The words of a search (empty: no search); INVALID_ARGUMENT when too long."""
    if len(raw) > MAX_QUERY_CHARS:
        raise InvalidArgument.of("query", f"must be at most {MAX_QUERY_CHARS} characters")
    return raw.split()


def _full_text(column: InstrumentedAttribute[str], words: list[str]) -> ColumnElement[bool]:
    query = func.plainto_tsquery(TEXT_SEARCH_CONFIG, " ".join(words))
    return func.to_tsvector(TEXT_SEARCH_CONFIG, column).op("@@")(query)


def _substrings(column: InstrumentedAttribute[str], words: list[str]) -> ColumnElement[bool]:
    def escaped(word: str) -> str:
        return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    return and_(*(column.ilike(f"%{escaped(w)}%", escape="\\") for w in words))


def matching(words: list[str], dialect: str) -> ColumnElement[bool]:
    """The WHERE clause on Conversation for `words` on a database of `dialect`."""
    match = _full_text if dialect == "postgresql" else _substrings
    in_a_message = exists(
        select(Message.id).where(
            Message.conversation_id == Conversation.id, match(Message.content, words)
        )
    )
    return or_(match(Conversation.title, words), in_a_message)
