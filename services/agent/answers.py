"""The answer's final form: which sources it cites, and the stored citation records."""

import re
from typing import Any

from services.agent.tools.base import Source

_MARKER = re.compile(r"\[(\d{1,3})\]")


def cited(answer: str, sources: list[Source]) -> list[Source]:
    """The sources whose `[n]` marker the answer uses, in marker order; markers that name no
    source of this run are ignored (a model cannot cite what was not retrieved)."""
    by_index = {source.index: source for source in sources}
    seen: list[Source] = []
    for match in _MARKER.finditer(answer):
        source = by_index.get(int(match.group(1)))
        if source is not None and source not in seen:
            seen.append(source)
    return seen


def citation_record(source: Source) -> dict[str, Any]:
    """A citation as stored with the message (plain JSON)."""
    return {
        "index": source.index,
        "source_type": source.kind.value,
        "document_id": source.document_id,
        "chunk_id": source.chunk_id,
        "title": source.title,
        "url": source.url,
        "snippet": source.text[:500],
        "page": source.page,
        "start_offset": source.start,
        "end_offset": source.end,
        "score": source.score,
    }
